"""`python -m lab.bench`: NAT-PMP and PCP mapping rate of igd-server as its table grows,
side by side with Debian's miniupnpd in the same lab. Method and results: docs/performance.md.

A LAN host asks for mappings one at a time (send, wait for the answer, next), each for a new
internal port, so every request makes a new mapping. For each table size a fresh daemon starts
from a lease store preloaded with that many mappings: the cold start (empty kernel table) and a
warm restart (kernel still holding them) are timed, the kernel is checked to hold every entry,
then the NAT-PMP load and the PCP load run, each on its own ports. miniupnpd starts empty for
each protocol's load and runs for a time budget; its results are grouped by the table size
each request met. The report and its statistics: lab/bench_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import igd
from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.server.backends.nft_listing import parse_entries
from igd.server.store import POLICY_KEY, Clock, LeaseStore, file_digest
from lab import Lab, LabError, miniupnpd
from lab.bench_report import (
    LOAD_MECHANISMS,
    NAMES,
    IgdRun,
    Load,
    Machine,
    MiniupnpdRun,
    Report,
    Sample,
    Start,
    buckets,
    summarize,
)
from lab.demo import log_tail
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions

PREFIX = "igdbench"  # namespaces of the benchmark's labs start with this
TABLE = "igd"
LIMITS = {"requests_per_second_per_client": 100000, "burst_per_client": 100000}

DEFAULT_SIZES = (0, 1_000, 10_000, 50_000)
DEFAULT_REQUESTS = 3000
DEFAULT_SECONDS = 60.0  # time limit of one load at one table size
DEFAULT_MINIUPNPD_SECONDS = 180.0  # for each protocol's load
DEFAULT_BUCKET = 500
DEFAULT_TIMEOUT = 1.0  # first retransmit after this; the wait doubles, 4 sends in all
TRIES = 4
LIFETIME = 3600  # what the load asks for
PRELOAD_LEASE = 7200.0  # preloaded leases outlast any run
START_TIMEOUT = 180.0  # for the daemon to restore and say it is ready
READY_TIMEOUT = 10.0  # for a gateway to answer its first request
LOAD_FIRST_PORT = 10000  # igd: the loads' internal (and suggested external) ports start here
MINIUPNPD_FIRST_PORT = 1024
FIRST_PORT, LAST_PORT = 1024, 65535
MAX_MINIUPNPD_REQUESTS = LAST_PORT - MINIUPNPD_FIRST_PORT + 1  # one new port each

_READY = "igd-server ready"
_RESTORED = re.compile(r"restored (\d+) of (\d+) persisted mappings in ([0-9.]+) s")

# The load generator, run in a LAN host with the arguments `run_load` gives: TCP map requests
# of one protocol ("natpmp" or "pcp"), one outstanding at a time, each for a new internal port
# and suggesting the same external port. It prints one JSON object: the retransmit count and
# per request [start s, latency s, result code or -1 for no answer]. It builds its messages
# itself (the LAN host needs no igd package); tests exec it as a module and check its bytes
# with igd.proto's codecs.
_LOAD = r"""
import json, os, socket, struct, sys, time

clock = time.perf_counter
IPV4_MAPPED = bytes(10) + b"\xff\xff"


def natpmp_probe():
    # RFC 6886 §3.2: external address request; its answer says the gateway is up.
    return b"\x00\x00", lambda data: len(data) >= 12 and data[:2] == b"\x00\x80"


def natpmp_map(port, lifetime):
    # RFC 6886 §3.3: map TCP (opcode 2); the answer is 130 for the same internal port.
    wire = struct.pack("!BBHHHI", 0, 2, 0, port, port, lifetime)

    def answer(data):
        return len(data) >= 16 and data[:2] == b"\x00\x82" and data[8:10] == wire[4:6]
    return wire, answer


def natpmp_result(data):
    return struct.unpack("!H", data[2:4])[0]


