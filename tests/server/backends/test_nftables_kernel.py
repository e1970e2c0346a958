"""The nftables backend against the real kernel, in throwaway namespaces (root only)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

import pytest

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.server.backends import BackendError, KernelEntry, ReconcileReport
from igd.server.backends.nftables import NftablesBackend
from tests.netns import Netns, netns, netns_group

pytestmark = pytest.mark.lab

PREFIX = "igdnft"
LAN = IPv4Address("192.168.78.10")
OWNER = Owner(Mechanism.NATPMP, LAN)
NOW = 1000.0


def mapping(
    port: int,
    *,
    protocol: Protocol = Protocol.TCP,
    remote: str | None = None,
    internal_port: int = 8080,
    lease: float = 3600.0,
) -> Mapping:
    key = MappingKey(protocol, port, IPv4Address(remote) if remote else None)
    return Mapping(key, LAN, internal_port, OWNER, NOW, NOW + lease)


def ruleset(ns: Netns) -> list[dict[str, Any]]:
    """`nft -j list ruleset` inside the namespace, as a list of objects."""
    doc = json.loads(ns.run("nft", "-j", "list", "ruleset").stdout)
    return list(doc["nftables"])


def snapshot(ns: Netns) -> str:
    """The namespace's whole ruleset without the ever-decreasing `expires` of elements."""
    return re.sub(r', "expires": \d+', "", ns.run("nft", "-j", "list", "ruleset").stdout)


def timeouts(ns: Netns) -> dict[str, int | None]:
    """Element key (as 'tcp . 1') -> kernel timeout, straight from nft's JSON listing."""
    found: dict[str, int | None] = {}
    for obj in ruleset(ns):
        for key, _ in obj.get("map", {}).get("elem", []):
            elem = key.get("elem", {"val": key})
            found[" . ".join(map(str, elem["val"]["concat"]))] = elem.get("timeout")
    return found


def rules(ns: Netns) -> list[str]:
    """Text of the rules in our prerouting chain."""
    out = ns.run("nft", "list", "chain", "ip", "igd", "prerouting").stdout
    return [line.strip() for line in out.splitlines() if "dnat" in line]


@pytest.fixture
def gw() -> Iterator[Netns]:
    with netns(PREFIX) as ns:
        yield ns


@pytest.fixture
async def backend(gw: Netns) -> AsyncIterator[NftablesBackend]:
    b = NftablesBackend("igd", "wan0", netns=gw.name)
    await b.open()
    yield b
    await b.close(flush=False)


async def test_open_is_idempotent_and_keeps_elements(gw: Netns, backend: NftablesBackend) -> None:
    a, b = mapping(1), mapping(2, remote="203.0.113.2")
    await backend.apply([], [a, b], now=NOW)
    await backend.open()
    # A restarted daemon: new backend, same table.
    again = NftablesBackend("igd", "wan0", netns=gw.name)
    await again.open()
    assert await again.entries() == {KernelEntry.of(a), KernelEntry.of(b)}
    assert len(rules(gw)) == 2
    # The external interface was renamed between runs: the rules follow, elements stay.
    renamed = NftablesBackend("igd", "wan1", netns=gw.name)
    await renamed.open()
    assert [r.split()[1] for r in rules(gw)] == ['"wan1"', '"wan1"']
    assert await renamed.entries() == {KernelEntry.of(a), KernelEntry.of(b)}
    for other in (again, renamed):
        await other.close(flush=False)


async def test_apply_adds_and_removes_with_kernel_timeouts(
    gw: Netns, backend: NftablesBackend
) -> None:
    tcp = mapping(18080, lease=100.0)
    udp = mapping(5000, protocol=Protocol.UDP, remote="203.0.113.3", lease=7200.5)
    await backend.apply([], [tcp, udp], now=NOW)
    assert await backend.entries() == {KernelEntry.of(tcp), KernelEntry.of(udp)}
    # Remaining lease + 60 s grace, rounded up.
    assert timeouts(gw) == {"tcp . 18080": 160, "203.0.113.3 . udp . 5000": 7261}
    await backend.apply([tcp], [], now=NOW)
    assert await backend.entries() == {KernelEntry.of(udp)}


