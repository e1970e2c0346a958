"""IPv6 pinholes: PCP and UPnP pinholes/s, PCP renewals, new inbound flows, few and many pinholes.

`python -m lab.bench_pinholes [--pinholes 0 10000 50000] [--upnp 2000] [--pcp 2000]
[--clients 4] [--miniupnpd [SIZE ...]]` (the other options: `--help`).
For each table size it builds a lab, seeds the lease store with that many pinholes (to other
LAN addresses), starts the daemon with `[ipv6] enabled` (start-up puts them all in the kernel
in one transaction) and the per-client rate limit off, then from lan1:
- times `--requests` PCP MAP renewals of one pinhole, one after another (latency);
- from wan1, `--connects` TCP connects through it (each a new flow: latency);
- `--upnp` UPnP AddPinhole requests, each for a new pinhole, a new HTTP connection each (as
  upnpc makes), from `--clients` processes at once (one Python client saturates before the
  gateway does): pinholes/s over the wall-clock time, and the daemon's CPU time per request;
- `--pcp` PCP MAP requests for new pinholes the same way;
- `--flood-repeats` bounded UDP floods of `--flood-seconds` from wan1 (`--senders` processes,
  disjoint source ports) to a UDP pinhole of lan1, each datagram from the next source port
  (a new flow; hping3 has no IPv6, so raw-socket senders), counted on arrival by an nftables
  rule on lan1; conntrack flushed before each; new flows/s admitted (median), and the share
  of the datagrams sent that arrived (100 %: the senders, not the gateway, set the pace).
With `--miniupnpd`, the same AddPinhole run (same clients) against Debian's miniupnpd in a lab
of its own, filled over UPnP towards each size with `--fill-seconds` per size; it stops at the
first size it does not reach (its line says how many pinholes it held). It cannot be seeded:
its pinholes exist only as rules in its chain.
Prints a markdown row per size as it goes, then the table and the verdicts (flat cost:
50,000 vs 0 at least 0.9x; at least 20x miniupnpd's rate at its largest size).
Bounded: a fixed number of requests, connects and datagrams, each with a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Network
from pathlib import Path

from igd.model import Mechanism, Protocol
from igd.pinhole import Pinhole, PinholeKey, PinholeOwner
from igd.server.pinhole_store import PinholeStore
from igd.server.store import Clock
from lab import Lab
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions, version

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policies" / "bench.toml"
PORT = 8080
UPNP_PORT = 5000

_SERVICE = """
import socket
server = socket.create_server(("::", 8080), family=socket.AF_INET6, backlog=512)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.close()
"""

_PCP = """
import json, socket, sys, time
from ipaddress import IPv6Address
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpRequest
me, gateway, count, protocol = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = PcpMapData(bytes(range(12)), protocol, 8080, 0, IPv6Address(0))
wire = pcp.encode_request(PcpRequest(PcpOpcode.MAP, 3600, IPv6Address(me), data))
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((me, 0))
s.settimeout(2.0)
times = []
for _ in range(count):
    start = time.perf_counter()
    s.sendto(wire, (gateway, 5351))
    reply = s.recv(2048)
    times.append(time.perf_counter() - start)
    assert pcp.decode_response(reply).result == 0, reply
print(json.dumps(times))
"""

_CONNECT = """
import json, socket, sys, time
target, count = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(count):
    start = time.perf_counter()
    with socket.create_connection((target, 8080), timeout=2.0):
        times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


_UPNP = """
import http.client, json, sys, time
gateway, port, path, me = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count, first, start_at = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
service = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
head = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
        ' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:AddPinhole xmlns:u="{service}"><RemoteHost></RemoteHost><RemotePort>0</RemotePort>'
        f'<InternalClient>{me}</InternalClient><InternalPort>')
tail = ('</InternalPort><Protocol>6</Protocol><LeaseTime>3600</LeaseTime></u:AddPinhole>'
        '</s:Body></s:Envelope>')
headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service}#AddPinhole"'}
bodies = [f"{head}{first + i}{tail}".encode() for i in range(count)]
time.sleep(max(0.0, start_at - time.time()))
began = time.time()
times = []
for body in bodies:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(gateway, port, timeout=10.0)
    conn.request("POST", path, body, headers)
    answer = conn.getresponse().read()
    conn.close()
    times.append(time.perf_counter() - start)
    assert b"UniqueID>" in answer, answer[:400]
print(json.dumps({"start": began, "end": time.time(), "times": times}))
"""