def pcp_probe(client):
    # RFC 6887 §14.1: ANNOUNCE; every PCP server answers it.
    wire = struct.pack("!BBHI16s", 2, 0, 0, 0, IPV4_MAPPED + socket.inet_aton(client))
    return wire, lambda data: len(data) >= 24 and data[:2] == b"\x02\x80"


def pcp_map(client, port, lifetime, nonce):
    # RFC 6887 §11.1: MAP for TCP; client address = this host's (IPv4-mapped), as §8.2 checks;
    # suggested external address ::ffff:0.0.0.0, any IPv4 address (§11.1).
    wire = struct.pack(
        "!BBHI16s12sB3xHH16s", 2, 1, 0, lifetime, IPV4_MAPPED + socket.inet_aton(client),
        nonce, 6, port, port, IPV4_MAPPED + bytes(4),
    )

    def answer(data):  # MAP response (0x81) with this request's nonce and internal port
        return (len(data) >= 60 and data[:2] == b"\x02\x81" and data[24:36] == nonce
                and data[40:42] == wire[40:42])
    return wire, answer


def pcp_result(data):
    return data[3]


def ask(s, request, match, wait, attempts):
    started = clock()
    for attempt in range(attempts):
        s.send(request)
        until = clock() + wait
        while (left := until - clock()) > 0:
            s.settimeout(left)
            try:
                data = s.recv(1100)
            except TimeoutError:
                break
            except ConnectionRefusedError:  # nothing bound to 5351 yet
                time.sleep(left)
                break
            if match(data):
                return data, clock() - started, attempt
        wait *= 2
    return None, clock() - started, attempts


def main(gateway, mechanism, first, count, seconds, lifetime, timeout, tries, ready):
    first, count, lifetime, tries = int(first), int(count), int(lifetime), int(tries)
    seconds, timeout, ready = float(seconds), float(timeout), float(ready)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((gateway, 5351))
    client = s.getsockname()[0]  # the source address the gateway sees
    if mechanism == "pcp":
        probe, probed = pcp_probe(client)
        result = pcp_result

        def build(port):  # a new random nonce for each mapping (RFC 6887 §11.1)
            return pcp_map(client, port, lifetime, os.urandom(12))
    else:
        probe, probed = natpmp_probe()
        result = natpmp_result

        def build(port):
            return natpmp_map(port, lifetime)
    up = time.monotonic() + ready
    while ask(s, probe, probed, 0.2, 1)[0] is None:
        if time.monotonic() > up:
            sys.exit(f"no {mechanism} answer from {gateway} within {ready} s")
    samples, timeouts = [], 0
    t0 = clock()
    deadline = t0 + seconds
    for port in range(first, first + count):
        begin = clock()
        if begin >= deadline:
            break
        request, answer = build(port)
        data, latency, again = ask(s, request, answer, timeout, tries)
        timeouts += again
        code = -1 if data is None else result(data)
        samples.append([round(begin - t0, 7), round(latency, 7), code])
    print(json.dumps({"timeouts": timeouts, "samples": samples}))


if __name__ == "__main__":
    main(*sys.argv[1:])
"""


class BenchError(RuntimeError):
    """A benchmark step did not do what it should; the message says what happened."""


# -- preloading the lease store ---------------------------------------------------------------


def load_ports(mechanism: Mechanism, requests: int) -> range:
    """igd: the internal ports one protocol's load asks for at each size (one range each)."""
    first = LOAD_FIRST_PORT + LOAD_MECHANISMS.index(mechanism) * requests
    return range(first, first + requests)


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
    mechanisms: tuple[Mechanism, ...] = LOAD_MECHANISMS
    miniupnpd_seconds: float = DEFAULT_MINIUPNPD_SECONDS
    miniupnpd_pcp_seconds: float | None = None  # None: as long as miniupnpd_seconds
    bucket: int = DEFAULT_BUCKET
    timeout: float = DEFAULT_TIMEOUT
    policy: Path | None = None
    prefix: str | None = None

    def miniupnpd_budget(self, mechanism: Mechanism) -> float:
        """Seconds of `mechanism`'s load against miniupnpd; 0 skips it."""
        if mechanism is Mechanism.PCP and self.miniupnpd_pcp_seconds is not None:
            return self.miniupnpd_pcp_seconds
        return self.miniupnpd_seconds


