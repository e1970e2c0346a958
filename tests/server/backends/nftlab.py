"""Shared by the nftables kernel tests: mappings, listings, and their three-namespace topology
(built with the lab's namespace harness, lab/netns.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol, RemoteFilter
from igd.server.backends.nft_payload import COUNTERS
from lab.netns import add_veth, ip, sysctl
from tests.netns import Netns, netns_group

PREFIX = "igdnft"
LAN = IPv4Address("192.168.78.10")
OWNER = Owner(Mechanism.NATPMP, LAN)
NOW = 1000.0
GATEWAY_WAN = "203.0.113.1"
WAN2, WAN3 = "203.0.113.2", "203.0.113.3"


def mapping(
    port: int,
    *,
    protocol: Protocol = Protocol.TCP,
    remote: str | None = None,
    internal_port: int = 8080,
    lease: float = 3600.0,
    filters: tuple[RemoteFilter, ...] = (),
    peer_port: int = 0,
    address: str | None = None,
) -> Mapping:
    external = IPv4Address(address) if address else None
    key = MappingKey(protocol, port, IPv4Address(remote) if remote else None, external)
    return Mapping(
        key,
        LAN,
        internal_port,
        OWNER,
        NOW,
        NOW + lease,
        filters=tuple(sorted(filters)),
        peer_port=peer_port,
    )


def only(network: str, port: int = 0) -> RemoteFilter:
    return RemoteFilter(IPv4Network(network), port)


def ruleset(ns: Netns) -> list[dict[str, Any]]:
    """`nft -j list ruleset` inside the namespace, as a list of objects."""
    doc = json.loads(ns.run("nft", "-j", "list", "ruleset").stdout)
    return list(doc["nftables"])


def snapshot(ns: Netns) -> str:
    """The namespace's whole ruleset without the ever-decreasing `expires` of elements."""
    return re.sub(r', "expires": \d+', "", ns.run("nft", "-j", "list", "ruleset").stdout)


def timeouts(ns: Netns) -> dict[str, int | None]:
    """Element key (as 'tcp . 1') -> kernel timeout, for every set, from nft's JSON listing."""
    found: dict[str, int | None] = {}
    for obj in ruleset(ns):
        body = obj.get("map") or obj.get("set") or {}
        if body.get("name") in COUNTERS:
            continue  # keyed like the maps, never with a timeout
        for item in body.get("elem", []):
            key = item[0] if isinstance(item, list) else item
            elem = key.get("elem", {"val": key})
            found[" . ".join(map(str, elem["val"]["concat"]))] = elem.get("timeout")
    return found


def rules(ns: Netns) -> list[str]:
    """Text of the DNAT rules in our prerouting chain."""
    out = ns.run("nft", "list", "chain", "ip", "igd", "prerouting").stdout
    return [line.strip() for line in out.splitlines() if "dnat" in line]


# -- the data path: WAN hosts -> gateway (our table) -> LAN host ---------------------------

SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.create_server(("0.0.0.0", port))
    while True:
        c, peer = s.accept()
        c.sendall(f"{port} {peer[0]}\\n".encode())
        c.close()
for p in (8080, 8081):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = """
import socket, sys
src, dst = sys.argv[1], sys.argv[2]
port, wait, sport = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
try:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(wait)
    s.bind((src, sport))
    s.connect((dst, port))
    print(s.makefile().readline().strip())
except OSError as e:
    print("error", type(e).__name__)
"""

UDP = """
import socket, sys
mode, addr, port, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.settimeout(wait)
if mode == "send":  # send one datagram, print where the answer came from
    s.sendto(b"ping", (sys.argv[5], int(sys.argv[6])))
else:  # receive one datagram, answer it, print where it came from
    print("ready", flush=True)
try:
    data, (host, sport) = s.recvfrom(100)
    if mode != "send":
        s.sendto(b"pong", (host, sport))
    print(host, sport, data.decode())
except TimeoutError:
    print("timeout")
"""

FORWARD_DROP = """
table inet filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
    }
}
"""

ADMIN_MASQUERADE = """
table ip admin {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "ext0" masquerade
    }
}
"""


def lab_links(wan: Netns, gw: Netns, lan: Netns) -> None:
    """WAN 203.0.113.0/24 (gw .1, hosts .2 and .3) and LAN 192.168.78.0/24 (gw .1, host .10)."""
    add_veth(gw.name, "ext0", wan.name, "wan0")
    add_veth(gw.name, "int0", lan.name, "lan0")
    ip("addr", "add", "203.0.113.1/24", "dev", "ext0", ns=gw.name)
    ip("addr", "add", "192.168.78.1/24", "dev", "int0", ns=gw.name)
    ip("addr", "add", "203.0.113.2/24", "dev", "wan0", ns=wan.name)
    ip("addr", "add", "203.0.113.3/24", "dev", "wan0", ns=wan.name)
    ip("addr", "add", "192.168.78.10/24", "dev", "lan0", ns=lan.name)
    # Replies reach the WAN host through the gateway's conntrack (un-DNAT), so only the LAN
    # host needs a route: its default route via the gateway.
    ip("route", "add", "default", "via", "192.168.78.1", ns=lan.name)
    sysctl(gw.name, "net.ipv4.ip_forward", "1")


@dataclass
class Lab:
    """A WAN namespace (two hosts), the gateway and a LAN host, linked by veths."""

    wan: Netns
    gw: Netns
    lan: Netns

    def flush_conntrack(self) -> None:
        """Forget every flow: old ones would bypass the NAT chains under test."""
        self.gw.run("conntrack", "-F", check=False)

    def connect(
        self,
        src: str,
        port: int,
        *,
        dst: str = GATEWAY_WAN,
        sport: int = 0,
        ns: Netns | None = None,
        wait: float = 3,
    ) -> str:
        """TCP from src[:sport] to dst:port: the LAN server's "port peer" line, or the error."""
        self.flush_conntrack()
        argv = (sys.executable, "-c", CLIENT, src, dst, str(port), str(wait), str(sport))
        return (ns or self.wan).run(*argv).stdout.strip()

    def udp(
        self, sender: Netns, src: tuple[str, int], receiver: Netns, at: tuple[str, int],
        to: tuple[str, int], wait: float = 2,
    ) -> tuple[str, str]:  # fmt: skip
        """One datagram from src to `to`, received (or not) at `at` and answered: what the
        receiver saw ("host port ping" or "timeout") and what the sender got back."""
        listener = receiver.popen(sys.executable, "-c", UDP, "recv", *map(str, at), str(wait))
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            argv = ("send", *map(str, src), str(wait), *map(str, to))
            answer = sender.run(sys.executable, "-c", UDP, *argv).stdout.strip()
            seen = listener.communicate(timeout=wait + 5)[0].strip()
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        return seen, answer


@contextmanager
def lab() -> Iterator[Lab]:
    """The three namespaces, linked, with a TCP server on ports 8080 and 8081 of the LAN host."""
    with netns_group(PREFIX, 3) as (wan, gw, lan):
        lab_links(wan, gw, lan)
        server = lan.popen(sys.executable, "-c", SERVER)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            yield Lab(wan, gw, lan)
        finally:
            server.kill()
            try:
                server.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                pass
