"""`PortMapper.pinhole()` against a scripted PCP server on [::1] (a firewall: the answer's
address and port are the internal ones, pinholes kept by nonce): renewal with the same
nonce, the epoch of the IPv6 server kept apart from the IPv4 one, a restart told by a
Mapping Update re-opening the pinhole, the state file across runs, and release."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from igd.client import EventKind, Pinhole, PortMapper, PortUnavailable, StateFile
from igd.client.mechanisms import Grant
from igd.model import Mechanism
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpResponse, PcpResult

LOOPBACK = IPv6Address("::1")


@dataclass
class Pcp6Server:
    """MAP and ANNOUNCE over IPv6; `epoch` is what it answers, `held` its pinholes."""

    sock: socket.socket
    epoch: int = 5000
    held: dict[tuple[int, int], bytes] = field(default_factory=dict)
    requests: list[tuple[int, PcpMapData]] = field(default_factory=list)
    announces: int = 0
    client: tuple[str, int] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def answer(self, request: bytes) -> bytes:
        decoded = pcp.decode_request(request)
        if decoded.opcode is PcpOpcode.ANNOUNCE:
            self.announces += 1
            return pcp.encode_response(
                PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, self.epoch)
            )
        data = decoded.data
        assert isinstance(data, PcpMapData)
        self.requests.append((decoded.lifetime, data))
        key = (data.protocol, data.internal_port)
        if self.held.get(key, data.nonce) != data.nonce:
            return pcp.encode_response(
                PcpResponse(PcpOpcode.MAP, PcpResult.NOT_AUTHORIZED, 1800, self.epoch, data)
            )
        if decoded.lifetime:
            self.held[key] = data.nonce
        else:
            self.held.pop(key, None)
        # RFC 6887 §11.3 on a pure firewall: the "external" endpoint is the internal one.
        body = PcpMapData(
            data.nonce, data.protocol, data.internal_port, data.internal_port,
            decoded.client_address,
        )  # fmt: skip
        lifetime = min(decoded.lifetime, 600)
        return pcp.encode_response(
            PcpResponse(PcpOpcode.MAP, PcpResult.SUCCESS, lifetime, self.epoch, body)
        )

    def restart(self) -> None:
        """Lose every pinhole; the epoch starts again (RFC 6887 §8.5)."""
        self.held.clear()
        self.epoch = 1

    def announce(self) -> None:
        """An unsolicited ANNOUNCE to the client's request socket (RFC 6887 §14.1.3)."""
        assert self.client is not None
        answer = PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, self.epoch)
        self.sock.sendto(pcp.encode_response(answer), self.client)


@pytest.fixture
async def server() -> AsyncIterator[Pcp6Server]:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::1", 0))  # any port: ::1 is one address for every test run on the host
    sock.setblocking(False)
    served = Pcp6Server(sock)

    def ready() -> None:
        data, peer = sock.recvfrom(2048)
        served.client = peer[:2]
        sock.sendto(served.answer(data), peer)

    loop = asyncio.get_running_loop()
    loop.add_reader(sock, ready)
    try:
        yield served
    finally:
        loop.remove_reader(sock)
        sock.close()