def run_load(
    lab: Lab, mechanism: Mechanism, first_port: int, count: int, seconds: float, timeout: float
) -> tuple[list[Sample], int]:
    """One protocol's load from lan1 against whichever gateway runs; (samples, retransmits)."""
    argv = [lab.gateway.address, mechanism.value, first_port, count, seconds, LIFETIME, timeout]
    argv += [TRIES, READY_TIMEOUT]
    # The script keeps to `seconds` itself (plus one request's retransmits); this limit is a
    # backstop, generous because on a busy machine (the kernel tearing down other namespaces)
    # a process started in a namespace was seen to run minutes late.
    limit = seconds + READY_TIMEOUT + timeout * 2**TRIES + 300
    proc = lab.python(lab.lan[0], ["-c", _LOAD, *map(str, argv)], check=False, timeout=limit)
    if proc.returncode != 0:
        raise BenchError(f"the {NAMES[mechanism]} load generator failed: {proc.stderr.strip()}")
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
    """A fresh igd-server over a store preloaded with `size` leases, then each protocol's load."""
    state = lab.workdir / f"state-{size}"
    # The preload keeps off every protocol's ports, whichever loads run.
    avoid = range(LOAD_FIRST_PORT, LOAD_FIRST_PORT + len(LOAD_MECHANISMS) * settings.requests)
    now = time.monotonic()
    policy = settings.policy or bench_policy()
    store = LeaseStore(state / "leases.sqlite")
    try:
        store.apply([], preload(size, preload_owners(lab), avoid, now=now), Clock(mono=now))
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
    loads: list[Load] = []
    held = size
    for mechanism in settings.mechanisms:
        ports = load_ports(mechanism, settings.requests)
        samples, timeouts = run_load(
            lab, mechanism, ports.start, len(ports), settings.seconds, settings.timeout
        )
        stats = summarize(samples)
        kernel = kernel_entries(lab)
        # A request never answered may still have been granted; every other one is exact.
        if not held + stats.ok <= kernel <= held + stats.ok + stats.lost:
            raise BenchError(
                f"{held} held + {stats.ok} {NAMES[mechanism]} granted ({stats.lost} unanswered),"
                f" but the kernel holds {kernel}"
            )
        loads.append(Load(mechanism, held, stats, timeouts, kernel))
        held = kernel
        say(
            f"igd {size:,} {NAMES[mechanism]}: {stats.rps:,.0f} req/s, p50 {stats.p50_ms:.2f} ms,"
            f" p99 {stats.p99_ms:.2f} ms, {stats.ok}/{stats.count} ok"
        )
    rss = memory_mb(proc.pid)
    say(f"igd {size:,}: RSS {rss:.0f} MB with {held:,} mappings")
    lab.stop_gateway()
    drop_table(lab, "ip", TABLE)
    return IgdRun(size, cold, warm, tuple(loads), rss)


