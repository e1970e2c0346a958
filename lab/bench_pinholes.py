"""IPv6 pinholes: PCP MAP, UPnP AddPinhole and new inbound TCP flows, few and many pinholes.

`python -m lab.bench_pinholes [--pinholes 0 10000] [--requests 200] [--connects 200]
[--upnp 200] [--miniupnpd]`.
For each table size it builds a lab, seeds the lease store with that many pinholes (to other
LAN addresses), starts the daemon with `[ipv6] enabled` (start-up puts them all in the kernel
in one transaction), then from lan1 times PCP MAP renewals over IPv6 (each answered only once
the kernel and the store hold it), and from wan1 times TCP connects through lan1's pinhole
(each a new flow: a conntrack miss and one pinhole set lookup in the forward hook). Prints
one line per size: start-up restore time, and the median and 99th percentile of both.
With `--upnp N` it also times N UPnP AddPinhole requests over IPv6 from lan1, each for a new
pinhole (a new connection per request, as upnpc makes), and prints pinholes/s. With
`--miniupnpd` the same AddPinhole run goes against Debian's miniupnpd in its own lab (it
cannot be seeded: its pinholes live only in its chain's rule comments, so its sizes are the
pinholes the run itself adds).
Bounded: a fixed number of requests and connects, each with a timeout.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
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
me, gateway, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = PcpMapData(bytes(range(12)), 6, 8080, 0, IPv6Address(0))
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
count, first = int(sys.argv[5]), int(sys.argv[6])
service = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
times = []
for i in range(count):
    body = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
            ' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:AddPinhole xmlns:u="{service}"><RemoteHost></RemoteHost><RemotePort>0</RemotePort>'
            f'<InternalClient>{me}</InternalClient><InternalPort>{first + i}</InternalPort>'
            '<Protocol>6</Protocol><LeaseTime>3600</LeaseTime></u:AddPinhole></s:Body></s:Envelope>')
    start = time.perf_counter()
    conn = http.client.HTTPConnection(gateway, port, timeout=5.0)
    conn.request("POST", path, body.encode(), {"Content-Type": 'text/xml; charset="utf-8"',
                 "SOAPAction": f'"{service}#AddPinhole"'})
    answer = conn.getresponse().read()
    conn.close()
    times.append(time.perf_counter() - start)
    assert b"UniqueID>" in answer, answer[:400]
print(json.dumps(times))
"""


def upnp_times(lab: Lab, path: str, port: int, count: int, first: int = 10000) -> list[float]:
    """`count` AddPinhole round trips from lan1 over IPv6, each opening a new pinhole (internal
    ports from `first` on)."""
    lan1 = lab.lan[0]
    argv = ["-c", _UPNP, lab.gateway.address6, str(port), path, lan1.address6, str(count),
            str(first)]  # fmt: skip
    return list(json.loads(lab.python("lan1", argv, timeout=300).stdout))


def rate(times: list[float]) -> str:
    return f"{len(times) / sum(times):7.0f}/s" if times else "      -"


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


def percentiles(times: list[float]) -> str:
    ordered = sorted(times)
    median = ordered[len(ordered) // 2] * 1e6
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6
    return f"median {median:7.0f} us  p99 {p99:7.0f} us"


def run(count: int, requests: int, connects: int, upnp: int = 0) -> str:
    with Lab() as lab:
        (lab.workdir / "state").mkdir(mode=0o700, exist_ok=True)
        seed(lab, count)
        six = {
            "enabled": True,
            "max_pinholes": max(16384, count + upnp + 100),
        }
        config = lab.write_gateway_config(
            POLICY, ipv6=six, upnp={"enabled": bool(upnp), "http_port": UPNP_PORT}
        )
        service = lab.python_popen("lan1", ["-c", _SERVICE], stdout=subprocess.PIPE, text=True)
        assert service.stdout is not None and service.stdout.readline().strip() == "ready"
        lab.start_gateway(config)
        deadline = time.monotonic() + 60
        ready = "igd-server ready"
        while "restored" not in lab.gateway_log() or ready not in lab.gateway_log():
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start:\n" + lab.gateway_log())
            time.sleep(0.1)
        log = lab.gateway_log()
        restored = re.search(r"restored (\d+) of (\d+) persisted pinholes", log)
        lan1 = lab.lan[0]
        argv = ["-c", _PCP, lan1.address6, lab.gateway.address6, str(requests)]
        pcp_times = json.loads(lab.python("lan1", argv, timeout=120).stdout)
        argv = ["-c", _CONNECT, lan1.address6, str(connects)]
        connect_times = json.loads(lab.python("wan1", argv, timeout=120).stdout)
        kept = restored.group(1) if restored else "?"
        line = (
            f"{count:>6} pinholes (restored {kept}):  PCP MAP {percentiles(pcp_times)}"
            f"  |  new TCP flow {percentiles(connect_times)}"
        )
        if upnp:
            token = re.search(r"serving version \S+ at /(\w+)/", lab.gateway_log())
            assert token is not None, lab.gateway_log()
            times = upnp_times(lab, f"/{token.group(1)}/igd2/ctl/WANIPv6FC", UPNP_PORT, upnp)
            line += f"  |  UPnP AddPinhole {percentiles(times)} {rate(times)}"
        return line


MINIUPNPD_FILL_SECONDS = 120.0
"""Time miniupnpd gets to reach each size (it slows as its chain grows)."""
FILL_BATCH = 1000


def run_miniupnpd(sizes: list[int], upnp: int) -> list[str]:
    """AddPinhole against Debian's miniupnpd (pinholes enabled), in a lab of its own: filled
    over UPnP to each size (bounded in time), then `upnp` more timed."""
    lines = []
    with Lab(wan_network=PUBLIC_LOOKING_WAN) as lab:
        options = MiniupnpdOptions(natpmp=False, upnp=True, http_port=UPNP_PORT)
        with Miniupnpd(lab, options):
            added = 0
            for size in sorted(sizes):
                deadline = time.monotonic() + MINIUPNPD_FILL_SECONDS
                while added < size and time.monotonic() < deadline:
                    batch = min(FILL_BATCH, size - added)
                    upnp_times(lab, "/ctl/IP6FCtl", UPNP_PORT, batch, first=1024 + added)
                    added += batch
                times = upnp_times(lab, "/ctl/IP6FCtl", UPNP_PORT, upnp, first=1024 + added)
                added += upnp
                chain = ["nft", "list", "chain", "inet", "filter", "miniupnpd"]
                # 2.3.1 writes one rule per pinhole, matching the raw IPv6 header bytes.
                rules = lab.run(lab.gateway, chain, timeout=120).stdout.count("@nh,192,128")
                lines.append(
                    f"miniupnpd {version()} at {added - upnp:>6} pinholes ({rules} rules after):"
                    f"  UPnP AddPinhole {percentiles(times)} {rate(times)}"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pinholes", type=int, nargs="+", default=[0, 10000])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--upnp", type=int, default=0, help="AddPinhole requests per size")
    parser.add_argument("--miniupnpd", action="store_true", help="also against miniupnpd")
    args = parser.parse_args()
    for count in args.pinholes:
        print(run(count, args.requests, args.connects, args.upnp), flush=True)
    if args.miniupnpd:
        for line in run_miniupnpd(args.pinholes, args.upnp or 200):
            print(line, flush=True)


if __name__ == "__main__":
    main()