async def test_renewal_succeeds_when_the_element_is_missing_or_expired(
    gw: Netns, backend: NftablesBackend
) -> None:
    # Removed entry never in the kernel, renewed in the same call.
    never, renewed = mapping(1, lease=10.0), mapping(1, lease=500.0)
    await backend.apply([never], [renewed], now=NOW)
    assert timeouts(gw) == {"tcp . 1": 560}
    # An element the kernel already timed out (the daemon was late): renew it all the same.
    gw.run("nft", "add element ip igd portmap { tcp . 2 timeout 1s : 192.168.78.10 . 8080 }")
    time.sleep(1.5)
    assert "tcp . 2" not in timeouts(gw)
    await backend.apply([mapping(2)], [mapping(2, lease=20.0)], now=NOW)
    assert timeouts(gw)["tcp . 2"] == 80
    # A plain removal of something absent is not an error either.
    await backend.apply([mapping(3)], [], now=NOW)
    assert await backend.entries() == {KernelEntry.of(renewed), KernelEntry.of(mapping(2))}


async def test_failed_transaction_changes_nothing(gw: Netns, backend: NftablesBackend) -> None:
    held, gone = mapping(1), mapping(2)
    await backend.apply([], [held, gone], now=NOW)
    before = snapshot(gw)
    # The kernel refuses to add a key that forwards elsewhere (EEXIST), which aborts the whole
    # transaction: the removal and the other add in the same call must not happen either.
    clash = mapping(1, internal_port=9999)
    with pytest.raises(BackendError, match="File exists"):
        await backend.apply([gone], [mapping(3), clash], now=NOW)
    assert await backend.entries() == {KernelEntry.of(held), KernelEntry.of(gone)}
    assert snapshot(gw) == before
    # Invalid entries never reach the kernel.
    with pytest.raises(BackendError, match="invalid"):
        await backend.apply([], [mapping(3), mapping(0)], now=NOW)
    assert snapshot(gw) == before


async def test_reconcile_removes_orphans_adds_missing_and_refreshes(
    gw: Netns, backend: NftablesBackend
) -> None:
    keep, orphan, stale = mapping(1, lease=100.0), mapping(2), mapping(3)
    await backend.apply([], [keep, orphan, stale], now=NOW)
    missing = mapping(4, protocol=Protocol.UDP, remote="203.0.113.9")
    moved = mapping(3, internal_port=9999)
    wanted = [replace(keep, expires=NOW + 900), missing, moved]
    report = await backend.reconcile(wanted, now=NOW)
    assert report == ReconcileReport(
        removed=(KernelEntry.of(orphan), KernelEntry.of(stale)),
        added=(KernelEntry.of(moved), KernelEntry.of(missing)),
    )
    assert await backend.entries() == {KernelEntry.of(e) for e in (keep, missing, moved)}
    assert timeouts(gw)["tcp . 1"] == 960  # the matching entry's timeout was refreshed
    assert await backend.reconcile(wanted, now=NOW) == ReconcileReport((), ())
    # A daemon that starts with no leases clears the table.
    await backend.reconcile([], now=NOW)
    assert await backend.entries() == set()


async def test_close_keeps_or_flushes_the_table(gw: Netns, backend: NftablesBackend) -> None:
    await backend.apply([], [mapping(1)], now=NOW)
    await backend.close(flush=False)
    assert "tcp . 1" in timeouts(gw)
    with pytest.raises(BackendError, match="closed"):
        await backend.entries()
    last = NftablesBackend("igd", "wan0", netns=gw.name)
    await last.close(flush=True)
    assert not [o for o in ruleset(gw) if "table" in o]
    # Flushing a table that is already gone is fine too.
    await NftablesBackend("igd", "wan0", netns=gw.name).close(flush=True)


async def test_unknown_namespace_is_a_backend_error() -> None:
    b = NftablesBackend("igd", "wan0", netns="igdnft-does-not-exist")
    with pytest.raises(BackendError, match="igdnft-does-not-exist"):
        await b.open()
    await b.close(flush=False)