_PCP_NEW = """
import json, socket, sys, time
from ipaddress import IPv6Address
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpRequest
me, gateway, count, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start_at = float(sys.argv[5])
wires = [pcp.encode_request(PcpRequest(PcpOpcode.MAP, 3600, IPv6Address(me),
         PcpMapData(bytes(range(12)), 6, first + i, 0, IPv6Address(0)))) for i in range(count)]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((me, 0))
s.settimeout(5.0)
time.sleep(max(0.0, start_at - time.time()))
began = time.time()
times = []
for wire in wires:
    start = time.perf_counter()
    s.sendto(wire, (gateway, 5351))
    reply = s.recv(2048)
    times.append(time.perf_counter() - start)
    assert pcp.decode_response(reply).result == 0, reply
print(json.dumps({"start": began, "end": time.time(), "times": times}))
"""

_FLOOD = """
import errno, json, socket, struct, sys, time
me, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
seconds, first, last = float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
start_at = float(sys.argv[7])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 6)  # the kernel fills the UDP checksum
s.bind((me, 0))
payload = b"x" * 18
datagrams = [struct.pack("!HHHH", p, port, 8 + len(payload), 0) + payload
             for p in range(first, last)]
address = (target, 0)
send = s.sendto
sent = 0
time.sleep(max(0.0, start_at - time.time()))
began = time.perf_counter()
deadline = began + seconds
for datagram in datagrams:
    try:
        send(datagram, address)
    except OSError as error:
        if error.errno != errno.ENOBUFS:
            raise
        continue
    sent += 1
    if not sent & 255 and time.perf_counter() >= deadline:
        break
print(json.dumps({"sent": sent, "seconds": time.perf_counter() - began}))
"""

SINK6 = f"""
table ip6 sink
delete table ip6 sink
table ip6 sink {{
  chain prerouting {{ type filter hook prerouting priority raw; policy accept;
    udp dport {PORT} counter notrack drop
  }}
}}
"""
"""On lan1: count the datagrams that reach the pinholed UDP port, drop them at once."""
FIRST_SOURCE_PORT = 1024
FLOOD_SECONDS = 0.5
FLOOD_REPEATS = 3
LIMITS = {"requests_per_second_per_client": 1_000_000, "burst_per_client": 1_000_000}
"""The per-client rate limit off: every request of the run comes from lan1."""


@dataclass(frozen=True, slots=True)
class Run:
    """One parallel run: requests answered, wall-clock seconds, each round trip's time."""

    count: int
    seconds: float
    times: tuple[float, ...]

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def parallel(lab: Lab, host: str, argvs: list[list[str]]) -> Run:
    """Run these client scripts at once in `host` (each waits for a common start time, so
    interpreter start-up is not timed); requests over the time from the first start to the
    last end."""
    procs = [
        lab.python_popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}): {err[-2000:]}")
        results.append(json.loads(out))
    times = tuple(t for r in results for t in r["times"])
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return Run(len(times), seconds, times)


def split(count: int, clients: int) -> list[tuple[int, int]]:
    """(offset, how many) for each client: `count` requests shared out."""
    share, extra = divmod(count, clients)
    parts, offset = [], 0
    for i in range(clients):
        n = share + (1 if i < extra else 0)
        if n:
            parts.append((offset, n))
        offset += n
    return parts