def run_miniupnpd(
    lab: Lab,
    mechanism: Mechanism,
    settings: Settings,
    version: str,
    say: Callable[[str], None],
) -> MiniupnpdRun:
    """A fresh miniupnpd in the gateway and one protocol's load, for its time budget."""
    budget = settings.miniupnpd_budget(mechanism)
    # NAT-PMP on turns on its PCP server too (Debian builds it with PCP).
    with Miniupnpd(lab, MiniupnpdOptions(), name=f"miniupnpd-{mechanism.value}") as mini:
        say(f"miniupnpd {version} (pid {mini.pid}): {NAMES[mechanism]} load for {budget:.0f} s")
        samples, timeouts = run_load(
            lab, mechanism, MINIUPNPD_FIRST_PORT, MAX_MINIUPNPD_REQUESTS, budget, settings.timeout
        )
        rules = mini.rule_count()
    load = Load(mechanism, 0, summarize(samples), timeouts, rules)
    say(
        f"miniupnpd {NAMES[mechanism]}: {load.stats.ok:,} mappings in {load.stats.seconds:.0f} s,"
        f" {rules:,} rules in its chain"
    )
    return MiniupnpdRun(version, budget, load, tuple(buckets(samples, settings.bucket)))


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
    ports = len(LOAD_MECHANISMS) * settings.requests
    free = 2 * (LAST_PORT - FIRST_PORT + 1 - 2 - ports)
    if max(settings.sizes, default=0) > free or LOAD_FIRST_PORT + ports - 1 > LAST_PORT:
        raise BenchError(f"{settings.requests} requests leave room for a preload of {free}")
    wanted = [m for m in settings.mechanisms if settings.miniupnpd_budget(m) > 0]
    version = miniupnpd.version() if wanted else None
    note = "" if version else ("not installed" if wanted else "skipped")
    machine = Machine.here()
    prefix = settings.prefix or f"{PREFIX}{secrets.token_hex(3)}"
    # Both gateways run behind the public-looking WAN miniupnpd needs.
    with Lab(prefix, wan_hosts=1, lan_hosts=1, wan_network=PUBLIC_LOOKING_WAN) as lab:
        say(f"lab {lab.prefix} built (files in {lab.workdir})")
        runs = tuple(run_igd(lab, size, settings, say) for size in settings.sizes)
        mini = tuple(run_miniupnpd(lab, m, settings, version, say) for m in wanted if version)
    return Report(machine, settings.requests, settings.mechanisms, runs, mini, note)


def parse_mechanisms(text: str) -> tuple[Mechanism, ...]:
    """`natpmp,pcp` → the load's mechanisms, in the order they run; ValueError if unknown."""
    chosen = {Mechanism(word.strip()) for word in text.split(",")}
    if not chosen <= set(LOAD_MECHANISMS):
        raise ValueError(f"the load speaks {', '.join(LOAD_MECHANISMS)}")
    return tuple(m for m in LOAD_MECHANISMS if m in chosen)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark, print the report, write it to --output."""
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="preloaded table sizes, comma-separated (default %(default)s)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help="new mappings each load asks for at each size (default %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help="time limit of each load at each size (default %(default)s)",
    )
    parser.add_argument(
        "--mechanisms",
        default=",".join(LOAD_MECHANISMS),
        help="the loads to run at each size, NAT-PMP first (default %(default)s)",
    )
    parser.add_argument(
        "--miniupnpd-seconds",
        type=float,
        default=DEFAULT_MINIUPNPD_SECONDS,
        help="NAT-PMP load time against miniupnpd, 0 skips it (default %(default)s)",
    )
    parser.add_argument(
        "--miniupnpd-pcp-seconds",
        type=float,
        help="PCP load time against miniupnpd, 0 skips it (default: --miniupnpd-seconds)",
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
    try:
        mechanisms = parse_mechanisms(args.mechanisms)
    except ValueError:
        parser.error(f"--mechanisms: want some of {','.join(LOAD_MECHANISMS)}")
    if any(s < 0 for s in sizes) or args.requests < 1 or args.bucket < 1:
        parser.error("sizes must be >= 0, --requests and --bucket >= 1")
    if args.prefix is not None and not args.prefix.startswith(PREFIX):
        parser.error(f"--prefix must start with {PREFIX}")
    settings = Settings(
        sizes=sizes,
        requests=args.requests,
        seconds=args.seconds,
        mechanisms=mechanisms,
        miniupnpd_seconds=args.miniupnpd_seconds,
        miniupnpd_pcp_seconds=args.miniupnpd_pcp_seconds,
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
