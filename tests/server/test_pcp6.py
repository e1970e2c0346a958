"""PCP over IPv6 on the pinhole service, with the memory backend and an in-memory store."""

from __future__ import annotations

import random
import sqlite3
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from igd.model import Protocol
from igd.pinhole import PinholeKey, PinholeRules
from igd.proto import pcp
from igd.proto.pcp import (
    PcpDescription,
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpPreferFailure,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
    PcpUnknownOption,
)
from igd.server.backends.pinholes import MemoryPinholeBackend, PinholeEntry
from igd.server.pcp6 import Pcp6Handler, Pcp6Server
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import PinholeService
from igd.server.pxp import RateLimiter
from igd.server.store import Clock

LAN = IPv6Network("2001:db8:0:77::/64")
A = IPv6Address("2001:db8:0:77::a")
B = IPv6Address("2001:db8:0:77::b")
NONCE = bytes(range(12))


def make(path: Path | None = None) -> tuple[Pcp6Handler, PinholeService, MemoryPinholeBackend]:
    backend = MemoryPinholeBackend()
    store = PinholeStore(path or Path(":memory:"))
    service = PinholeService(PinholeRules((LAN,)), backend, store)
    return Pcp6Handler(service, max_filters=2), service, backend


def wire(lifetime: int, *options: PcpOption, client: IPv6Address = A, nonce: bytes = NONCE,
         protocol: int = 6, port: int = 8080) -> bytes:  # fmt: skip
    data = PcpMapData(nonce, protocol, port, 0, IPv6Address(0))
    return pcp.encode_request(PcpRequest(PcpOpcode.MAP, lifetime, client, data, options))


async def answer(
    handler: Pcp6Handler, data: bytes, source: IPv6Address = A, *, now: float = 100.0
) -> PcpResponse:
    reply = await handler.answer(data, source, now=now)
    assert reply is not None
    return pcp.decode_response(reply)


async def test_map_opens_a_pinhole_at_the_internal_endpoint_and_echoes_options() -> None:
    handler, service, backend = make()
    await service.restore(now=100.0)
    options = (
        PcpPreferFailure(),
        PcpDescription("game"),
        PcpFilter(64, 0, IPv6Address("2001:db8:0:1::")),
    )
    response = await answer(handler, wire(600, *options))
    assert response.result is PcpResult.SUCCESS and response.lifetime == 600
    assert isinstance(response.data, PcpMapData)
    assert (response.data.external_address, response.data.external_port) == (A, 8080)
    assert response.options == options
    assert {e.remote.network for e in backend.held if e.remote} == {
        IPv6Network("2001:db8:0:1::/64")
    }
    hole = service.get(PinholeKey(A, Protocol.TCP, 8080))
    assert hole is not None and hole.description == "game"


async def test_refusals_leave_no_state() -> None:
    handler, service, backend = make()
    await service.restore(now=100.0)
    cases = [
        (wire(600, client=B), PcpResult.ADDRESS_MISMATCH),
        (wire(600, protocol=0, port=0), PcpResult.UNSUPP_PROTOCOL),
        (wire(600, PcpThirdParty(B)), PcpResult.NOT_AUTHORIZED),  # secure mode
        (wire(600, PcpUnknownOption(90, b"")), PcpResult.UNSUPP_OPTION),
        (wire(600, port=80), PcpResult.NOT_AUTHORIZED),  # min_port
        (wire(0, PcpFilter(128, 0, B)), PcpResult.MALFORMED_OPTION),  # §13.3
        (
            wire(600, *(PcpFilter(128, 0, IPv6Address(f"2001:db8:0:1::{i}")) for i in range(1, 4))),
            PcpResult.EXCESSIVE_REMOTE_PEERS,
        ),
    ]
    for data, result in cases:
        assert (await answer(handler, data)).result is result, result
    assert service.count() == 0 and backend.held == {}
    assert await handler.answer(b"\x02\x01", A, now=100.0) is None  # too short: dropped


async def test_a_failed_kernel_commit_answers_no_resources_and_keeps_the_old_pinhole() -> None:
    handler, service, backend = make()
    await service.restore(now=100.0)
    assert (await answer(handler, wire(600))).result is PcpResult.SUCCESS
    before = service.pinholes()
    backend.fail_next = 1
    assert (await answer(handler, wire(3600))).result is PcpResult.NO_RESOURCES
    assert service.pinholes() == before
    assert set(backend.held) == {PinholeEntry(A, Protocol.TCP, 8080)}


