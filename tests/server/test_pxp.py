"""The UDP 5351 dispatcher and its bounds, through `received` with a fake transport: which
protocol answers which version, who is not answered, the per-client rate limit and
in-flight bounds (and their events), and the announcements an address change sets off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from igd.events import DatagramDropped, DropReason
from igd.gateway import Gateway
from igd.policy import Policy
from igd.proto import natpmp, pcp
from igd.proto.natpmp import NatPmpExternalAddressRequest, NatPmpExternalAddressResponse
from igd.proto.pcp import PcpOpcode, PcpRequest, PcpResult
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import ExternalAddress, InternalInterface
from igd.server.natpmp import NatPmpHandler
from igd.server.pcp import PcpHandler
from igd.server.pxp import (
    ANNOUNCE_GROUP,
    MAX_IN_FLIGHT_PER_CLIENT,
    MAX_TRACKED_CLIENTS,
    PxpServer,
    RateLimiter,
)
from igd.server.service import Service
from igd.server.store import LeaseStore

LAN = InternalInterface("lan0", IPv4Address("192.168.1.1"), (IPv4Network("192.168.1.0/24"),))
CLIENT = ("192.168.1.10", 40000)
STRANGER = ("10.9.9.9", 40000)
EXTERNAL = IPv4Address("198.51.100.7")
POLICY = '[defaults]\naction = "allow"\n'


class FakeTransport(asyncio.DatagramTransport):
    """Records what the server sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False

    def sendto(self, data: bytes, addr: object = None) -> None:  # type: ignore[override]
        assert isinstance(addr, tuple)
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Rig:
    def __init__(self, tmp: Path, *, natpmp_on: bool = True, pcp_on: bool = True,
                 rate: float = 1000.0, burst: int = 1000) -> None:  # fmt: skip
        store = LeaseStore(tmp / "leases.sqlite")
        self.service = Service(Gateway(Policy.parse(POLICY)), MemoryBackend(), store)
        self.external = ExternalAddress("wan0", override=EXTERNAL, allow_private=True)
        self.external.refresh()
        self.natpmp = NatPmpHandler(self.service, self.external) if natpmp_on else None
        self.pcp = PcpHandler(self.service, self.external) if pcp_on else None
        self.events = self.service.subscribe("test", kinds=(DatagramDropped,))
        self.server = PxpServer([LAN], self.natpmp, self.pcp, RateLimiter(rate, burst),
                                self.service)  # fmt: skip
        self.transport = FakeTransport()
        self.server.attach(LAN, self.transport)

    async def exchange(self, data: bytes, source: tuple[str, int] = CLIENT) -> list[bytes]:
        """Send one datagram; the replies to its source once it has been answered."""
        before = len(self.transport.sent)
        self.server.received(data, source, LAN)
        for _ in range(20):
            await asyncio.sleep(0)
        return [d for d, to in self.transport.sent[before:] if to == source]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.server.close()


ADDRESS_REQUEST = natpmp.encode_request(NatPmpExternalAddressRequest())
PCP_ANNOUNCE = pcp.encode_request(
    PcpRequest(PcpOpcode.ANNOUNCE, 0, pcp.mapped(IPv4Address(CLIENT[0])))
)


async def test_version_zero_is_nat_pmp_and_two_is_pcp(rig: Rig) -> None:
    [answer] = await rig.exchange(ADDRESS_REQUEST)
    reply = natpmp.decode_response(answer)
    assert isinstance(reply, NatPmpExternalAddressResponse) and reply.address == EXTERNAL
    [answer] = await rig.exchange(PCP_ANNOUNCE)
    response = pcp.decode_response(answer)
    assert (response.opcode, response.result) == (PcpOpcode.ANNOUNCE, PcpResult.SUCCESS)


async def test_other_versions_get_the_nearest_protocols_refusal(tmp_path: Path) -> None:
    both = Rig(tmp_path)
    # RFC 6887 §9: version 1 (between NAT-PMP and PCP) gets NAT-PMP's answer, above 2 PCP's.
    [below] = await both.exchange(bytes([1, 0]) + bytes(10))
    assert below == natpmp.encode_unsupported_version(both.service.epoch())
    [above] = await both.exchange(bytes([3, 1]) + bytes(22))
    assert unsupported_by_pcp(above)
    pcp_only = Rig(tmp_path, natpmp_on=False)
    [nat_pmp_asked] = await pcp_only.exchange(ADDRESS_REQUEST)
    assert unsupported_by_pcp(nat_pmp_asked)
    natpmp_only = Rig(tmp_path, pcp_on=False)
    [pcp_asked] = await natpmp_only.exchange(PCP_ANNOUNCE)
    assert pcp_asked == natpmp.encode_unsupported_version(natpmp_only.service.epoch())


def unsupported_by_pcp(reply: bytes) -> bool:
    """A PCP header (version 2, response bit) with UNSUPP_VERSION (RFC 6887 §9)."""
    return reply[0] == pcp.VERSION and reply[1] & 0x80 != 0 and reply[3] == PcpResult.UNSUPP_VERSION