def mapper(server: Pcp6Server, **options: object) -> PortMapper:
    pm = PortMapper(
        "127.0.0.1", gateway6=LOOPBACK, listen=False, recovery_delay=0.0, disable=["upnp"],
        network_check=None, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    pm.six.pcp_port = server.port
    return pm


async def test_a_pinhole_is_the_hosts_own_endpoint_renewed_with_its_nonce(
    server: Pcp6Server,
) -> None:
    async with mapper(server) as pm:
        pinhole = await pm.pinhole(8080, "tcp", lifetime=300, description="web")
        assert isinstance(pinhole, Pinhole) and pinhole.family == 6
        assert (pinhole.address, pinhole.port, pinhole.mechanism) == (LOOPBACK, 8080, Mechanism.PCP)
        assert pinhole.lifetime == 300 and pinhole.unique_id is None
        await pinhole.renew()
        assert [d.nonce for _, d in server.requests] == [pinhole.grant.nonce] * 2
        # Asking again for the same port refreshes the pinhole held (one nonce per port).
        assert await pm.pinhole(8080, "tcp", lifetime=300) is pinhole
        assert len(server.held) == 1
    assert server.held == {}  # released on close
    assert server.requests[-1][0] == 0


async def test_a_restart_told_by_an_announcement_reopens_the_pinhole(server: Pcp6Server) -> None:
    async with mapper(server) as pm:
        pinhole = await pm.pinhole(8080, "udp", lifetime=300)
        events: list[EventKind] = []
        pinhole.subscribe(lambda e: events.append(e.kind))
        server.restart()
        assert server.held == {}
        server.announce()  # epoch 1 after 5000: the server lost its state (RFC 6887 §8.5)
        event = await pinhole.wait_for(EventKind.RECREATED, within=5)
        assert event.external_address == LOOPBACK
        assert list(server.held) == [(17, 8080)]  # open again, with the same nonce
        assert server.requests[-1][1].nonce == pinhole.grant.nonce
        assert EventKind.RECREATED in events


async def test_the_ipv6_epoch_is_not_compared_with_the_ipv4_one(server: Pcp6Server) -> None:
    async with mapper(server) as pm:
        pinhole = await pm.pinhole(8080, "tcp", lifetime=300)
        # An IPv4 PCP answer with a small epoch (another server, or the same one's IPv4
        # side) is no restart of the IPv6 server: the pinhole is left alone.
        pm.note_epoch(Grant(Mechanism.PCP, pm.gateway, 9000, 60, epoch=3))
        await asyncio.sleep(0.2)
        assert len(server.requests) == 1 and not pinhole.released


async def test_a_later_run_refreshes_and_unmaps_the_pinhole_through_the_state_file(
    server: Pcp6Server, tmp_path: Path
) -> None:
    state = StateFile(tmp_path / "mappings.json")
    async with mapper(server, state=state) as pm:
        first = await pm.pinhole(8080, "tcp", lifetime=300)
        nonce = first.grant.nonce
        await first.detach()
    async with mapper(server, state=state) as pm:
        [record] = pm.stored()
        assert (record.family, record.internal_address, record.nonce) == (
            6, "::1", nonce.hex() if nonce else None,
        )  # fmt: skip
        again = await pm.pinhole(8080, "tcp", lifetime=300)
        assert again.grant.nonce == nonce  # not refused as another nonce would be
        await again.detach()
    async with mapper(server, state=state) as pm:
        assert await pm.unmap(8080, "tcp", family=6)
        assert server.held == {} and pm.stored() == []
        assert not await pm.unmap(8080, "tcp", family=6)
        with pytest.raises(ValueError, match="4 or 6"):
            await pm.unmap(8080, "tcp", family=5)


async def test_natpmp_cannot_open_a_pinhole(server: Pcp6Server) -> None:
    async with mapper(server) as pm:
        with pytest.raises(ValueError, match="natpmp"):
            await pm.pinhole(8080, "tcp", via="natpmp")


async def test_a_remote_prefix_is_pcp_only_and_a_remote_must_be_ipv6(server: Pcp6Server) -> None:
    async with mapper(server) as pm:
        # WANIPv6FirewallControl's RemoteHost is one address: a prefix cannot go over UPnP.
        with pytest.raises(ValueError, match="upnp"):
            await pm.pinhole(8080, "tcp", via="upnp", remote="2001:db8:1::/48")
        with pytest.raises(ValueError, match="IPv6"):
            await pm.pinhole(8080, "tcp", remote="192.0.2.1")
        with pytest.raises(ValueError, match="remote_port"):
            await pm.pinhole(8080, "tcp", remote_port=70000)
        assert server.held == {}


async def test_a_pinhole_answered_on_another_port_is_refused(server: Pcp6Server) -> None:
    # A NAT66 (or a broken firewall) granting another port: a pinhole there reaches nothing.
    plain = server.answer

    def other_port(request: bytes) -> bytes:
        answer = plain(request)
        got = pcp.decode_response(answer)
        if not isinstance(got.data, PcpMapData):
            return answer  # ANNOUNCE as it is
        body = PcpMapData(
            got.data.nonce, got.data.protocol, got.data.internal_port, 18080,
            got.data.external_address,
        )  # fmt: skip
        return pcp.encode_response(
            PcpResponse(got.opcode, got.result, got.lifetime, got.epoch, body)
        )

    server.answer = other_port  # type: ignore[method-assign]
    async with mapper(server) as pm:
        with pytest.raises(PortUnavailable, match="18080"):
            await pm.pinhole(8080, "tcp", lifetime=300)
        assert pm.mappings == []
    assert server.held == {}  # what the router opened on the wrong port is closed again


async def test_a_forged_multicast_announcement_is_only_a_hint_asked_once(
    server: Pcp6Server,
) -> None:
    # What [ff02::1]:5350 hears can come from anyone on the link: epoch 1 there must not
    # re-open pinholes by itself, only make the client ask its server (at most once a
    # second), whose own epoch has not gone back.
    async with mapper(server) as pm:
        pinhole = await pm.pinhole(8080, "tcp", lifetime=300)
        asked = server.announces  # the probe's own ANNOUNCE
        forged = PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, 1)
        for _ in range(3):  # bursts within a second, the first one's question answered
            for _ in range(20):
                pm.six._heard(pcp.encode_response(forged))
                pm.six._heard(b"\x02\x80garbage")  # undecodable: ignored
            await asyncio.sleep(0.1)
        assert server.announces == asked + 1
        assert len(server.requests) == 1 and not pinhole.released
        assert list(server.held) == [(6, 8080)]
