"""`python -m igd.lab.bench`: NAT-PMP mapping rate of igd-server as its table grows, side by
side with Debian's miniupnpd in the same lab. Method and results: docs/performance.md.

A LAN host asks for mappings one at a time (send, wait for the answer, next), each for a new
internal port, so every request makes a new mapping. For each table size a fresh daemon starts
from a lease store preloaded with that many mappings: the cold start (empty kernel table) and a
warm restart (kernel still holding them) are timed, the kernel is checked to hold every entry,
then the load runs. miniupnpd starts empty and the load runs against it for a time budget; its
results are grouped by the table size each request met.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import igd
from igd.lab import Lab, LabError
from igd.lab.demo import log_tail
from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.server.backends.nftables import parse_entries
from igd.server.daemon import POLICY_KEY, file_digest
from igd.server.store import Clock, LeaseStore

PREFIX = "igdbench"  # namespaces of the benchmark's labs start with this
# miniupnpd refuses private and reserved WAN addresses; this one is just past RFC 6598's
# 100.64.0.0/10. It exists only inside the lab, and both gateways run behind it.
PUBLIC_LOOKING_WAN = "100.128.7.0/24"
TABLE = "igd"
LIMITS = {"requests_per_second_per_client": 100000, "burst_per_client": 100000}

DEFAULT_SIZES = (0, 1_000, 10_000, 50_000)
DEFAULT_REQUESTS = 3000
DEFAULT_SECONDS = 60.0  # time limit of the load at one table size
DEFAULT_MINIUPNPD_SECONDS = 180.0
DEFAULT_BUCKET = 500
DEFAULT_TIMEOUT = 1.0  # first retransmit after this; the wait doubles, 4 sends in all
TRIES = 4
LIFETIME = 3600  # what the load asks for
PRELOAD_LEASE = 7200.0  # preloaded leases outlast any run
START_TIMEOUT = 180.0  # for the daemon to restore and say it is ready
READY_TIMEOUT = 10.0  # for a gateway to answer its first NAT-PMP request
LOAD_FIRST_PORT = 10000  # igd: the load's internal (and suggested external) ports start here
MINIUPNPD_FIRST_PORT = 1024
FIRST_PORT, LAST_PORT = 1024, 65535
MAX_MINIUPNPD_REQUESTS = LAST_PORT - MINIUPNPD_FIRST_PORT + 1  # one new port each

# Targets from the issue, for this 2-core machine.
TARGET_RATE, TARGET_RATE_SIZE = 2000.0, 10_000
TARGET_COST_RATIO, TARGET_COST_SIZE = 1.5, 50_000
TARGET_RESTORE_S, TARGET_RESTORE_SIZE = 2.0, 50_000
TARGET_RSS_MB, TARGET_RSS_SIZE = 150.0, 50_000

_READY = "igd-server ready"
_RESTORED = re.compile(r"restored (\d+) of (\d+) persisted mappings in ([0-9.]+) s")

# The same rules miniupnpd's nft_init.sh makes, in one table (its names set in the config).
MINIUPNPD_RULESET = """
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""

# The load generator, run in a LAN host. It prints one JSON object: the retransmit count and
# per request [start s, latency s, NAT-PMP result code or -1 for no answer].
_LOAD = r"""
import json, socket, struct, sys, time
gateway, proto, first, count, seconds, lifetime, timeout, tries, ready = sys.argv[1:]
first, count, lifetime, tries = int(first), int(count), int(lifetime), int(tries)
seconds, timeout, ready = float(seconds), float(timeout), float(ready)
opcode = 2 if proto == "tcp" else 1
clock = time.perf_counter
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((gateway, 5351))

def ask(request, reply_opcode, port, wait, attempts):
    started = clock()
    for attempt in range(attempts):
        s.send(request)
        until = clock() + wait
        while (left := until - clock()) > 0:
            s.settimeout(left)
            try:
                data = s.recv(64)
            except TimeoutError:
                break
            except ConnectionRefusedError:  # nothing bound to 5351 yet
                time.sleep(left)
                break
            if len(data) >= 12 and data[1] == reply_opcode and (port is None or data[8:10] == port):
                return data, clock() - started, attempt
        wait *= 2
    return None, clock() - started, attempts

up = time.monotonic() + ready
while ask(b"\x00\x00", 128, None, 0.2, 1)[0] is None:
    if time.monotonic() > up:
        sys.exit(f"no NAT-PMP answer from {gateway} within {ready} s")
samples, timeouts = [], 0
t0 = clock()
deadline = t0 + seconds
for port in range(first, first + count):
    begin = clock()
    if begin >= deadline:
        break
    request = struct.pack("!BBHHHI", 0, opcode, 0, port, port, lifetime)
    data, latency, again = ask(request, 128 + opcode, struct.pack("!H", port), timeout, tries)
    timeouts += again
    code = -1 if data is None else struct.unpack("!H", data[2:4])[0]
    samples.append([round(begin - t0, 7), round(latency, 7), code])
print(json.dumps({"timeouts": timeouts, "samples": samples}))
"""


