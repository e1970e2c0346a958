"""SSDP over IPv6 through the responder's public interface with a fake transport: LOCATION
in brackets on the LAN's IPv6 address, LAN and on-link searchers only, the MX delay for the
IPv6 groups, the byte budget, and NOTIFYs to ff02::c."""

from __future__ import annotations

import asyncio
from ipaddress import IPv6Address, IPv6Network

from igd.proto import ssdp
from igd.proto.description import DeviceTree
from igd.server.interfaces import InternalInterface6
from igd.server.upnp.http import wants_v1
from igd.server.upnp.ssdp import ANSWER_BYTES_PER_SOURCE, Offer
from igd.server.upnp.ssdp6 import Ssdp6Responder
from tests.server.test_pxp import FakeTransport
from tests.server.upnp.test_ssdp import ROOT, FixedDelay

LAN6 = InternalInterface6(
    "lan0", IPv6Address("2001:db8:0:77::1"), (IPv6Network("2001:db8:0:77::/64"),)
)
TREES = {v: DeviceTree.build(ROOT, v, pinholes=True) for v in (1, 2)}
GLOBAL = ("2001:db8:0:77::a", 50000, 0, 0)
LINK_LOCAL = ("fe80::a", 50000, 0, 3)


def responder(delay: float = 0.0) -> tuple[Ssdp6Responder, FakeTransport, FixedDelay]:
    offers = {v: Offer(tree, f"/igd{v}/desc.xml", 7) for v, tree in TREES.items()}
    rng = FixedDelay(delay)
    made = Ssdp6Responder([LAN6], offers, primary=2, auto_v1=True, wants_v1=wants_v1,
                          http_port=5000, server="test/1.0", boot_id=3,
                          rng=rng)  # type: ignore[arg-type]  # fmt: skip
    transport = FakeTransport()
    made.attach(LAN6, transport)
    return made, transport, rng


def search(target: str, host: str = ssdp.HOST6, mx: int | None = None) -> bytes:
    lines = ["M-SEARCH * HTTP/1.1", f"HOST: {host}", 'MAN: "ssdp:discover"', f"ST: {target}"]
    if mx is not None:
        lines.append(f"MX: {mx}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def sent(transport: FakeTransport) -> list[tuple[dict[str, str], object]]:
    for _ in range(3):
        await asyncio.sleep(0)
    found = [(ssdp.decode_message(data)[1], to) for data, to in transport.sent]
    transport.sent.clear()
    return found


async def test_lan_and_on_link_searchers_get_a_bracketed_location() -> None:
    made, transport, rng = responder()
    igd = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
    for source in (GLOBAL, LINK_LOCAL):
        made.received(search(igd, mx=1), source, LAN6)
        ((headers, to),) = await sent(transport)
        assert headers["LOCATION"] == "http://[2001:db8:0:77::1]:5000/igd2/desc.xml"
        assert to == source  # the whole address tuple: a link-local one keeps its scope
    assert rng.asked == [(0.0, 1.0), (0.0, 1.0)]  # [FF02::C]:1900 is a multicast search


async def test_searchers_outside_the_lan_and_the_gateway_itself_are_ignored() -> None:
    made, transport, _ = responder()
    for source in (("2001:db8:0:1::2", 1900, 0, 0), ("2001:db8:0:77::1", 1900, 0, 0),
                   ("192.168.1.10", 1900), ("not an address", 1900)):  # fmt: skip
        made.received(search(ssdp.ALL), source, LAN6)
    assert await sent(transport) == []


async def test_answers_to_one_source_stay_within_its_byte_budget() -> None:
    made, transport, _ = responder()
    for _ in range(50):  # unicast searches: answered at once, within the same second
        made.received(search(ssdp.ALL, host="[2001:db8:0:77::1]:1900"), GLOBAL, LAN6)
        await asyncio.sleep(0)
    total = sum(len(data) for data, _ in transport.sent)
    assert ANSWER_BYTES_PER_SOURCE / 2 < total <= ANSWER_BYTES_PER_SOURCE


async def test_notifies_go_to_the_link_local_group() -> None:
    made, transport, _ = responder()
    made.close()
    assert transport.sent
    for data, to in transport.sent:
        _, headers = ssdp.decode_message(data)
        assert to == ("ff02::c", 1900) and headers["HOST"] == "[FF02::C]:1900"
        assert headers["NTS"] == ssdp.BYEBYE


async def test_a_renumbering_says_byebye_for_the_old_location_and_answers_with_the_new() -> None:
    made, transport, _ = responder()
    moved = InternalInterface6(
        "lan0", IPv6Address("2001:db8:0:78::1"), (IPv6Network("2001:db8:0:78::/64"),)
    )
    await made.readdress([moved])
    notes = await sent(transport)
    # byebye (it carries no LOCATION: control points drop the device's USNs), then alive.
    kinds = [h["NTS"] for h, _ in notes]
    assert ssdp.BYEBYE in kinds and ssdp.ALIVE in kinds
    assert kinds.index(ssdp.ALIVE) > max(i for i, k in enumerate(kinds) if k == ssdp.BYEBYE)
    alives = {h["LOCATION"] for h, _ in notes if h["NTS"] == ssdp.ALIVE}
    assert alives == {"http://[2001:db8:0:78::1]:5000/igd2/desc.xml"}
    # The socket stays (it is bound to the interface); a searcher on the new prefix is
    # answered with the new LOCATION, one left on the old prefix no longer.
    made.received(search(ssdp.ALL, mx=1), ("2001:db8:0:77::a", 50000, 0, 0), LAN6)
    assert await sent(transport) == []
    made.received(search(ssdp.ALL, mx=1), ("2001:db8:0:78::a", 50000, 0, 0), LAN6)
    answers = await sent(transport)
    assert answers and {h["LOCATION"] for h, _ in answers} == {
        "http://[2001:db8:0:78::1]:5000/igd2/desc.xml"
    }