def upnp_run(lab: Lab, path: str, port: int, count: int, first: int, clients: int) -> Run:
    """`count` AddPinhole requests from lan1 over IPv6, each opening a new pinhole (internal
    ports from `first` on), from `clients` processes at once, a new connection each."""
    lan1 = lab.lan[0]
    start_at = time.time() + STARTUP
    argvs = [
        ["-c", _UPNP, lab.gateway.address6, str(port), path, lan1.address6, str(n),
         str(first + offset), repr(start_at)]
        for offset, n in split(count, clients)
    ]  # fmt: skip
    return parallel(lab, "lan1", argvs)


def pcp_run(lab: Lab, count: int, first: int, clients: int) -> Run:
    """`count` PCP MAP requests from lan1 over IPv6, each opening a new pinhole."""
    lan1 = lab.lan[0]
    start_at = time.time() + STARTUP
    argvs = [
        ["-c", _PCP_NEW, lan1.address6, lab.gateway.address6, str(n), str(first + offset),
         repr(start_at)]
        for offset, n in split(count, clients)
    ]  # fmt: skip
    return parallel(lab, "lan1", argvs)


STARTUP = 1.5
"""Seconds the clients get to start before the common start time."""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process `pid` (all its threads) has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flows(lab: Lab, seconds: float, senders: int) -> tuple[float, bool, float]:
    """One bounded UDP flood from wan1 to lan1's pinholed port, each datagram from the next
    source port (a new flow); datagrams that reached lan1 per second, whether the source
    ports ran out (the rate is then a lower bound), and the share of those sent that arrived
    (near 1: the sender, not the gateway, set the pace)."""
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    lab.run(lab.lan[0], ["nft", "-f", "-"], input=SINK6)
    time.sleep(0.05)
    start_at = time.time() + STARTUP
    procs = []
    for offset, n in split(65536 - FIRST_SOURCE_PORT, senders):
        first = FIRST_SOURCE_PORT + offset
        argv = ["-c", _FLOOD, lab.wan[0].address6, lab.lan[0].address6, str(PORT),
                repr(seconds), str(first), str(first + n), repr(start_at)]  # fmt: skip
        procs.append(lab.python_popen("wan1", argv, stdout=subprocess.PIPE, text=True))
    results = [json.loads(proc.communicate(timeout=seconds + 30)[0]) for proc in procs]
    sent = sum(r["sent"] for r in results)
    elapsed = max(r["seconds"] for r in results)
    time.sleep(0.05)  # the last datagrams in flight
    out = lab.run(lab.lan[0], ["nft", "-j", "list", "table", "ip6", "sink"]).stdout
    arrived = 0
    for obj in json.loads(out)["nftables"]:
        for expr in obj.get("rule", {}).get("expr", []):
            if "counter" in expr:
                arrived = int(expr["counter"]["packets"])
    exhausted = sent >= (65536 - FIRST_SOURCE_PORT) * 0.95
    return arrived / elapsed, exhausted, arrived / max(1, sent)