class BenchError(RuntimeError):
    """A benchmark step did not do what it should; the message says what happened."""


# -- statistics (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it was first sent (s from the load's start), its latency, its result."""

    start: float
    latency: float
    result: int  # NAT-PMP result code; -1 when no answer came after every retransmit


@dataclass(frozen=True, slots=True)
class Stats:
    """A run of consecutive requests, one outstanding at a time."""

    count: int
    ok: int
    failed: int  # answered with a non-zero result code
    lost: int  # never answered
    seconds: float
    rps: float  # answered requests per second
    p50_ms: float
    p99_ms: float
    mean_ms: float


@dataclass(frozen=True, slots=True)
class Bucket:
    """Requests that met a table of `low` to `high` mappings (high exclusive unless last)."""

    low: int
    high: int
    stats: Stats


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ascending values (q in 0..1); nan when empty."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summarize(samples: Sequence[Sample]) -> Stats:
    """Counts, rate and latency percentiles of consecutive samples."""
    if not samples:
        return Stats(0, 0, 0, 0, 0.0, 0.0, math.nan, math.nan, math.nan)
    answered = sorted(s.latency for s in samples if s.result >= 0)
    seconds = samples[-1].start + samples[-1].latency - samples[0].start
    return Stats(
        count=len(samples),
        ok=sum(1 for s in samples if s.result == 0),
        failed=sum(1 for s in samples if s.result > 0),
        lost=sum(1 for s in samples if s.result < 0),
        seconds=seconds,
        rps=len(answered) / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(answered, 0.50) * 1000,
        p99_ms=percentile(answered, 0.99) * 1000,
        mean_ms=sum(answered) / len(answered) * 1000 if answered else math.nan,
    )


