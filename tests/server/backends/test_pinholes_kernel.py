"""The IPv6 pinhole backend against the real kernel, in a throwaway namespace (root only)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv6Address, IPv6Network

import pytest

from igd.model import Mechanism, Protocol
from igd.pinhole import Pinhole, PinholeFilter, PinholeKey, PinholeOwner
from igd.server.backends import BackendError
from igd.server.backends.pinholes import NftPinholeBackend, PinholeEntry, entries_of
from tests.netns import Netns, netns

pytestmark = pytest.mark.lab

NOW = 1000.0
LAN = IPv6Network("2001:db8:0:77::/64")
HOST = IPv6Address("2001:db8:0:77::a")


def hole(port: int, *, lease: float = 600, filters: tuple[PinholeFilter, ...] = ()) -> Pinhole:
    key = PinholeKey(HOST, Protocol.TCP, port)
    owner = PinholeOwner(Mechanism.PCP, HOST, b"n" * 12)
    return Pinhole(key, owner, NOW, NOW + lease, filters=filters)


@pytest.fixture
def gw() -> Iterator[Netns]:
    with netns("igdt6") as ns:
        yield ns


@pytest.fixture
async def backend(gw: Netns) -> AsyncIterator[NftPinholeBackend]:
    b = NftPinholeBackend("igd6", "wan0", [LAN], netns=gw.name)
    await b.replace([], now=NOW)
    yield b
    await b.close(flush=False)


def timeout_of(gw: Netns, port: int) -> int:
    listing = json.loads(gw.run("nft", "-j", "list", "set", "ip6", "igd6", "pinholes").stdout)
    elements = next(item["set"] for item in listing["nftables"] if "set" in item)["elem"]
    return next(e["elem"]["timeout"] for e in elements if e["elem"]["val"]["concat"][2] == port)


async def test_replace_writes_exactly_the_pinholes_and_the_default_deny(
    gw: Netns, backend: NftPinholeBackend
) -> None:
    filtered = hole(9000, filters=(PinholeFilter(IPv6Network("2001:db8:0:1::/64"), 0),))
    await backend.apply([], [hole(8080)], now=NOW)
    await backend.replace([hole(8443), filtered], now=NOW)
    assert await backend.entries() == {*entries_of(hole(8443)), *entries_of(filtered)}
    chain = gw.run("nft", "list", "chain", "ip6", "igd6", "forward").stdout
    assert "@lan drop" in chain and "ct state established,related accept" in chain


async def test_renewal_changes_the_timeout_and_deleting_an_expired_element_works(
    gw: Netns, backend: NftPinholeBackend
) -> None:
    short = hole(8080, lease=30)
    await backend.apply([], [short], now=NOW)
    assert timeout_of(gw, 8080) == 30
    longer = hole(8080, lease=3600)
    await backend.apply([short], [longer], now=NOW)
    assert timeout_of(gw, 8080) == 3600
    # The kernel may have timed an element out before the daemon deletes it.
    gw.run("nft", "delete", "element", "ip6", "igd6", "pinholes", f"{{ {HOST} . tcp . 8080 }}")
    await backend.apply([longer], [], now=NOW)
    assert await backend.entries() == set()


async def test_a_failed_change_leaves_the_kernel_as_it_was(
    gw: Netns, backend: NftPinholeBackend
) -> None:
    await backend.apply([], [hole(8080)], now=NOW)
    # Someone removed a set under us: the change's second half cannot apply.
    gw.run("nft", "flush chain ip6 igd6 forward; delete set ip6 igd6 pinholes_remote")
    bad = hole(9000, filters=(PinholeFilter(IPv6Network("2001:db8:0:1::/64"), 53),))
    with pytest.raises(BackendError):
        await backend.apply([hole(8080)], [bad], now=NOW)
    assert await backend.entries() == {PinholeEntry(HOST, Protocol.TCP, 8080)}


async def test_external_firewall_mode_marks_pinholed_flows_and_drops_nothing(gw: Netns) -> None:
    backend = NftPinholeBackend("igd6", "wan0", [LAN], "external", netns=gw.name)
    try:
        await backend.replace([hole(8080)], now=NOW)
        chain = gw.run("nft", "list", "chain", "ip6", "igd6", "forward").stdout
        assert "drop" not in chain
        assert "@pinholes meta mark set meta mark | 0x00100000" in chain
    finally:
        await backend.close(flush=True)
    tables = gw.run("nft", "list", "tables").stdout
    assert "igd6" not in tables


def counted(gw: Netns) -> str:
    return gw.run("nft", "list", "set", "ip6", "igd6", "counted").stdout


async def test_counters_survive_a_renewal_and_go_with_the_pinhole(
    gw: Netns, backend: NftPinholeBackend
) -> None:
    short, longer = hole(8080, lease=30), hole(8080, lease=3600)
    await backend.apply([], [short], now=NOW)
    # Traffic is the lab's to send (tests/lab/test_upnp_pinholes.py); here a count is set.
    element = f"{{ {HOST} . tcp . 8080 counter packets 5 bytes 300 }}"
    gw.run("nft", "delete", "element", "ip6", "igd6", "counted", f"{{ {HOST} . tcp . 8080 }}")
    gw.run("nft", "add", "element", "ip6", "igd6", "counted", element)
    assert await backend.packets(short) == 5
    await backend.apply([short], [longer], now=NOW)
    assert await backend.packets(longer) == 5  # a renewal keeps the count
    await backend.apply([longer], [], now=NOW)
    assert "8080" not in counted(gw) and await backend.packets(longer) == 0