def seed(lab: Lab, count: int) -> None:
    """`count` pinholes in the lease store, to addresses of the LAN prefix other than lan1's."""
    store = PinholeStore(lab.workdir / "state" / "leases.sqlite")
    now = time.monotonic()
    lan = IPv6Network(f"{lab.gateway.address6}/64", strict=False)
    holes = []
    for i in range(count):
        address = lan[0x10000 + i // 50]
        key = PinholeKey(address, Protocol.TCP, 2000 + i % 50)
        owner = PinholeOwner(Mechanism.PCP, address, bytes(12))
        holes.append(Pinhole(key, owner, now, now + 3600))
    store.replace_all(holes, Clock(mono=now))
    store.close()


@dataclass(frozen=True, slots=True)
class Size:
    """What one gateway did with `pinholes` pinholes in its table."""

    gateway: str
    pinholes: int
    upnp: Run | None
    upnp_cpu: float | None
    """Gateway CPU seconds per AddPinhole."""
    pcp: Run | None = None
    pcp_cpu: float | None = None
    renew: tuple[float, ...] = ()
    connect: tuple[float, ...] = ()
    flows: tuple[float, ...] = ()
    exhausted: bool = False
    arrived: tuple[float, ...] = ()
    """Per flood, the share of the datagrams sent that reached lan1."""
    restored: int | None = None
    """Seeded pinholes the daemon put back in the kernel at start."""


def run(count: int, options: argparse.Namespace) -> Size:
    """igd-server with `count` pinholes seeded: PCP renewals, new TCP flows, UPnP and PCP
    pinholes/s, new UDP flows/s."""
    upnp, pcp_new = options.upnp, options.pcp
    with Lab() as lab:
        (lab.workdir / "state").mkdir(mode=0o700, exist_ok=True)
        seed(lab, count)
        six = {"enabled": True, "max_pinholes": max(16384, count + upnp + pcp_new + 100)}
        config = lab.write_gateway_config(
            POLICY,
            ipv6=six,
            upnp={"enabled": bool(upnp), "http_port": UPNP_PORT},
            limits=LIMITS,
        )
        service = lab.python_popen("lan1", ["-c", _SERVICE], stdout=subprocess.PIPE, text=True)
        assert service.stdout is not None and service.stdout.readline().strip() == "ready"
        daemon = lab.start_gateway(config)
        deadline = time.monotonic() + 120
        ready = "igd-server ready"
        while "restored" not in lab.gateway_log() or ready not in lab.gateway_log():
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start:\n" + lab.gateway_log())
            time.sleep(0.1)
        restored = re.search(r"restored (\d+) of (\d+) persisted pinholes", lab.gateway_log())
        lan1 = lab.lan[0]
        renew: list[float] = []
        if options.requests:
            argv = ["-c", _PCP, lan1.address6, lab.gateway.address6, str(options.requests), "6"]
            renew = json.loads(lab.python("lan1", argv, timeout=120).stdout)
        connect: list[float] = []
        if options.connects:
            argv = ["-c", _CONNECT, lan1.address6, str(options.connects)]
            connect = json.loads(lab.python("wan1", argv, timeout=120).stdout)
        upnp_result = upnp_cpu = pcp_result = pcp_cpu = None
        if upnp:
            token = re.search(r"serving version \S+ at /(\w+)/", lab.gateway_log())
            assert token is not None, lab.gateway_log()
            path = f"/{token.group(1)}/igd2/ctl/WANIPv6FC"
            before = cpu_seconds(daemon.pid)
            upnp_result = upnp_run(lab, path, UPNP_PORT, upnp, UPNP_FIRST, options.clients)
            upnp_cpu = (cpu_seconds(daemon.pid) - before) / upnp
        if pcp_new:
            before = cpu_seconds(daemon.pid)
            pcp_result = pcp_run(lab, pcp_new, PCP_FIRST, options.clients)
            pcp_cpu = (cpu_seconds(daemon.pid) - before) / pcp_new
        rates: list[float] = []
        shares: list[float] = []
        exhausted = False
        if options.flood_repeats:
            # The UDP pinhole the flood goes through.
            argv = ["-c", _PCP, lan1.address6, lab.gateway.address6, "1", "17"]
            lab.python("lan1", argv, timeout=30)
            for _ in range(options.flood_repeats):
                flow_rate, out, share = flows(lab, options.flood_seconds, options.senders)
                rates.append(flow_rate)
                shares.append(share)
                exhausted |= out
        return Size("igd", count, upnp_result, upnp_cpu, pcp_result, pcp_cpu, tuple(renew),
                    tuple(connect), tuple(rates), exhausted, tuple(shares),
                    int(restored.group(1)) if restored else None)  # fmt: skip


UPNP_FIRST = 10_000
"""Internal ports of the timed AddPinhole requests count up from here (igd-server)."""
PCP_FIRST = 40_000
"""Internal ports of the timed PCP pinholes count up from here."""
MINIUPNPD_FILL_SECONDS = 150.0
"""Time miniupnpd gets to grow to each size (it slows as its chain grows)."""
FILL_BATCH = 250


def run_miniupnpd(sizes: list[int], count: int, clients: int, budget: float) -> list[Size]:
    """AddPinhole against Debian's miniupnpd (pinholes enabled), in a lab of its own: filled
    over UPnP towards each size (`budget` seconds per size), then `count` more timed, the
    same way as igd-server's; stops at the first size it cannot reach."""
    sizes_out = []
    with Lab(wan_network=PUBLIC_LOOKING_WAN) as lab:
        options = MiniupnpdOptions(natpmp=False, upnp=True, http_port=UPNP_PORT, ipv6=True)
        with Miniupnpd(lab, options) as mini:
            assert mini.pid is not None
            added = 0
            for size in sorted(sizes):
                deadline = time.monotonic() + budget
                while added < size and time.monotonic() < deadline:
                    batch = min(FILL_BATCH, size - added)
                    upnp_run(lab, "/ctl/IP6FCtl", UPNP_PORT, batch, 1024 + added, clients)
                    added += batch
                before = cpu_seconds(mini.pid)
                timed = upnp_run(lab, "/ctl/IP6FCtl", UPNP_PORT, count, 1024 + added, clients)
                cpu = (cpu_seconds(mini.pid) - before) / count
                sizes_out.append(Size(f"miniupnpd {version()}", added, timed, cpu))
                added += count
                if added - count < size:
                    break  # the budget ran out before this size: larger ones are further
    return sizes_out


def _us(value: float) -> str:
    return f"{value * 1e6:,.0f} µs"


def _median(times: Sequence[float]) -> str:
    return _us(statistics.median(times)) if times else "-"


def _p99(times: Sequence[float]) -> str:
    if not times:
        return "-"
    ordered = sorted(times)
    return _us(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))])


