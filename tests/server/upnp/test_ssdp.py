"""The SSDP responder through its public interface (`received`, `close`) with a fake transport:
what each search is answered with, which version a searcher is shown, who is ignored, the
MX delay and the per-source bounds, and the byebye at close."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network

from igd.proto import ssdp
from igd.proto.description import DeviceTree, ServiceKind, service_type
from igd.server.interfaces import InternalInterface
from igd.server.upnp.http import wants_v1
from igd.server.upnp.ssdp import MAX_PENDING_PER_SOURCE, SEARCH_BURST, Offer, SsdpResponder
from tests.server.test_pxp import FakeTransport

LAN = InternalInterface("lan0", IPv4Address("192.168.1.1"), (IPv4Network("192.168.1.0/24"),))
CLIENT = ("192.168.1.10", 50000)
ROOT = "5d6f2a6e-1f36-4c55-9b3c-3f4b8f0b9e11"
TREES = {v: DeviceTree.build(ROOT, v) for v in (1, 2)}


class FixedDelay:
    """Stands in for the responder's random source: records the MX bounds it is asked for."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.asked: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.asked.append((low, high))
        return min(self.delay, high)


def responder(delay: float = 0.0) -> tuple[SsdpResponder, FakeTransport, FixedDelay]:
    offers = {v: Offer(tree, f"/igd{v}/rootDesc.xml", 7) for v, tree in TREES.items()}
    rng = FixedDelay(delay)
    made = SsdpResponder(
        [LAN],
        offers,
        primary=2,
        auto_v1=True,
        wants_v1=wants_v1,
        http_port=5000,
        server="test/1.0",
        boot_id=3,
        rng=rng,  # type: ignore[arg-type]
    )
    transport = FakeTransport()
    made.attach(LAN, transport)
    return made, transport, rng


def unicast(target: str) -> bytes:
    """A unicast M-SEARCH (to the device, no MX: answered at once)."""
    lines = ["M-SEARCH * HTTP/1.1", "HOST: 192.168.1.1:1900", 'MAN: "ssdp:discover"',
             f"ST: {target}"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def replies(transport: FakeTransport, wait: float = 0.0) -> list[dict[str, str]]:
    await asyncio.sleep(wait)
    for _ in range(3):
        await asyncio.sleep(0)
    found = []
    for data, to in transport.sent:
        assert to == CLIENT
        start, headers = ssdp.decode_message(data)
        assert start == "HTTP/1.1 200 OK"
        found.append(headers)
    transport.sent.clear()
    return found


async def test_ssdp_all_gets_the_whole_set_from_this_interface() -> None:
    made, transport, _ = responder()
    made.received(unicast(ssdp.ALL), CLIENT, LAN)
    answers = await replies(transport)
    expected = ssdp.advertisement_set(TREES[2])
    assert [(a["ST"], a["USN"]) for a in answers] == [(t.target, t.usn) for t in expected]
    assert {a["LOCATION"] for a in answers} == {"http://192.168.1.1:5000/igd2/rootDesc.xml"}
    assert {a["BOOTID.UPNP.ORG"] for a in answers} == {"3"}


async def test_each_searcher_is_shown_the_version_it_understands() -> None:
    made, transport, _ = responder()
    ip1 = service_type(ServiceKind.WAN_IP_CONNECTION, 1)
    made.received(unicast(ip1), CLIENT, LAN)
    [answer] = await replies(transport)
    assert answer["ST"] == ip1 and answer["LOCATION"].endswith("/igd1/rootDesc.xml")
    windows = ssdp.encode_search(ssdp.ROOT_DEVICE, 1, user_agent="Microsoft-Windows/10.0 UPnP/1.0")
    made.received(windows, CLIENT, LAN)
    [answer] = await replies(transport)
    assert answer["LOCATION"].endswith("/igd1/rootDesc.xml")
    made.received(unicast(ssdp.ROOT_DEVICE), CLIENT, LAN)
    [answer] = await replies(transport)
    assert answer["LOCATION"].endswith("/igd2/rootDesc.xml")


async def test_what_is_not_answered() -> None:
    made, transport, _ = responder()
    made.received(unicast(ssdp.ALL), ("10.0.0.5", 1900), LAN)  # not on this interface's LAN
    made.received(ssdp.encode_search(ssdp.ALL, mx=None), CLIENT, LAN)  # multicast without MX
    made.received(b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n", CLIENT, LAN)
    made.received(b"\xff" * 40, CLIENT, LAN)
    made.received(unicast("urn:schemas-upnp-org:device:MediaServer:1"), CLIENT, LAN)
    assert await replies(transport) == []


async def test_a_multicast_search_waits_a_random_time_within_mx_capped_at_5s() -> None:
    made, transport, rng = responder(delay=0.3)
    made.received(ssdp.encode_search(ssdp.ROOT_DEVICE, 120), CLIENT, LAN)
    assert rng.asked == [(0.0, 5.0)]  # UDA 1.1 §1.3.2
    assert await replies(transport) == []  # not yet
    assert len(await replies(transport, wait=0.4)) == 1


async def test_searches_waiting_per_source_are_bounded() -> None:
    made, transport, _ = responder(delay=0.3)
    for _ in range(MAX_PENDING_PER_SOURCE + 3):
        made.received(ssdp.encode_search(ssdp.ROOT_DEVICE, 1), CLIENT, LAN)
    assert len(await replies(transport, wait=0.4)) == MAX_PENDING_PER_SOURCE
    # Once answered, the source may search again.
    made.received(ssdp.encode_search(ssdp.ROOT_DEVICE, 1), CLIENT, LAN)
    assert len(await replies(transport, wait=0.4)) == 1


async def test_a_source_searching_too_fast_is_answered_up_to_its_burst() -> None:
    made, transport, _ = responder()
    answered = 0
    for _ in range(SEARCH_BURST + 10):
        made.received(unicast(ssdp.ROOT_DEVICE), CLIENT, LAN)
        answered += len(await replies(transport))
    assert answered == SEARCH_BURST


async def test_close_says_byebye_for_every_advertisement() -> None:
    made, transport, _ = responder()
    made.close()
    sent = [ssdp.decode_message(data) for data, to in transport.sent if to == (ssdp.GROUP, 1900)]
    assert len(sent) == len(ssdp.advertisement_set(TREES[2]))
    assert {start for start, _ in sent} == {"NOTIFY * HTTP/1.1"}
    assert {headers["NTS"] for _, headers in sent} == {ssdp.BYEBYE}
    assert transport.closed
