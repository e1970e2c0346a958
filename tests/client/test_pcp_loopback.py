"""The PCP client against a scripted server on a loopback address: nonce checking and the
RFC 6887 §9 answer of a NAT-PMP-only server."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from igd.client.errors import GatewayTimeout, UnsupportedVersion
from igd.client.pcp import PcpClient, new_nonce
from igd.model import Protocol
from igd.proto import natpmp, pcp
from igd.proto.pcp import PcpMapData, PcpResponse, PcpResult, mapped


def serve(answer: Callable[[bytes], list[bytes]]) -> tuple[str, socket.socket]:
    """A UDP server on 127.x.y.z:5351 answering each datagram with `answer(datagram)`."""
    address = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, pcp.SERVER_PORT))
    sock.setblocking(False)

    def ready() -> None:
        data, peer = sock.recvfrom(2048)
        for reply in answer(data):
            sock.sendto(reply, peer)

    asyncio.get_running_loop().add_reader(sock, ready)
    return address, sock


def map_reply(request: bytes, nonce: bytes | None = None) -> bytes:
    decoded = pcp.decode_request(request)
    data = decoded.data
    assert isinstance(data, PcpMapData)
    body = PcpMapData(
        nonce or data.nonce,
        data.protocol,
        data.internal_port,
        9000,
        mapped(IPv4Address("198.51.100.7")),
    )
    return pcp.encode_response(PcpResponse(decoded.opcode, PcpResult.SUCCESS, 60, 5, body))


async def test_answers_with_another_nonce_are_ignored() -> None:
    # A spoofed or stale answer (wrong nonce) first, the real one after it.
    address, sock = serve(lambda d: [map_reply(d, nonce=bytes(12)), map_reply(d)])
    try:
        async with PcpClient(address) as client:
            nonce = new_nonce()
            grant = await client.map(Protocol.TCP, 8080, 60, nonce=nonce, external_port=8080)
        assert (grant.external_port, grant.nonce, str(grant.external_address)) == (
            9000, nonce, "198.51.100.7",
        )  # fmt: skip
    finally:
        asyncio.get_running_loop().remove_reader(sock)
        sock.close()


async def test_natpmp_only_server_is_recognised_at_once() -> None:
    address, sock = serve(lambda d: [natpmp.encode_unsupported_version(7)])
    try:
        async with PcpClient(address) as client:
            with pytest.raises(UnsupportedVersion) as caught:
                async with asyncio.timeout(1):  # no retransmission wait: the answer is final
                    await client.map(Protocol.UDP, 5000, 60, nonce=new_nonce())
        assert caught.value.version == 0
    finally:
        asyncio.get_running_loop().remove_reader(sock)
        sock.close()


@pytest.mark.parametrize(("lifetime", "retry"), [(0, 1800.0), (600, 600.0), (7200, 1800.0)])
async def test_a_server_of_another_pcp_version_is_retried_after_30_minutes(
    lifetime: int, retry: float
) -> None:
    # RFC 6887 §9 step 5: version 3 only (this client speaks 2): retry in 30 minutes, or the
    # answer's lifetime if shorter, in case the server is upgraded.
    header = bytes([3, 0x80 | 1, 0, PcpResult.UNSUPP_VERSION]) + lifetime.to_bytes(4, "big")
    address, sock = serve(lambda d: [header + bytes(16)])
    try:
        async with PcpClient(address) as client:
            with pytest.raises(UnsupportedVersion) as caught:
                async with asyncio.timeout(1):
                    await client.map(Protocol.UDP, 5000, 60, nonce=new_nonce())
        assert (caught.value.version, caught.value.retry_after) == (3, retry)
    finally:
        asyncio.get_running_loop().remove_reader(sock)
        sock.close()


def _address() -> str:
    return f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.1"


async def test_several_server_addresses_are_tried_in_turn_and_the_answering_one_kept() -> None:
    # RFC 7488 §3: four transmissions to the first address, then the next; later requests go
    # to the address that answered.
    silent_requests: list[bytes] = []
    silent, silent_sock = serve(lambda d: silent_requests.append(d) or [])
    answering, answering_sock = serve(lambda d: [map_reply(d)])
    try:
        async with PcpClient(silent, also=[answering], first_wait=0.02) as client:
            grant = await client.map(Protocol.TCP, 8080, 60, nonce=new_nonce())
            assert grant.external_port == 9000
            assert len(silent_requests) == 4  # MRC 4
            assert str(client.gateway) == answering
            await client.map(Protocol.TCP, 8081, 60, nonce=new_nonce())
            assert len(silent_requests) == 4  # not asked again
    finally:
        for sock in (silent_sock, answering_sock):
            asyncio.get_running_loop().remove_reader(sock)
            sock.close()


async def test_a_hard_icmp_error_moves_to_the_next_address_at_once() -> None:
    answering, sock = serve(lambda d: [map_reply(d)])
    try:
        # Nothing listens on the first address: port unreachable, no retransmission wait.
        async with PcpClient(_address(), also=[answering], first_wait=5) as client:
            async with asyncio.timeout(2):
                await client.map(Protocol.UDP, 5000, 60, nonce=new_nonce())
    finally:
        asyncio.get_running_loop().remove_reader(sock)
        sock.close()


async def test_when_no_address_answers_the_retry_is_in_15_minutes() -> None:
    first, first_sock = serve(lambda d: [])
    second, second_sock = serve(lambda d: [])
    try:
        async with PcpClient(first, also=[second], first_wait=0.01) as client:
            with pytest.raises(GatewayTimeout) as caught:
                await client.map(Protocol.UDP, 5000, 60, nonce=new_nonce())
        assert caught.value.retry_after == 900
        assert first in str(caught.value) and second in str(caught.value)
    finally:
        for sock in (first_sock, second_sock):
            asyncio.get_running_loop().remove_reader(sock)
            sock.close()