def buckets(samples: Sequence[Sample], width: int, base: int = 0) -> list[Bucket]:
    """Samples grouped by the table size each met: `base` plus the mappings made before it."""
    groups: dict[int, list[Sample]] = {}
    size = base
    for sample in samples:
        groups.setdefault(size // width, []).append(sample)
        size += sample.result == 0
    return [
        Bucket(index * width, min((index + 1) * width, size), summarize(group))
        for index, group in sorted(groups.items())
    ]


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """One start of igd-server: what it restored, how long that took, what the kernel held."""

    restored: int
    persisted: int
    restore_s: float  # as the daemon logs it: store, table, policy and kernel reconcile
    ready_s: float  # from launching the process to its "ready" line
    kernel: int  # entries in the kernel's maps once ready
    rss_mb: float  # the daemon's resident memory once ready


@dataclass(frozen=True, slots=True)
class IgdRun:
    """igd-server at one preloaded table size."""

    size: int
    cold: Start  # empty kernel table (after a reboot)
    warm: Start  # kernel still holding the mappings (daemon restarted)
    load: Stats
    timeouts: int
    kernel_after: int
    rss_mb: float  # after the run


@dataclass(frozen=True, slots=True)
class MiniupnpdRun:
    """miniupnpd, from an empty table, for a time budget."""

    version: str
    budget_s: float
    load: Stats
    timeouts: int
    buckets: tuple[Bucket, ...]
    kernel_rules: int  # DNAT rules in its chain at the end

    def bucket_for(self, size: int) -> Bucket | None:
        """The bucket holding table size `size`, if the run got there."""
        for bucket in self.buckets:
            if bucket.low <= size < bucket.high or size == bucket.low:
                return bucket
        return None


@dataclass(frozen=True, slots=True)
class Machine:
    """What the results were measured on, and when."""

    cpu: str
    cores: int
    kernel: str
    python: str
    nft: str
    date: str

    @classmethod
    def here(cls) -> Machine:
        """This machine, now."""
        cpu = "unknown CPU"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False)
        return cls(
            cpu=cpu,
            cores=os.cpu_count() or 0,
            kernel=platform.release(),
            python=platform.python_version(),
            nft=nft.stdout.strip() or "nft not found",
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one benchmark run measured."""

    machine: Machine
    requests: int
    igd: tuple[IgdRun, ...]
    miniupnpd: MiniupnpdRun | None
    miniupnpd_note: str = ""

    def verdicts(self) -> list[tuple[str, str, bool]]:
        """(target, what was measured, met) for each target the measured sizes cover."""
        runs = {run.size: run for run in self.igd}
        out: list[tuple[str, str, bool]] = []
        if (run := runs.get(TARGET_RATE_SIZE)) is not None:
            out.append(
                (
                    f"≥ {TARGET_RATE:,.0f} mappings/s with {TARGET_RATE_SIZE:,} existing",
                    f"{run.load.rps:,.0f}/s",
                    run.load.rps >= TARGET_RATE,
                )
            )
        base, big = runs.get(0), runs.get(TARGET_COST_SIZE)
        if base is not None and big is not None:
            ratio = big.load.mean_ms / base.load.mean_ms
            out.append(
                (
                    f"cost per request at {TARGET_COST_SIZE:,} ≤ {TARGET_COST_RATIO}x cost at 0",
                    f"{ratio:.2f}x ({big.load.mean_ms:.3f} vs {base.load.mean_ms:.3f} ms mean;"
                    f" p50 {big.load.p50_ms / base.load.p50_ms:.2f}x)",
                    ratio <= TARGET_COST_RATIO,
                )
            )
        if (run := runs.get(TARGET_RESTORE_SIZE)) is not None:
            for label, start in (("cold start", run.cold), ("warm restart", run.warm)):
                out.append(
                    (
                        f"restore {TARGET_RESTORE_SIZE:,} leases ≤ {TARGET_RESTORE_S:.0f} s"
                        f" ({label})",
                        f"{start.restore_s:.2f} s (ready {start.ready_s:.2f} s after launch)",
                        start.restore_s <= TARGET_RESTORE_S,
                    )
                )
        if (run := runs.get(TARGET_RSS_SIZE)) is not None:
            out.append(
                (
                    f"RSS ≤ {TARGET_RSS_MB:.0f} MB at {TARGET_RSS_SIZE:,}",
                    f"{run.rss_mb:.0f} MB after the run ({run.kernel_after:,} mappings);"
                    f" {run.cold.rss_mb:.0f} MB after a cold start",
                    run.rss_mb <= TARGET_RSS_MB,
                )
            )
        return out

    def markdown(self) -> str:
        """The results as markdown: main table, miniupnpd by size, starts, targets, machine."""
        m, mini = self.machine, self.miniupnpd
        lines = [
            f"NAT-PMP map requests, one outstanding, {self.requests:,} new mappings per igd run"
            + (f"; miniupnpd for {mini.budget_s:.0f} s from empty" if mini else "")
            + ".",
            "",
            "| table size | igd req/s | igd p50 ms | igd p99 ms"
            " | miniupnpd req/s | miniupnpd p50 ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run in self.igd:
            bucket = mini.bucket_for(run.size) if mini else None
            if bucket is not None:
                theirs = f"{bucket.stats.rps:,.0f} ({bucket.low:,}-{bucket.high:,})"
                their_p50 = _ms(bucket.stats.p50_ms)
            else:
                reached = f" (reached {mini.load.ok:,})" if mini else ""
                theirs, their_p50 = ("not reached" + reached if mini else "—"), "—"
            lines.append(
                f"| {run.size:,} | {run.load.rps:,.0f} | {_ms(run.load.p50_ms)}"
                f" | {_ms(run.load.p99_ms)} | {theirs} | {their_p50} |"
            )
        problems = [
            f"{run.size:,}: {run.load.failed} refused, {run.load.lost} unanswered,"
            f" {run.timeouts} retransmits"
            for run in self.igd
            if run.load.failed or run.load.lost or run.timeouts
        ]
        lines += [
            "",
            "igd requests that were refused, unanswered or retransmitted: " + "; ".join(problems)
            if problems
            else "igd: every request was granted at its first send.",
        ]
        if mini is not None:
            lines += [
                "",
                f"miniupnpd {mini.version}, by the table size each request met"
                f" ({mini.load.count:,} requests, {mini.load.ok:,} mappings, {mini.timeouts}"
                f" retransmits; {mini.kernel_rules:,} DNAT rules in its chain at the end):",
                "",
                "| mappings | req/s | p50 ms | p99 ms |",
                "| ---: | ---: | ---: | ---: |",
                *(
                    f"| {b.low:,}-{b.high:,} | {b.stats.rps:,.0f} | {_ms(b.stats.p50_ms)}"
                    f" | {_ms(b.stats.p99_ms)} |"
                    for b in mini.buckets
                ),
            ]
        elif self.miniupnpd_note:
            lines += ["", f"miniupnpd: {self.miniupnpd_note}."]
        lines += [
            "",
            "igd-server starts and memory (restore: as the daemon logs it, lease store to kernel):",
            "",
            "| table size | cold start restore s | warm restart restore s | ready after launch s"
            " (cold / warm) | RSS MB when ready (cold / warm) | RSS MB after the run |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {r.size:,} | {r.cold.restore_s:.3f} | {r.warm.restore_s:.3f}"
                f" | {r.cold.ready_s:.2f} / {r.warm.ready_s:.2f}"
                f" | {r.cold.rss_mb:.0f} / {r.warm.rss_mb:.0f} | {r.rss_mb:.0f} |"
                for r in self.igd
            ),
        ]
        if verdicts := self.verdicts():
            lines += ["", "| target | measured | verdict |", "| --- | --- | --- |"]
            lines += [f"| {t} | {v} | {'met' if ok else 'NOT met'} |" for t, v, ok in verdicts]
        lines += [
            "",
            f"Machine: {m.cpu}, {m.cores} cores, Linux {m.kernel}, Python {m.python},"
            f" {m.nft}; {m.date}.",
        ]
        return "\n".join(lines) + "\n"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


# -- preloading the lease store ---------------------------------------------------------------


def preload(size: int, owners: Sequence[IPv4Address], avoid: range, *, now: float) -> list[Mapping]:
    """`size` NAT-PMP mappings spread over `owners` (each to itself, as secure mode wants),
    on distinct external ports across TCP and UDP, none in `avoid` (the load's ports)."""
    ports = (
        p for p in range(FIRST_PORT, LAST_PORT + 1) if p not in avoid and p not in (5350, 5351)
    )
    slots = ((proto, port) for port in ports for proto in (Protocol.TCP, Protocol.UDP))
    mappings = []
    for index, (proto, port) in zip(range(size), slots, strict=False):
        owner = owners[index % len(owners)]
        mappings.append(
            Mapping(
                key=MappingKey(proto, port),
                internal_address=owner,
                internal_port=port,
                owner=Owner(Mechanism.NATPMP, owner),
                created=now,
                expires=now + PRELOAD_LEASE,
            )
        )
    if len(mappings) < size:
        raise BenchError(f"only {len(mappings)} free ports for a preload of {size}")
    return mappings


def preload_owners(lab: Lab) -> list[IPv4Address]:
    """LAN addresses other than the gateway's and the lab hosts' (the load's own)."""
    taken = {IPv4Address(host.address) for host in lab.hosts.values()}
    return [a for a in lab.lan_network.hosts() if a not in taken and int(a) & 0xFF >= 20]


# -- running the gateways ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """What to run (the command-line options)."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    requests: int = DEFAULT_REQUESTS
    seconds: float = DEFAULT_SECONDS
    miniupnpd_seconds: float = DEFAULT_MINIUPNPD_SECONDS
    bucket: int = DEFAULT_BUCKET
    timeout: float = DEFAULT_TIMEOUT
    policy: Path | None = None
    prefix: str | None = None


def run_load(
    lab: Lab, first_port: int, count: int, seconds: float, timeout: float
) -> tuple[list[Sample], int]:
    """The load from lan1 against whichever gateway runs; (samples, retransmits)."""
    argv = [lab.gateway.address, "tcp", first_port, count, seconds, LIFETIME, timeout, TRIES]
    limit = seconds + READY_TIMEOUT + timeout * 2**TRIES + 30
    proc = lab.python(
        lab.lan[0], ["-c", _LOAD, *map(str, argv), str(READY_TIMEOUT)], check=False, timeout=limit
    )
    if proc.returncode != 0:
        raise BenchError(f"the load generator failed: {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    samples = [Sample(float(a), float(b), int(c)) for a, b, c in out["samples"]]
    return samples, int(out["timeouts"])


def kernel_entries(lab: Lab) -> int:
    """Entries in igd's two nftables maps in the gateway."""
    out = lab.run(lab.gateway, ["nft", "-j", "list", "table", "ip", TABLE], timeout=120).stdout
    return len(parse_entries(json.loads(out), TABLE))


def start_daemon(lab: Lab, config: Path) -> Start:
    """Start igd-server, wait for its ready line, read its restore line and the kernel."""
    path = lab.gateway_log_path
    offset = path.stat().st_size if path.exists() else 0
    began = time.perf_counter()
    proc = lab.start_gateway(config)
    while True:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        if _READY in text:
            ready_s = time.perf_counter() - began
            break
        if proc.poll() is not None:
            raise BenchError(f"igd-server exited with {proc.returncode}\n{log_tail(lab)}")
        if time.perf_counter() - began > START_TIMEOUT:
            raise BenchError(f"igd-server not ready after {START_TIMEOUT:.0f} s\n{log_tail(lab)}")
        time.sleep(0.01)
    match = _RESTORED.search(text)
    if match is None:
        raise BenchError(f"igd-server logged no restore line\n{log_tail(lab)}")
    restored, persisted = int(match.group(1)), int(match.group(2))
    kernel = kernel_entries(lab)
    rss = memory_mb(proc.pid)
    return Start(restored, persisted, float(match.group(3)), ready_s, kernel, rss)


def memory_mb(pid: int) -> float:
    """Resident memory (VmRSS) of igd-server's process in MB; BenchError if `pid` is not it."""
    # `ip netns exec` execs the daemon, so the pid Popen knows is the daemon's own.
    if b"igd.server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
        raise BenchError(f"pid {pid} is not igd-server")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def drop_table(lab: Lab, family: str, name: str) -> None:
    """Delete an nftables table in the gateway (fine if it is not there)."""
    lab.run(lab.gateway, ["nft", "-f", "-"], input=f"add table {family} {name}\n"
            f"delete table {family} {name}\n", timeout=120)  # fmt: skip


def run_igd(lab: Lab, size: int, settings: Settings, say: Callable[[str], None]) -> IgdRun:
    """A fresh igd-server over a store preloaded with `size` leases, then the load."""
    state = lab.workdir / f"state-{size}"
    load_ports = range(LOAD_FIRST_PORT, LOAD_FIRST_PORT + settings.requests)
    now = time.monotonic()
    policy = settings.policy or bench_policy()
    store = LeaseStore(state / "leases.sqlite")
    try:
        store.apply([], preload(size, preload_owners(lab), load_ports, now=now), Clock(mono=now))
        # As the daemon leaves it: these leases were granted under this policy file.
        store.set_meta(POLICY_KEY, file_digest(Path(policy)))
    finally:
        store.close()
    config = lab.write_gateway_config(
        policy,
        filename=f"gateway-{size}.toml",
        state={"directory": str(state)},
        limits=LIMITS,
        nftables={"table": TABLE, "on_stop": "keep"},
    )
    cold = start_daemon(lab, config)
    say(f"igd {size:,}: cold start restored {cold.restored:,} in {cold.restore_s:.3f} s")
    if lab.stop_gateway() != 0:
        raise BenchError(f"igd-server did not stop cleanly\n{log_tail(lab)}")
    warm = start_daemon(lab, config)
    say(f"igd {size:,}: warm restart restored {warm.restored:,} in {warm.restore_s:.3f} s")
    for start in (cold, warm):
        if not start.restored == start.persisted == start.kernel == size:
            raise BenchError(f"preloaded {size}, but {start}")
    proc = lab.gateway_process
    assert proc is not None
    samples, timeouts = run_load(
        lab, load_ports.start, settings.requests, settings.seconds, settings.timeout
    )
    load = summarize(samples)
    kernel_after = kernel_entries(lab)
    rss = memory_mb(proc.pid)
    if kernel_after != size + load.ok:
        raise BenchError(f"{size} + {load.ok} granted, but the kernel holds {kernel_after}")
    say(
        f"igd {size:,}: {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms,"
        f" p99 {load.p99_ms:.2f} ms, {load.ok}/{load.count} ok; RSS {rss:.0f} MB"
    )
    lab.stop_gateway()
    drop_table(lab, "ip", TABLE)
    return IgdRun(size, cold, warm, load, timeouts, kernel_after, rss)


def miniupnpd_version() -> str | None:
    """The installed miniupnpd-nftables version, or None if it is missing."""
    if shutil.which("miniupnpd") is None:
        return None
    argv = ["dpkg-query", "-W", "-f", "${Version}", "miniupnpd-nftables"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "(version unknown)"


def run_miniupnpd(
    lab: Lab, settings: Settings, version: str, say: Callable[[str], None]
) -> MiniupnpdRun:
    """Debian's miniupnpd in the gateway and the same load, for the time budget."""
    gw = lab.gateway
    conf = lab.workdir / "miniupnpd.conf"
    conf.write_text(
        f"ext_ifname={gw.external_interface}\nlistening_ip={gw.interface}\n"
        "enable_natpmp=yes\nenable_upnp=no\nsecure_mode=yes\n"
        "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n"
        f"allow 1024-65535 {lab.lan_network} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
        "upnp_table_name=filter\nupnp_nat_table_name=filter\nupnp_forward_chain=miniupnpd\n"
        "upnp_nat_chain=prerouting_miniupnpd\nupnp_nat_postrouting_chain=postrouting_miniupnpd\n"
    )
    lab.run(gw, ["nft", "-f", "-"], input=MINIUPNPD_RULESET)
    pid = start_miniupnpd(lab, conf)
    try:
        say(f"miniupnpd {version} (pid {pid}): load for {settings.miniupnpd_seconds:.0f} s")
        samples, timeouts = run_load(
            lab,
            MINIUPNPD_FIRST_PORT,
            MAX_MINIUPNPD_REQUESTS,
            settings.miniupnpd_seconds,
            settings.timeout,
        )
        listing = lab.run(gw, ["nft", "-j", "list", "chain", "inet", "filter",
                               "prerouting_miniupnpd"], timeout=120).stdout  # fmt: skip
        rules = sum(1 for obj in json.loads(listing)["nftables"] if "rule" in obj)
    finally:
        # SIGKILL: on SIGTERM it would delete its rules one by one, re-reading its chain for
        # each, which takes minutes at a few thousand mappings.
        kill_miniupnpd(pid)
        drop_table(lab, "inet", "filter")
    load = summarize(samples)
    say(f"miniupnpd: {load.ok:,} mappings in {load.seconds:.0f} s, {rules:,} rules in its chain")
    return MiniupnpdRun(
        version,
        settings.miniupnpd_seconds,
        load,
        timeouts,
        tuple(buckets(samples, settings.bucket)),
        rules,
    )


def start_miniupnpd(lab: Lab, conf: Path) -> int:
    """Start miniupnpd as a router runs it (a daemon); its pid, from its pid file.

    Not `-d`: that turns on debug logging through syslog, and with no syslog socket (as in
    this lab) glibc writes every line to /dev/console, which then costs more than the
    mapping itself. As a daemon it logs only notices and above.
    """
    pidfile = lab.workdir / "miniupnpd.pid"
    argv = ["miniupnpd", "-f", str(conf), "-P", str(pidfile)]
    with (lab.workdir / "miniupnpd.log").open("wb") as log:
        proc = lab.popen(lab.gateway, argv, stdout=log, stderr=subprocess.STDOUT)
    proc.wait(timeout=READY_TIMEOUT)  # the parent exits once the daemon has forked
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text.isdigit() and _is_miniupnpd(int(text)):
            return int(text)
        time.sleep(0.05)
    log_text = (lab.workdir / "miniupnpd.log").read_text(errors="replace")
    raise BenchError(f"miniupnpd did not start (exit {proc.returncode}): {log_text.strip()}")


def _is_miniupnpd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "miniupnpd"
    except OSError:
        return False


def kill_miniupnpd(pid: int) -> None:
    """SIGKILL the miniupnpd we started and wait (bounded) until it is gone."""
    if not _is_miniupnpd(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether `pid` is alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def bench_policy() -> Path:
    """policies/bench.toml of this checkout (or of the current directory)."""
    for base in (Path(igd.__file__).resolve().parent.parent, Path.cwd()):
        path = base / "policies" / "bench.toml"
        if path.is_file():
            return path
    raise BenchError("policies/bench.toml not found: run from the repository root")


def run_bench(settings: Settings, say: Callable[[str], None]) -> Report:
    """Build a lab, measure igd at each size and miniupnpd, tear down; the report."""
    if os.geteuid() != 0:
        raise BenchError("the benchmark builds network namespaces: run it as root")
    free = 2 * (LAST_PORT - FIRST_PORT + 1 - 2 - settings.requests)
    if max(settings.sizes, default=0) > free or LOAD_FIRST_PORT + settings.requests > LAST_PORT:
        raise BenchError(f"{settings.requests} requests leave room for a preload of {free}")
    version = miniupnpd_version() if settings.miniupnpd_seconds > 0 else None
    note = "" if version else ("not installed" if settings.miniupnpd_seconds > 0 else "skipped")
    machine = Machine.here()
    prefix = settings.prefix or f"{PREFIX}{secrets.token_hex(3)}"
    with Lab(prefix, wan_hosts=1, lan_hosts=1, wan_network=PUBLIC_LOOKING_WAN) as lab:
        say(f"lab {lab.prefix} built (files in {lab.workdir})")
        runs = tuple(run_igd(lab, size, settings, say) for size in settings.sizes)
        mini = run_miniupnpd(lab, settings, version, say) if version else None
    return Report(machine, settings.requests, runs, mini, note)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark, print the report, write it to --output."""
    parser = argparse.ArgumentParser(prog="python -m igd.lab.bench", description=__doc__)
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="preloaded table sizes, comma-separated (default %(default)s)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help="new mappings asked for at each size (default %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help="time limit of the load at each size (default %(default)s)",
    )
    parser.add_argument(
        "--miniupnpd-seconds",
        type=float,
        default=DEFAULT_MINIUPNPD_SECONDS,
        help="load time against miniupnpd, 0 skips it (default %(default)s)",
    )
    parser.add_argument(
        "--bucket",
        type=int,
        default=DEFAULT_BUCKET,
        help="table-size width of miniupnpd's result rows (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds before the first retransmit; doubles, {TRIES} sends (default %(default)s)",
    )
    parser.add_argument("--policy", type=Path, help="default: policies/bench.toml")
    parser.add_argument("--prefix", help=f"lab name (starts with {PREFIX})")
    parser.add_argument("--output", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(word.replace("_", "")) for word in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes: want comma-separated integers, not {args.sizes!r}")
    if any(s < 0 for s in sizes) or args.requests < 1 or args.bucket < 1:
        parser.error("sizes must be >= 0, --requests and --bucket >= 1")
    if args.prefix is not None and not args.prefix.startswith(PREFIX):
        parser.error(f"--prefix must start with {PREFIX}")
    settings = Settings(
        sizes=sizes,
        requests=args.requests,
        seconds=args.seconds,
        miniupnpd_seconds=args.miniupnpd_seconds,
        bucket=args.bucket,
        timeout=args.timeout,
        policy=args.policy,
        prefix=args.prefix,
    )

    def say(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    try:
        report = run_bench(settings, say)
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        say(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; the lab is torn down")
        return 130
    text = report.markdown()
    print(text, end="", flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        say(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
