"""`python -m lab.bench_flood`: igd-server under more NAT-PMP/PCP traffic than it can serve.

Two modes, each in its own namespace lab (traffic only to the lab gateway's LAN address):

- `flood`: one LAN source, then 100 sources, send NAT-PMP map requests unpaced from several
  processes for `--seconds`, while another LAN host (the well-behaved client) asks for a new
  mapping every 250 ms, alternately NAT-PMP and PCP, with RFC 6886's 250 ms first retransmit.
  Reported: the flood's rate, the good client's answers at the first and second send, the
  daemon's CPU time, what the kernel's guard (docs/nftables.md) dropped. With `--unguarded`
  the guard's rules are flushed first: what the same flood does without it.
- `overload`: 8, 32 and 128 clients (addresses of one LAN host), each with `--outstanding`
  map requests in flight, against a daemon restarted each time over a store of `--size`
  mappings. Reported: grants per second, timeouts, latency, the daemon's CPU time per grant
  (from /proc, steadier than grants/s on a shared machine) and the load generator's CPU.

Method and results: docs/performance.md ("Under flood and overload").
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from igd.server.store import POLICY_KEY, Clock, LeaseStore, file_digest
from lab import Lab, LabError
from lab.bench import (
    LIMITS,
    BenchError,
    bench_policy,
    drop_table,
    preload,
    preload_owners,
    start_daemon,
)

PREFIX = "igdflood"
TABLE = "igd"
FIRST_SOURCE = 100  # extra source addresses of the load host: .100, .101, ...
MAX_SOURCES = 140
DEFAULT_FLOOD_SECONDS = 10.0
DEFAULT_PROCESSES = 1  # one core floods, one is left to the daemon (2-core machine)
DEFAULT_CLIENTS = (8, 32, 128)
DEFAULT_OUTSTANDING = 4
DEFAULT_LOAD_SECONDS = 10.0
DEFAULT_SIZE = 10_000
PROBE_GAP = 0.25  # the good client's pause between requests: under 4 a second, within its
# fair share (nft_payload.FAIR_RATE); a client asking faster competes with the flood

# Unpaced NAT-PMP map requests (UDP, one internal port per source: each a renewal) from
# `procs` forked processes, the sources dealt out among them; bounded by `seconds`.
_FLOOD = r"""
import json, os, socket, struct, sys, time
gateway, base = sys.argv[1], sys.argv[2]
sources, seconds, procs = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
prefix = base.rsplit(".", 1)[0]
first = int(base.rsplit(".", 1)[1])
def flood(index, out):
    socks = []
    for i in range(index, sources, procs):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"{prefix}.{first + i}", 0))
        s.connect((gateway, 5351))
        s.setblocking(False)
        socks.append((s, struct.pack("!BBHHHI", 0, 1, 0, 40000 + i, 40000 + i, 3600)))
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(64):
            for s, wire in socks:
                try:
                    s.send(wire)
                    sent += 1
                except OSError:
                    pass
    os.write(out, f"{sent}\n".encode())
    os._exit(0)
r, w = os.pipe()
began = time.monotonic()
children = []
for index in range(min(procs, sources)):
    pid = os.fork()
    if pid == 0:
        flood(index, w)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