def _rate(run: Run | None) -> str:
    return f"{run.rate:,.0f}" if run is not None and run.count else "-"


def _share(values: Sequence[float]) -> str:
    return f"{min(values):.0%} to {max(values):.0%}" if values else "-"


def _cpu(value: float | None) -> str:
    return _us(value) if value is not None else "-"


def markdown(igd: Sequence[Size], mini: Sequence[Size]) -> str:
    """The tables of docs/performance.md and the verdicts."""
    lines = [
        "| gateway | pinholes | UPnP AddPinhole/s | median | p99 | gateway CPU per AddPinhole"
        " | PCP new pinholes/s | gateway CPU per PCP MAP | PCP renewal median | p99"
        " | new TCP flow median | new UDP flows/s (median) | of those sent |",
        "| --- " + "| ---: " * 12 + "|",
    ]
    for size in [*igd, *mini]:
        upnp_times = size.upnp.times if size.upnp is not None else ()
        flows = f"{statistics.median(size.flows):,.0f}" if size.flows else "-"
        if size.flows and size.exhausted:
            flows = "≥ " + flows
        lines.append(
            f"| {size.gateway} | {size.pinholes:,} | {_rate(size.upnp)} | {_median(upnp_times)}"
            f" | {_p99(upnp_times)} | {_cpu(size.upnp_cpu)} | {_rate(size.pcp)}"
            f" | {_cpu(size.pcp_cpu)} | {_median(size.renew)} | {_p99(size.renew)}"
            f" | {_median(size.connect)} | {flows} | {_share(size.arrived)} |"
        )
    lines.append("")
    by_size = {s.pinholes: s for s in igd}
    if 0 in by_size and len(by_size) > 1:
        largest = by_size[max(by_size)]
        first = by_size[0]
        for name, a, b in (
            ("UPnP AddPinhole/s", first.upnp, largest.upnp),
            ("PCP new pinholes/s", first.pcp, largest.pcp),
        ):
            if a is not None and b is not None and a.rate:
                ratio = b.rate / a.rate
                verdict = "met" if ratio >= 0.9 else "NOT met"
                lines.append(f"- flat cost, {name}: {largest.pinholes:,} vs 0 = {ratio:.2f}x"
                             f" (target ≥ 0.9x): {verdict}")  # fmt: skip
        for name, cpu0, cpu1 in (
            ("AddPinhole", first.upnp_cpu, largest.upnp_cpu),
            ("PCP MAP", first.pcp_cpu, largest.pcp_cpu),
        ):
            if cpu0 and cpu1:
                # The rate a core can sustain is 1 / CPU per request: ≥ 0.9x is ≤ 1/0.9.
                ratio = cpu1 / cpu0
                verdict = "met" if ratio <= 1 / 0.9 else "NOT met"
                lines.append(
                    f"- flat cost, gateway CPU per {name}: {largest.pinholes:,} vs 0 ="
                    f" {ratio:.2f}x (target ≤ 1.11x, load-independent): {verdict}"
                )
        if first.flows and largest.flows:
            ratio = statistics.median(largest.flows) / statistics.median(first.flows)
            verdict = "met" if ratio >= 0.9 else "NOT met"
            lines.append(f"- new UDP flows/s: {largest.pinholes:,} vs 0 = {ratio:.2f}x"
                         f" (target ≥ 0.9x): {verdict}")  # fmt: skip
    if mini and igd:
        top = max(mini, key=lambda s: s.pinholes)
        peers = [s for s in igd if s.pinholes >= top.pinholes and s.upnp is not None]
        if top.upnp is not None and top.upnp.rate and peers:
            peer = min(peers, key=lambda s: s.pinholes)
            assert peer.upnp is not None
            ratio = peer.upnp.rate / top.upnp.rate
            verdict = "met" if ratio >= 20 else "NOT met"
            lines.append(
                f"- vs miniupnpd at its largest size ({top.pinholes:,} pinholes): igd-server at"
                f" {peer.pinholes:,} adds {ratio:.1f}x as many pinholes/s (target ≥ 20x):"
                f" {verdict}"
            )
            if peer.upnp_cpu and top.upnp_cpu:
                lines.append(
                    f"- CPU per AddPinhole (load on the shared machine does not change it):"
                    f" miniupnpd at {top.pinholes:,} spends {top.upnp_cpu / peer.upnp_cpu:.1f}x"
                    f" what igd-server at {peer.pinholes:,} does"
                )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (the tests run small sizes through it too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pinholes", type=int, nargs="+", default=[0, 10000, 50000])
    parser.add_argument("--requests", type=int, default=200, help="PCP renewals (latency)")
    parser.add_argument("--connects", type=int, default=200, help="new TCP connections")
    parser.add_argument("--upnp", type=int, default=2000, help="AddPinhole requests per size")
    parser.add_argument("--pcp", type=int, default=2000, help="new PCP pinholes per size")
    parser.add_argument("--clients", type=int, default=4, help="client processes at once")
    parser.add_argument("--flood-seconds", type=float, default=FLOOD_SECONDS)
    parser.add_argument("--flood-repeats", type=int, default=FLOOD_REPEATS)
    parser.add_argument("--senders", type=int, default=2, help="flood processes at once")
    sizes_help = "also miniupnpd, filled to these sizes (none given: 0 2000 4000 8000)"
    parser.add_argument("--miniupnpd", type=int, nargs="*", metavar="SIZE", help=sizes_help)
    parser.add_argument("--miniupnpd-requests", type=int, default=100)
    parser.add_argument("--fill-seconds", type=float, default=MINIUPNPD_FILL_SECONDS)
    return parser


def main() -> None:
    options = parser().parse_args()
    if options.upnp + UPNP_FIRST > PCP_FIRST or options.pcp + PCP_FIRST > 65536:
        raise SystemExit("--upnp at most 30000, --pcp at most 25536 (internal ports)")
    igd = []
    for count in options.pinholes:
        size = run(count, options)
        igd.append(size)
        print(markdown([size], []).splitlines()[2], flush=True)
    mini: list[Size] = []
    if options.miniupnpd is not None:
        sizes = options.miniupnpd or [0, 2000, 4000, 8000]
        mini = run_miniupnpd(sizes, options.miniupnpd_requests, options.clients,
                             options.fill_seconds)  # fmt: skip
    print(
        f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux"
        f" {platform.release()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print(markdown(igd, mini), flush=True)


if __name__ == "__main__":
    main()