async def test_a_failed_store_commit_takes_the_kernel_change_back(tmp_path: Path) -> None:
    handler, service, backend = make(tmp_path / "leases.sqlite")
    await service.restore(now=100.0)
    service.store._db.execute("DROP TABLE pinholes")  # the store can no longer write
    with pytest.raises(sqlite3.Error):
        service.store.apply([], [], service._clock)  # sanity: the store is broken
    assert (await answer(handler, wire(600))).result is PcpResult.NO_RESOURCES
    assert service.count() == 0 and backend.held == {}


async def test_pinholes_and_the_epoch_survive_a_restart(tmp_path: Path) -> None:
    handler, service, _ = make(tmp_path / "leases.sqlite")
    await service.restore(now=100.0, clock=Clock(wall=5000.0, mono=100.0))
    await answer(handler, wire(600))
    service.store.close()
    # A restart 100 s later: the monotonic clock started again, the wall clock went on.
    handler2, service2, backend2 = make(tmp_path / "leases.sqlite")
    assert await service2.restore(now=200.0, clock=Clock(wall=5100.0, mono=200.0)) == 1
    assert set(backend2.held) == {PinholeEntry(A, Protocol.TCP, 8080)}
    assert service2.epoch(now=200.0) == 100
    # Another nonce cannot renew or delete it; the original can.
    stolen = await answer(handler2, wire(600, nonce=b"z" * 12), now=200.0)
    # RFC 6887 §11.3: refused with the lifetime left on the pinhole it hit.
    assert stolen.result is PcpResult.NOT_AUTHORIZED and stolen.lifetime == 500
    assert stolen.epoch == 100
    refused = await answer(handler2, wire(0, nonce=b"z" * 12), now=200.0)
    assert refused.result is PcpResult.NOT_AUTHORIZED
    assert (await answer(handler2, wire(0), now=200.0)).result is PcpResult.SUCCESS
    assert backend2.held == {}


def test_only_lan_and_link_local_sources_are_answered() -> None:
    handler, _, _ = make()
    server = Pcp6Server(["br-lan"], handler, [LAN], RateLimiter(10, 10))
    assert server.is_lan_source(A) and server.is_lan_source(IPv6Address("fe80::1"))
    assert not server.is_lan_source(IPv6Address("2001:db8:0:1::2"))


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self.sent.append((data, address))
        return len(data)


async def test_the_restart_announce_goes_out_ten_times_with_doubling_gaps() -> None:
    handler, service, _ = make()
    await service.restore(now=100.0)
    server = Pcp6Server(["lan0", "lan1"], handler, [LAN], RateLimiter(10, 10))
    sockets = {"lan0": _Recorder(), "lan1": _Recorder()}
    server._sockets = sockets  # type: ignore[assignment]
    gaps: list[float] = []

    async def pause(seconds: float) -> None:
        gaps.append(seconds)

    await server.announce(pause)
    # RFC 6887 §14.1.3: up to ten copies, first gap at least 250 ms, each gap at least double.
    assert gaps == [0.25 * 2**i for i in range(9)]
    for recorder in sockets.values():
        assert len(recorder.sent) == 10
        assert {address for _, address in recorder.sent} == {("ff02::1", 5350)}
        for data, _ in recorder.sent:
            response = pcp.decode_response(data)
            assert response.opcode is PcpOpcode.ANNOUNCE and response.result is PcpResult.SUCCESS


async def test_mutated_requests_get_an_answer_or_silence_never_an_exception() -> None:
    handler, service, _ = make()
    await service.restore(now=100.0)
    corpus = [
        wire(600, PcpPreferFailure(), PcpDescription("x"), PcpFilter(64, 0, B)),
        wire(0),
        wire(600, PcpThirdParty(B)),
        pcp.encode_request(PcpRequest(PcpOpcode.ANNOUNCE, 0, A)),
    ]
    rng = random.Random(6887)  # fixed: a failure names the same input every run
    for _ in range(3000):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            if rng.random() < 0.8:
                data[at] = rng.randrange(256)
            else:
                del data[at:]
                data += rng.randbytes(rng.randint(0, 40))
        reply = await handler.answer(bytes(data), A, now=100.0)
        if reply is not None:
            assert len(reply) >= 24 and reply[0] == 2 and reply[1] & 0x80, bytes(data)
    # Whatever the mutations opened is A's own (secure mode), and A is still served.
    assert all(hole.key.internal_address == A for hole in service.pinholes())
    assert (await answer(handler, wire(600, port=9090))).result is PcpResult.SUCCESS