async def test_silence_for_strangers_responses_and_runts(rig: Rig) -> None:
    assert await rig.exchange(ADDRESS_REQUEST, STRANGER) == []  # not on the LAN's networks
    assert await rig.exchange(b"") == []
    assert await rig.exchange(b"\x00") == []  # RFC 6887 §8.2: too short to answer
    assert await rig.exchange(bytes([5, 0x80]) + bytes(10)) == []  # a response, any version
    assert await rig.exchange(ADDRESS_REQUEST) != []  # and the client is still served


async def test_a_client_over_its_rate_is_dropped_and_reported(tmp_path: Path) -> None:
    limited = Rig(tmp_path, rate=0.001, burst=2)
    assert len(await limited.exchange(ADDRESS_REQUEST)) == 1
    assert len(await limited.exchange(ADDRESS_REQUEST)) == 1
    assert await limited.exchange(ADDRESS_REQUEST) == []
    other = ("192.168.1.11", 5351)
    assert len(await limited.exchange(ADDRESS_REQUEST, other)) == 1  # buckets are per client
    events, _ = limited.events.take()
    assert events == [DatagramDropped(IPv4Address(CLIENT[0]), DropReason.RATE_LIMIT)]


class StuckHandler:
    """A NAT-PMP handler whose answers wait until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def handle(self, data: bytes, client: IPv4Address) -> bytes | None:
        self.started += 1
        await self.release.wait()
        return b"answer"

    def announcement(self) -> bytes | None:
        return None


async def test_requests_in_flight_per_client_are_bounded(rig: Rig) -> None:
    stuck = StuckHandler()
    rig.server.natpmp = stuck  # type: ignore[assignment]
    for _ in range(MAX_IN_FLIGHT_PER_CLIENT + 3):
        rig.server.received(ADDRESS_REQUEST, CLIENT, LAN)
    other = ("192.168.1.11", 5351)
    rig.server.received(ADDRESS_REQUEST, other, LAN)
    await asyncio.sleep(0)
    assert stuck.started == MAX_IN_FLIGHT_PER_CLIENT + 1  # the other client is not held up
    events, _ = rig.events.take()
    client = IPv4Address(CLIENT[0])
    assert events == [DatagramDropped(client, DropReason.CLIENT_IN_FLIGHT)] * 3
    stuck.release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(rig.transport.sent) == MAX_IN_FLIGHT_PER_CLIENT + 1
    # Answered requests no longer count against the client.
    stuck.release.clear()
    rig.server.received(ADDRESS_REQUEST, CLIENT, LAN)
    await asyncio.sleep(0)
    assert stuck.started == MAX_IN_FLIGHT_PER_CLIENT + 2


class FailingHandler(StuckHandler):
    async def handle(self, data: bytes, client: IPv4Address) -> bytes | None:
        raise RuntimeError("bug")


async def test_a_failing_handler_costs_one_answer_not_the_server(rig: Rig) -> None:
    rig.server.natpmp = FailingHandler()  # type: ignore[assignment]
    for _ in range(MAX_IN_FLIGHT_PER_CLIENT + 1):
        assert await rig.exchange(ADDRESS_REQUEST) == []
    assert len(await rig.exchange(PCP_ANNOUNCE)) == 1  # nothing is left counted in flight
    assert rig.events.take() == ([], 0)


async def test_an_address_change_is_announced_on_every_interface(rig: Rig) -> None:
    follower = asyncio.create_task(rig.server.run())
    await asyncio.sleep(0)
    rig.service.address_changed(IPv4Address("198.51.100.6"), EXTERNAL)
    for _ in range(10):
        await asyncio.sleep(0)
    follower.cancel()
    announced = [data for data, to in rig.transport.sent if to == ANNOUNCE_GROUP]
    # The first of the 10 copies, at once: NAT-PMP's address (RFC 6886 §3.2.1) with the new
    # epoch, and PCP's ANNOUNCE (RFC 6887 §14.1.3).
    nat_pmp = natpmp.decode_response(announced[0])
    assert isinstance(nat_pmp, NatPmpExternalAddressResponse) and nat_pmp.address == EXTERNAL
    assert nat_pmp.epoch < 5
    assert pcp.decode_response(announced[1]).opcode is PcpOpcode.ANNOUNCE


def test_rate_limiter_refills_with_time_and_forgets_the_least_recent() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    host = IPv4Address("192.168.1.10")
    assert [limiter.allow(host, now=0.0) for _ in range(4)] == [True, True, True, False]
    assert not limiter.allow(host, now=0.4)  # 0.8 tokens
    assert limiter.allow(host, now=0.6)  # 1.2 tokens
    assert [limiter.allow(host, now=100.0) for _ in range(4)] == [True, True, True, False]
    # Bounded: once MAX_TRACKED_CLIENTS others have asked, the host starts afresh.
    for n in range(MAX_TRACKED_CLIENTS):
        limiter.allow(IPv4Address(int(IPv4Address("10.0.0.0")) + n), now=100.0)
    assert limiter.allow(host, now=100.0)
