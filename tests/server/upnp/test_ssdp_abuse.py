"""SSDP abuse on loopback: bad searches never raise or flood the log, answers are bounded in bytes
per source (amplification), and sources outside the internal networks get nothing."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from igd.proto import ssdp
from igd.server.interfaces import InternalInterface
from igd.server.upnp.ssdp import ANSWER_BYTES_PER_SOURCE, SsdpResponder
from tests.server.upnp.rig import Rig

ALL_ANSWERS = 10  # ssdp:all: root device, 2 per device, 1 per service (tests/proto)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Searcher(asyncio.DatagramProtocol):
    """A control point on one loopback address, keeping every datagram it receives."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.received.append(data)

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, ("127.0.0.1", port))

    async def answers(self, count: int, within: float = 2.0) -> list[bytes]:
        """Wait until `count` datagrams arrived (or the time is up); all that arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(self.received) < count and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.received


async def searcher(address: str) -> Searcher:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        Searcher, local_addr=(address, 0)
    )
    protocol.transport = transport
    return protocol


def unicast(target: str, port: int, mx: int | None = 1) -> bytes:
    """An M-SEARCH sent to the gateway's address (answered at once, UDA 1.1 §1.3.2)."""
    return ssdp.encode_search(target, mx).replace(ssdp.HOST.encode(), f"127.0.0.1:{port}".encode())


async def started(rig: Rig, interface: InternalInterface | None = None) -> SsdpResponder:
    current = rig.upnp.ssdp
    responder = SsdpResponder(
        [interface or rig.upnp.interfaces[0]],
        current.offers,
        primary=current.primary,
        auto_v1=current.auto_v1,
        wants_v1=current.wants_v1,
        http_port=current.http_port,
        server=current.server,
        boot_id=current.boot_id,
        port=free_udp_port(),
    )
    await responder.start()
    return responder


@pytest.fixture
async def responder(rig: Rig) -> AsyncIterator[SsdpResponder]:
    made = await started(rig)
    yield made
    made.close()


BAD_SEARCHES = [
    # "²" passes str.isdigit(); int() refuses it (this once raised out of datagram_received).
    'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\n'
    "ST: ssdp:all\r\nMX: \u00b2\r\n\r\n".encode(),
    'M-SEARCH * HTTP/1.1\r\nMAN: "ssdp:discover"\r\nST: ssdp:all\r\nMX: \u0663\r\n\r\n'.encode(),
    b"M-SEARCH * HTTP/1.1\r\nMAN: ssdp:discover\r\nST: ssdp:all\r\nMX: 99999999\r\n\r\n",
    b"M-SEARCH * HTTP/1.1\r\n\xff\xfe\r\n\r\n",
    b"M-SEARCH * HTTP/1.1\r\nno colon here\r\n\r\n",
    b"M-SEARCH" + b"x" * 5000,
]


async def test_bad_searches_leave_no_traceback_and_one_log_line(
    rig: Rig, responder: SsdpResponder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    attacker = await searcher("127.0.0.5")
    for _ in range(50):
        for datagram in BAD_SEARCHES:
            attacker.send(datagram, responder.port)
        await asyncio.sleep(0.005)  # within the socket's receive buffer
    good = await searcher("127.0.0.6")
    await asyncio.sleep(0.2)
    good.send(unicast(ssdp.ROOT_DEVICE, responder.port), responder.port)
    [answer] = await good.answers(1)
    assert b"upnp:rootdevice" in answer and b"LOCATION: http://127.0.0.1:" in answer
    assert responder.malformed.count == 50 * len(BAD_SEARCHES)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    lines = [r for r in caplog.records if "malformed M-SEARCH" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # one line per interval


async def test_answer_bytes_per_source_are_bounded(responder: SsdpResponder) -> None:
    victim = await searcher("127.0.0.7")
    for _ in range(20):
        victim.send(unicast(ssdp.ALL, responder.port), responder.port)
    received = await victim.answers(20 * ALL_ANSWERS, within=1.5)
    # The first search gets its whole answer; the rest only what the byte budget allows.
    assert len(received) >= ALL_ANSWERS
    assert sum(map(len, received)) <= ANSWER_BYTES_PER_SOURCE
    other = await searcher("127.0.0.8")  # another source has its own budget
    other.send(unicast(ssdp.ALL, responder.port), responder.port)
    assert len(await other.answers(ALL_ANSWERS)) == ALL_ANSWERS


async def test_sources_outside_the_internal_networks_get_nothing(rig: Rig) -> None:
    narrow = InternalInterface("lo", IPv4Address("127.0.0.1"), (IPv4Network("127.0.0.0/24"),))
    responder = await started(rig, narrow)
    try:
        outsider = await searcher("127.0.1.1")
        broadcast = await searcher("127.0.0.255")
        insider = await searcher("127.0.0.9")
        for one in (outsider, broadcast, insider):
            one.send(unicast(ssdp.ROOT_DEVICE, responder.port), responder.port)
        assert len(await insider.answers(1)) == 1
        await asyncio.sleep(0.3)
        assert outsider.received == [] and broadcast.received == []
    finally:
        responder.close()