os.close(w)
counts = [int(x) for x in os.read(r, 1 << 16).split()]
print(json.dumps({"sent": sum(counts), "seconds": time.monotonic() - began}))
"""

# The well-behaved client: a new mapping every PROBE_GAP s, NAT-PMP and PCP in turn; each
# sent once, then again after 250 ms (RFC 6886 §3.1), then given up after 500 ms more.
_PROBE = r"""
import json, os, socket, struct, sys, time
gateway, seconds, gap = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((gateway, 5351))
client = s.getsockname()[0]
mapped = bytes(10) + b"\xff\xff"
results = {"natpmp": [0, 0, 0], "pcp": [0, 0, 0]}
end = time.monotonic() + seconds
port = 30000
while time.monotonic() < end:
    port += 1
    kind = "natpmp" if port % 2 else "pcp"
    if kind == "natpmp":
        wire = struct.pack("!BBHHHI", 0, 2, 0, port, port, 600)
        ok = lambda d: (len(d) >= 16 and d[:2] == b"\x00\x82" and d[8:10] == wire[4:6]
                        and d[2:4] == b"\x00\x00")
    else:
        nonce = os.urandom(12)
        wire = struct.pack("!BBHI16s12sB3xHH16s", 2, 1, 0, 600, mapped + socket.inet_aton(client),
                           nonce, 6, port, port, mapped + bytes(4))
        ok = lambda d: len(d) >= 60 and d[:2] == b"\x02\x81" and d[24:36] == nonce and d[3] == 0
    outcome = 2
    for attempt, wait in enumerate((0.25, 0.5)):
        s.send(wire)
        until = time.monotonic() + wait
        while (left := until - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data = s.recv(1100)
            except (TimeoutError, ConnectionRefusedError):
                break
            if ok(data):
                outcome = attempt
                break
        if outcome < 2:
            break
    results[kind][outcome] += 1
    time.sleep(gap)
print(json.dumps(results))
"""

# Overload: `clients` sockets (one source address each), each keeping `outstanding` NAT-PMP
# map requests for new internal ports in flight; an unanswered request is sent again after
# `timeout` s, up to 4 sends. Bounded by `seconds` plus a 2 s drain.
_LOAD = r"""
import json, select, socket, struct, sys, time
gateway, base, clients, outstanding, seconds, timeout = (sys.argv[1], sys.argv[2],
    int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
prefix, first = base.rsplit(".", 1)[0], int(base.rsplit(".", 1)[1])
clock = time.monotonic
poll = select.epoll()
socks, pending, next_port = {}, {}, {}
ok = refused = lost = resent = 0
latencies = []
def send_new(fd, now):
    port = next_port[fd]
    next_port[fd] = port + 1
    wire = struct.pack("!BBHHHI", 0, 2, 0, port, port, 3600)
    pending[fd][port] = [now, now, 1, wire]
    socks[fd].send(wire)
for i in range(clients):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((f"{prefix}.{first + i}", 0))
    s.connect((gateway, 5351))
    s.setblocking(False)
    socks[s.fileno()] = s
    pending[s.fileno()] = {}
    next_port[s.fileno()] = 20000
    poll.register(s.fileno(), select.EPOLLIN)
t0 = clock()
end = t0 + seconds
for fd in socks:
    for _ in range(outstanding):
        send_new(fd, t0)
last_scan = t0
while True:
    now = clock()
    if now >= end and (now >= end + 2 or not any(pending.values())):
        break
    for fd, _ in poll.poll(0.05):
        while True:
            try:
                data = socks[fd].recv(64)
            except BlockingIOError:
                break
            if len(data) < 16 or data[:2] != b"\x00\x82":
                continue
            port = struct.unpack("!H", data[8:10])[0]
            entry = pending[fd].pop(port, None)
            if entry is None:
                continue  # the answer to a retransmit already counted
            now = clock()
            if data[2:4] == b"\x00\x00":
                ok += 1
            else:
                refused += 1
            latencies.append(now - entry[0])
            if now < end:
                send_new(fd, now)
    now = clock()
    if now - last_scan >= 0.05:
        last_scan = now
        for fd, waiting in pending.items():
            for port, entry in list(waiting.items()):
                if now - entry[1] >= timeout * 2 ** (entry[2] - 1):
                    if entry[2] >= 4:
                        del waiting[port]
                        lost += 1
                        if now < end:
                            send_new(fd, now)
                    else:
                        entry[1], entry[2] = now, entry[2] + 1
                        resent += 1
                        socks[fd].send(entry[3])
latencies.sort()
def pct(q):
    return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0
print(json.dumps({"ok": ok, "refused": refused, "lost": lost, "resent": resent,
                  "seconds": seconds, "p50": pct(0.5), "p99": pct(0.99),
                  "cpu": time.process_time()}))
"""


@dataclass(frozen=True, slots=True)
class FloodResult:
    """One flood run."""

    sources: int
    guarded: bool
    sent: int
    seconds: float
    answers: dict[str, list[int]]
    """mechanism -> [answered at first send, at second send, not answered]."""
    cpu: float
    """Fraction of one core the daemon used during the flood."""
    dropped_source: int
    dropped_total: int

    @property
    def rate(self) -> float:
        return self.sent / self.seconds

    def success(self, mechanism: str) -> float:
        first, second, failed = self.answers[mechanism]
        asked = first + second + failed
        return (first + second) / asked if asked else 0.0


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One overload run."""

    clients: int
    outstanding: int
    ok: int
    refused: int
    lost: int
    resent: int
    seconds: float
    p50: float
    p99: float
    daemon_cpu: float
    """The daemon's CPU seconds (user + system) during the run."""
    load_cpu: float
    """The load generator's CPU seconds during the run."""

    @property
    def grants(self) -> float:
        return self.ok / self.seconds

    @property
    def cpu_per_grant(self) -> float:
        """The daemon's CPU seconds per grant."""
        return self.daemon_cpu / self.ok if self.ok else 0.0


def add_sources(lab: Lab, count: int) -> str:
    """Give the load host (lan1) `count` more addresses; the first of them."""
    if not 1 <= count <= MAX_SOURCES:
        raise BenchError(f"want 1 to {MAX_SOURCES} sources")
    host = lab.lan[0]
    prefix = lab.lan_network.prefixlen
    for i in range(count):
        address = lab.lan_network[FIRST_SOURCE + i]
        lab.run(host, ["ip", "addr", "add", f"{address}/{prefix}", "dev", host.interface])
    return str(lab.lan_network[FIRST_SOURCE])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ)


def guard_counters(lab: Lab) -> tuple[int, int]:
    """Packets to UDP 5351 the guard dropped: (per-source rule, total cap)."""
    proc = lab.run(lab.gateway, ["nft", "-j", "list", "chain", "ip", TABLE, "input"], check=False)
    if proc.returncode != 0:
        return 0, 0
    source = total = 0
    for item in json.loads(proc.stdout)["nftables"]:
        rule = item.get("rule")
        if rule is None or "5351" not in json.dumps(rule["expr"]):
            continue
        for expr in rule["expr"]:
            if "counter" in expr:
                if "pxp_over" in json.dumps(rule["expr"]):
                    source = expr["counter"]["packets"]
                else:
                    total = expr["counter"]["packets"]
    return source, total


def flood_once(
    lab: Lab, base: str, sources: int, seconds: float, processes: int, guarded: bool
) -> FloodResult:
    """One flood against the running daemon, with the good client on lan2 meanwhile."""
    proc = lab.gateway_process
    assert proc is not None
    if not guarded:
        lab.run(lab.gateway, ["nft", "flush", "chain", "ip", TABLE, "input"])
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    before = guard_counters(lab)
    cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
    argv = [lab.gateway.address, base, str(sources), str(seconds), str(processes)]
    flood = lab.python_popen(lab.lan[0], ["-c", _FLOOD, *argv], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(min(1.0, seconds / 5))  # the flood is under way before the client asks
        probe_seconds = max(1.0, seconds - 2 * min(1.0, seconds / 5) - 0.75)
        out = lab.python(
            lab.lan[1],
            ["-c", _PROBE, lab.gateway.address, str(probe_seconds), str(PROBE_GAP)],
            timeout=seconds + 60,
        ).stdout
        answers = json.loads(out)
        flood_out, _ = flood.communicate(timeout=seconds + 60)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.communicate()
    cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    sent = json.loads(flood_out)
    after = guard_counters(lab)
    return FloodResult(
        sources,
        guarded,
        int(sent["sent"]),
        float(sent["seconds"]),
        answers,
        cpu,
        after[0] - before[0],
        after[1] - before[1],
    )


def run_flood(args: argparse.Namespace, say: Callable[[str], None]) -> list[FloodResult]:
    """Flood runs: each source count, guarded (and unguarded if asked), a fresh daemon each."""
    results = []
    with Lab(prefix=args.prefix or f"{PREFIX}{secrets.token_hex(3)}") as lab:
        base = add_sources(lab, max(args.sources))
        config = lab.write_gateway_config(
            args.policy or bench_policy(), nftables={"table": TABLE, "on_stop": "flush"}
        )
        for guarded in (True, False) if args.unguarded else (True,):
            for sources in args.sources:
                start_daemon(lab, config)
                result = flood_once(lab, base, sources, args.seconds, args.processes, guarded)
                lab.stop_gateway()
                drop_table(lab, "ip", TABLE)
                say(
                    f"flood {sources} source(s), guard {'on' if guarded else 'off'}:"
                    f" {result.rate:,.0f} datagrams/s; good client NAT-PMP"
                    f" {result.answers['natpmp']}, PCP {result.answers['pcp']}"
                    f" (first, second, none); daemon CPU {result.cpu:.0%};"
                    f" kernel dropped {result.dropped_source:,} per source,"
                    f" {result.dropped_total:,} at the total cap"
                )
                results.append(result)
    return results


def run_overload(args: argparse.Namespace, say: Callable[[str], None]) -> list[LoadResult]:
    """For each client count: a fresh daemon over `size` preloaded leases, then the load."""
    results = []
    with Lab(prefix=args.prefix or f"{PREFIX}{secrets.token_hex(3)}") as lab:
        base = add_sources(lab, max(args.clients))
        policy = Path(args.policy or bench_policy())
        for clients in args.clients:
            state = lab.workdir / f"state-{clients}"
            now = time.monotonic()
            store = LeaseStore(state / "leases.sqlite")
            try:
                owners = preload_owners(lab)
                store.apply([], preload(args.size, owners, range(0), now=now), Clock(mono=now))
                store.set_meta(POLICY_KEY, file_digest(policy))
            finally:
                store.close()
            config = lab.write_gateway_config(
                policy,
                filename=f"overload-{clients}.toml",
                state={"directory": str(state)},
                limits=LIMITS,
                nftables={"table": TABLE, "on_stop": "flush"},
            )
            start_daemon(lab, config)
            proc = lab.gateway_process
            assert proc is not None
            cpu0 = cpu_seconds(proc.pid)
            argv = [lab.gateway.address, base, clients, args.outstanding, args.seconds, 1.0]
            out = lab.python(
                lab.lan[0], ["-c", _LOAD, *map(str, argv)], timeout=args.seconds + 120
            ).stdout
            daemon_cpu = cpu_seconds(proc.pid) - cpu0
            lab.stop_gateway()
            drop_table(lab, "ip", TABLE)
            data = json.loads(out)
            result = LoadResult(
                clients,
                args.outstanding,
                data["ok"],
                data["refused"],
                data["lost"],
                data["resent"],
                data["seconds"],
                data["p50"],
                data["p99"],
                daemon_cpu,
                data["cpu"],
            )
            say(
                f"overload {clients} clients x {args.outstanding}: {result.grants:,.0f} grants/s,"
                f" {result.resent} retransmits, {result.lost} lost, p50"
                f" {result.p50 * 1000:.1f} ms, p99 {result.p99 * 1000:.1f} ms; daemon CPU"
                f" {result.cpu_per_grant * 1e6:.0f} µs/grant ({daemon_cpu / result.seconds:.0%}"
                f" of a core), load generator {result.load_cpu / result.seconds:.0%} of a core"
            )
            results.append(result)
    return results


def flood_markdown(results: Sequence[FloodResult]) -> str:
    """The flood results as a markdown table."""
    lines = [
        "| sources | guard | flood datagrams/s | good NAT-PMP ok (1st+2nd send) |"
        " good PCP ok | daemon CPU | dropped per source | dropped at total cap |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        n, p = r.answers["natpmp"], r.answers["pcp"]
        lines.append(
            f"| {r.sources} | {'on' if r.guarded else 'off'} | {r.rate:,.0f} |"
            f" {n[0] + n[1]}/{sum(n)} ({r.success('natpmp'):.0%}) |"
            f" {p[0] + p[1]}/{sum(p)} ({r.success('pcp'):.0%}) | {r.cpu:.0%} |"
            f" {r.dropped_source:,} | {r.dropped_total:,} |"
        )
    return "\n".join(lines) + "\n"


def overload_markdown(results: Sequence[LoadResult], size: int) -> str:
    """The overload results as a markdown table, each row against the best."""
    peak = max((r.grants for r in results), default=0.0) or 1.0
    lines = [
        f"| clients x outstanding | grants/s at {size:,} | of peak | retransmits | lost |"
        " p50 ms | p99 ms | daemon CPU µs/grant | daemon CPU | load generator CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.clients} x {r.outstanding} | {r.grants:,.0f} | {r.grants / peak:.0%} |"
            f" {r.resent:,} | {r.lost:,} | {r.p50 * 1000:.1f} | {r.p99 * 1000:.1f} |"
            f" {r.cpu_per_grant * 1e6:.0f} | {r.daemon_cpu / r.seconds:.0%} |"
            f" {r.load_cpu / r.seconds:.0%} |"
        )
    return "\n".join(lines) + "\n"


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(word) for word in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one mode, print its markdown table."""
    parser = argparse.ArgumentParser(prog="python -m lab.bench_flood", description=__doc__)
    parser.add_argument("mode", choices=("flood", "overload"))
    parser.add_argument("--seconds", type=float, help="length of each run (flood 10, load 10)")
    parser.add_argument("--sources", type=_counts, default=(1, 100), help="flood: source counts")
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES, help="flooders")
    parser.add_argument("--unguarded", action="store_true", help="flood: also without guard")
    parser.add_argument("--clients", type=_counts, default=DEFAULT_CLIENTS, help="overload")
    parser.add_argument("--outstanding", type=int, default=DEFAULT_OUTSTANDING)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="preloaded mappings")
    parser.add_argument("--policy", type=Path, help="default: policies/bench.toml")
    parser.add_argument("--prefix", help=f"lab name (starts with {PREFIX})")
    parser.add_argument("--output", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = DEFAULT_FLOOD_SECONDS if args.mode == "flood" else DEFAULT_LOAD_SECONDS
    if not 1 <= args.seconds <= 60:
        parser.error("--seconds: 1 to 60")
    if args.prefix is not None and not args.prefix.startswith(PREFIX):
        parser.error(f"--prefix must start with {PREFIX}")
    counts = args.sources if args.mode == "flood" else args.clients
    if not all(1 <= n <= MAX_SOURCES for n in counts) or not 1 <= args.processes <= 8:
        parser.error(f"source and client counts 1 to {MAX_SOURCES}, processes 1 to 8")

    def say(line: str) -> None:
        print(f"bench_flood: {line}", file=sys.stderr, flush=True)

    try:
        if args.mode == "flood":
            text = flood_markdown(run_flood(args, say))
        else:
            text = overload_markdown(run_overload(args, say), args.size)
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        say(f"FAILED: {exc}")
        return 1
    print(text, end="", flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