# -- the data path: WAN host -> gateway (our table) -> LAN server -------------------------

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
src, dst, port, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    s = socket.create_connection((dst, port), timeout=wait, source_address=(src, 0))
    print(s.makefile().readline().strip())
except OSError as e:
    print("error", type(e).__name__)
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


def lab_links(wan: Netns, gw: Netns, lan: Netns) -> None:
    """WAN 203.0.113.0/24 (gw .1, hosts .2 and .3) and LAN 192.168.78.0/24 (gw .1, host .10)."""
    gw.run("ip", "link", "add", "ext0", "type", "veth", "peer", "name", "wan0", "netns", wan.name)
    gw.run("ip", "link", "add", "int0", "type", "veth", "peer", "name", "lan0", "netns", lan.name)
    gw.run("ip", "addr", "add", "203.0.113.1/24", "dev", "ext0")
    gw.run("ip", "addr", "add", "192.168.78.1/24", "dev", "int0")
    wan.run("ip", "addr", "add", "203.0.113.2/24", "dev", "wan0")
    wan.run("ip", "addr", "add", "203.0.113.3/24", "dev", "wan0")
    lan.run("ip", "addr", "add", "192.168.78.10/24", "dev", "lan0")
    for ns, dev in ((gw, "ext0"), (gw, "int0"), (wan, "wan0"), (lan, "lan0")):
        ns.run("ip", "link", "set", dev, "up")
    # Replies reach the WAN host through the gateway's conntrack (un-DNAT), so only the LAN
    # host needs a route: its default route via the gateway.
    lan.run("ip", "route", "add", "default", "via", "192.168.78.1")
    gw.run("sysctl", "-qw", "net.ipv4.ip_forward=1")


async def test_wan_host_reaches_lan_server_through_mapping() -> None:
    with netns_group(PREFIX, 3) as (wan, gw, lan):
        lab_links(wan, gw, lan)
        server = lan.popen(sys.executable, "-c", SERVER)
        backend = NftablesBackend("igd", "ext0", netns=gw.name)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            await backend.open()

            def connect(
                src: str, port: int, dst: str = "203.0.113.1", ns: Netns = wan, wait: float = 3
            ) -> str:
                gw.run("conntrack", "-F", check=False)  # old flows would bypass the NAT chain
                argv = (sys.executable, "-c", CLIENT, src, dst, str(port), str(wait))
                return ns.run(*argv).stdout.strip()

            refused = "error ConnectionRefusedError"
            assert connect("203.0.113.2", 18080) == refused

            plain = mapping(18080)
            await backend.apply([], [plain], now=NOW)
            assert connect("203.0.113.2", 18080) == "8080 203.0.113.2"
            # Only traffic arriving on the external interface is translated.
            assert connect("192.168.78.10", 18080, "192.168.78.1", lan) == refused
            await backend.apply([plain], [], now=NOW)
            assert connect("203.0.113.2", 18080) == refused

            # A remote-host-specific mapping admits only that WAN host...
            only3 = mapping(18081, remote="203.0.113.3", internal_port=8081)
            await backend.apply([], [only3], now=NOW)
            assert connect("203.0.113.3", 18081) == "8081 203.0.113.3"
            assert connect("203.0.113.2", 18081) == refused
            # ...and wins over a wildcard mapping of the same port, whose lookup a miss in
            # the remote map falls through to.
            await backend.apply([], [mapping(18081)], now=NOW)
            assert connect("203.0.113.3", 18081) == "8081 203.0.113.3"
            assert connect("203.0.113.2", 18081) == "8080 203.0.113.2"

            # docs/nftables.md: an admin's forward chain with policy drop blocks mapped
            # traffic (our table cannot override it) until it accepts `ct status dnat`.
            gw.run("nft", "-f", "-", input=FORWARD_DROP)
            assert connect("203.0.113.2", 18081, wait=0.5) == "error TimeoutError"
            gw.run("nft", "add rule inet filter forward ct status dnat accept")
            assert connect("203.0.113.2", 18081) == "8080 203.0.113.2"
        finally:
            server.kill()
            server.communicate()
            await backend.close(flush=True)
