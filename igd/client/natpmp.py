"""NAT-PMP client (RFC 6886): external address, map, unmap, over the codec in igd.proto."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from ipaddress import IPv4Address

from igd.client.errors import (
    PortMappingError,
    ProtocolError,
    UnsupportedVersion,
    natpmp_error,
)
from igd.client.timing import NATPMP_ATTEMPTS, NATPMP_FIRST_WAIT, natpmp_waits
from igd.client.udp import ChannelClient, Matcher, T, UdpChannel
from igd.model import Mechanism, Protocol
from igd.proto import natpmp
from igd.proto.errors import DecodeError
from igd.proto.natpmp import (
    NatPmpExternalAddressRequest,
    NatPmpExternalAddressResponse,
    NatPmpMapRequest,
    NatPmpMapResponse,
    NatPmpResult,
)


@dataclass(frozen=True, slots=True)
class NatPmpGrant:
    """A granted NAT-PMP mapping: what the gateway answered."""

    protocol: Protocol
    internal_port: int
    external_port: int
    lifetime: int
    epoch: int


class NatPmpClient(ChannelClient):
    """Talks NAT-PMP to one gateway; requests go out one at a time (RFC 6886 §3.1)."""

    def __init__(
        self,
        gateway: IPv4Address | str,
        *,
        attempts: int = NATPMP_ATTEMPTS,
        first_wait: float = NATPMP_FIRST_WAIT,
    ) -> None:
        self.gateway = IPv4Address(gateway)
        self.attempts = attempts
        self.first_wait = first_wait
        self.channel = UdpChannel(self.gateway, natpmp.SERVER_PORT)
        self._lock = asyncio.Lock()

    async def external_address(
        self, *, attempts: int | None = None
    ) -> NatPmpExternalAddressResponse:
        """Opcode 0: the gateway's external address and epoch; typed error on a refusal."""
        wire = natpmp.encode_request(NatPmpExternalAddressRequest())
        response = await self._exchange(wire, _match_address, attempts, "external address request")
        if response.result != NatPmpResult.SUCCESS:
            raise natpmp_error(response.result, "external address request")
        return response

    async def map(
        self,
        protocol: Protocol,
        internal_port: int,
        external_port: int,
        lifetime: int,
        *,
        attempts: int | None = None,
    ) -> NatPmpGrant:
        """Create or renew a mapping (RFC 6886 §3.3); the gateway may pick another port."""
        if lifetime <= 0:
            raise ValueError("lifetime must be positive; use unmap() to delete")
        response = await self._map(protocol, internal_port, external_port, lifetime, attempts)
        if response.external_port == 0 or response.lifetime == 0:
            raise ProtocolError(
                f"NAT-PMP gateway answered success without a mapping: {response}",
                mechanism=Mechanism.NATPMP,
            )
        return NatPmpGrant(
            protocol, internal_port, response.external_port, response.lifetime, response.epoch
        )

    async def unmap(
        self, protocol: Protocol, internal_port: int, *, attempts: int | None = None
    ) -> int:
        """Delete a mapping: lifetime 0 and suggested port 0 (RFC 6886 §3.4); the epoch.

        Internal port 0 deletes all of this host's mappings of that protocol.
        """
        response = await self._map(protocol, internal_port, 0, 0, attempts)
        return response.epoch

    async def _map(
        self,
        protocol: Protocol,
        internal_port: int,
        external_port: int,
        lifetime: int,
        attempts: int | None,
    ) -> NatPmpMapResponse:
        request = NatPmpMapRequest(protocol, internal_port, external_port, lifetime)
        wire = natpmp.encode_request(request)

        def match(data: bytes) -> NatPmpMapResponse | PortMappingError | None:
            answer = _decode(data)
            if isinstance(answer, NatPmpMapResponse):
                ours = answer.protocol is protocol and answer.internal_port == internal_port
                return answer if ours else None
            return answer if isinstance(answer, PortMappingError) else None

        what = "map request" if lifetime else "delete request"
        response = await self._exchange(wire, match, attempts, what)
        if response.result != NatPmpResult.SUCCESS:
            raise natpmp_error(response.result, what)
        return response

    async def _exchange(
        self, wire: bytes, matcher: Matcher[T], attempts: int | None, what: str
    ) -> T:
        await self.open()
        waits = natpmp_waits(attempts or self.attempts, self.first_wait)
        async with self._lock:
            return await self.channel.exchange(wire, matcher, waits, f"NAT-PMP {what}")


def _decode(data: bytes) -> natpmp.NatPmpResponse | PortMappingError | None:
    if len(data) >= 4 and data[0] != natpmp.VERSION and data[3] == NatPmpResult.UNSUPPORTED_VERSION:
        return UnsupportedVersion(
            f"the gateway does not speak NAT-PMP (it asked for version {data[0]})",
            version=data[0],
            mechanism=Mechanism.NATPMP,
            code=1,
        )
    if len(data) >= 4 and data[0] == natpmp.VERSION and data[3] == 1 and len(data) < 12:
        # RFC 6886 §3.5 (erratum 3618): "unsupported version" is 8 octets; opcode 0 or 128.
        return natpmp_error(NatPmpResult.UNSUPPORTED_VERSION)
    try:
        return natpmp.decode_response(data)
    except DecodeError:
        return None  # not a NAT-PMP answer for us: ignore it, keep waiting


def _match_address(data: bytes) -> NatPmpExternalAddressResponse | PortMappingError | None:
    answer = _decode(data)
    if isinstance(answer, NatPmpExternalAddressResponse | PortMappingError):
        return answer
    return None
