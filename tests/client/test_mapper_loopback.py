"""`PortMapper` against a scripted PCP server on a loopback address that keeps mappings by
nonce as RFC 6887 §11.1 says (another nonce for a held internal port is NOT_AUTHORIZED):
mapping a port twice, across runs with a state file, unmap, `async with`, timeouts."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from igd.client import GatewayTimeout, NotAuthorized, PortMapper, StateFile
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpResponse, PcpResult, mapped

EXTERNAL = IPv4Address("198.51.100.7")


@dataclass
class PcpServer:
    """MAP only: one mapping per (protocol, internal port), owned by its nonce."""

    address: str
    silent: bool = False
    held: dict[tuple[int, int], bytes] = field(default_factory=dict)
    requests: list[PcpMapData] = field(default_factory=list)
    next_port: int = 40000

    def answer(self, request: bytes) -> bytes | None:
        if self.silent:
            return None
        decoded = pcp.decode_request(request)
        data = decoded.data
        assert isinstance(data, PcpMapData)
        self.requests.append(data)
        key = (data.protocol, data.internal_port)
        owner = self.held.get(key)
        if owner is not None and owner != data.nonce:
            return pcp.encode_response(
                PcpResponse(decoded.opcode, PcpResult.NOT_AUTHORIZED, 1800, 5, data)
            )
        if decoded.lifetime == 0:
            self.held.pop(key, None)
        else:
            self.held[key] = data.nonce
        port = data.external_port or self.next_port
        body = PcpMapData(data.nonce, data.protocol, data.internal_port, port, mapped(EXTERNAL))
        return pcp.encode_response(PcpResponse(decoded.opcode, PcpResult.SUCCESS, 60, 5, body))

    @property
    def nonces(self) -> list[bytes]:
        return [r.nonce for r in self.requests]


@pytest.fixture
async def server() -> AsyncIterator[PcpServer]:
    address = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, pcp.SERVER_PORT))
    sock.setblocking(False)
    served = PcpServer(address)

    def ready() -> None:
        data, peer = sock.recvfrom(2048)
        reply = served.answer(data)
        if reply is not None:
            sock.sendto(reply, peer)

    loop = asyncio.get_running_loop()
    loop.add_reader(sock, ready)
    try:
        yield served
    finally:
        loop.remove_reader(sock)
        sock.close()


def mapper(server: PcpServer, **options: object) -> PortMapper:
    return PortMapper(server.address, listen=False, force="pcp", **options)  # type: ignore[arg-type]


async def test_mapping_a_port_twice_refreshes_the_same_mapping(server: PcpServer) -> None:
    async with mapper(server) as pm:
        first = await pm.map(7500, "tcp", lifetime=60)
        again = await pm.map(7500, "tcp", lifetime=60)
        assert again is first
        assert len(server.requests) == 2 and len(set(server.nonces)) == 1
        assert pm.mappings == [first]
    assert server.held == {}  # released on close


async def test_a_later_run_refreshes_the_mapping_through_the_state_file(
    server: PcpServer, tmp_path: Path
) -> None:
    state = StateFile(tmp_path / "state" / "mappings.json")
    async with mapper(server, state=state) as pm:
        first = await pm.map(7500, "udp", lifetime=60)
        port = first.external_port
        await first.detach()  # what `igd map` does: the mapping stays on the gateway
    assert state.path.stat().st_mode & 0o777 == 0o600
    [record] = state.records(now=time.time())
    assert (record.mechanism.value, record.external_port, record.internal_port) == (
        "pcp",
        port,
        7500,
    )
    assert record.nonce == server.nonces[0].hex()
    assert record.expires_at is not None and 55 < record.expires_at - time.time() <= 60
    async with mapper(server, state=state) as pm:  # another run: same nonce, same port
        second = await pm.map(7500, "udp", lifetime=60)
        assert (second.external_port, second.grant.nonce) == (port, server.nonces[0])
        assert any("earlier run" in note for note in second.to_dict()["notes"])
        await second.detach()
    server.silent = True  # an unmap that gets no answer fails and keeps the record
    async with mapper(server, state=state, request_timeout=0.3) as pm:
        with pytest.raises(GatewayTimeout):
            await pm.unmap(7500, "udp")
    assert len(state.records(now=time.time())) == 1
    server.silent = False
    async with mapper(server, state=state) as pm:  # and unmap without knowing the nonce
        assert await pm.unmap(7500, "udp")
        assert not await pm.unmap(7500, "udp")  # nothing left to delete
    assert server.held == {} and state.records(now=time.time()) == []


async def test_without_the_state_file_a_second_run_is_refused(server: PcpServer) -> None:
    # What the state file is for: a new nonce for a held port is refused, and the refusal
    # says not to repeat it (RFC 6887 §7.4 long error lifetime), not to retry it later.
    async with mapper(server) as pm:
        await (await pm.map(7500, "tcp", lifetime=60)).detach()
    async with mapper(server) as pm:
        with pytest.raises(NotAuthorized) as caught:
            await pm.map(7500, "tcp", lifetime=60)
    assert (caught.value.retry_after, caught.value.error_lifetime) == (None, 1800)


async def test_a_run_that_kept_its_nonce_renews_the_earlier_mapping(server: PcpServer) -> None:
    # What igd-server's upstream mirror does after a crash: the same nonce, so the server
    # renews the mapping the crashed run left (RFC 6887 §11.1) instead of refusing it.
    nonce = secrets.token_bytes(12)
    async with mapper(server) as pm:
        first = await pm.map(7500, "tcp", lifetime=60, nonce=nonce)
        assert first.grant.nonce == nonce
        await first.detach()
    async with mapper(server) as pm:
        again = await pm.map(7500, "tcp", lifetime=60, nonce=nonce)
        assert again.external_port == first.external_port
        assert server.held == {(6, 7500): nonce}
        with pytest.raises(ValueError, match="12 bytes"):
            await pm.map(7501, "tcp", nonce=b"short")


async def test_max_mappings_bounds_what_one_mapper_holds(server: PcpServer) -> None:
    async with mapper(server, max_mappings=3) as pm:
        for port in (7801, 7802, 7803):
            await pm.map(port, "udp", lifetime=60)
        with pytest.raises(ValueError, match="at most 3"):
            await pm.map(7804, "udp", lifetime=60)
        await pm.mappings[0].release()
        await pm.map(7804, "udp", lifetime=60)  # room again once one is released
        assert sorted(m.internal_port for m in pm.mappings) == [7802, 7803, 7804]
    assert server.held == {}


async def test_async_with_releases_the_mapping_at_the_end_of_the_block(server: PcpServer) -> None:
    async with mapper(server) as pm:
        async with pm.map(7600, "tcp", lifetime=60) as m:
            assert server.held == {(6, 7600): m.grant.nonce}
            assert m.expires_at is not None and m.remaining is not None
            assert abs(m.expires_at.timestamp() - (time.time() + m.remaining)) < 1
        assert server.held == {} and pm.mappings == []


async def test_every_call_takes_a_timeout_that_bounds_it(server: PcpServer) -> None:
    server.silent = True
    async with mapper(server) as pm:
        started = time.monotonic()
        with pytest.raises(GatewayTimeout):
            await pm.map(7700, "tcp", timeout=0.5)
        assert time.monotonic() - started < 5  # not the 30 s request timeout
    async with mapper(server, request_timeout=0.5) as pm:
        with pytest.raises(GatewayTimeout):
            await pm.map(7700, "tcp")


def test_disabled_or_forced_mechanisms() -> None:
    assert PortMapper(disable=["pcp"]).mechanisms == (
        PortMapper().mechanisms[1],
        PortMapper().mechanisms[2],
    )
    assert [m.value for m in PortMapper(force="upnp").mechanisms] == ["upnp"]
    with pytest.raises(ValueError):
        PortMapper(disable=["pcp", "natpmp", "upnp"])
    with pytest.raises(ValueError):
        PortMapper(force="pcp", disable=["pcp"])
