"""PCP over IPv6 to a firewall (RFC 6887): ANNOUNCE, and MAP that opens, renews or closes a
pinhole. The client address is this host's global address, not the link-local one the
kernel would pick toward a link-local router (§8.1: the server is the default router)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address

from igd.client.errors import PortMappingError, PortUnavailable, ProtocolError
from igd.client.pcp import (
    MAX_TRANSMISSIONS,
    PcpChannelClient,
    answer_matcher,
    description_option,
    succeeded,
)
from igd.client.timing import PCP_IRT
from igd.client.udp import UdpChannel
from igd.model import Mechanism, Protocol
from igd.proto import pcp
from igd.proto.pcp import (
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpRequest,
    PcpResponse,
)

ANY_V6 = IPv6Address(0)  # RFC 6887 §11.1: "::" suggests no external address
CLOSE_WAIT = 1.0
"""Seconds to wait for the answer to closing a pinhole granted on the wrong port (sent once)."""


@dataclass(frozen=True, slots=True)
class Pcp6Grant:
    """An open pinhole: on a pure firewall `address` and `port` are the internal ones
    (RFC 6887 §11.3), but the answer is what counts."""

    protocol: Protocol
    internal_port: int
    address: IPv6Address
    port: int
    lifetime: int
    epoch: int
    nonce: bytes


class Pcp6Client(PcpChannelClient):
    """Talks PCP to one server over IPv6, from `local` (the address pinholes open to).
    Keep it open: ANNOUNCEs and Mapping Updates come to the request socket too."""

    channel: UdpChannel[IPv6Address]

    def __init__(
        self,
        gateway: IPv6Address | str,
        *,
        local: IPv6Address | None = None,
        scope: int = 0,
        port: int = pcp.SERVER_PORT,
        transmissions: int = MAX_TRANSMISSIONS,
        first_wait: float = PCP_IRT,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.gateway = IPv6Address(gateway)
        self.transmissions = transmissions
        self.first_wait = first_wait
        self.rand = rand
        self.channel = UdpChannel(self.gateway, port, local=local, scope=scope)
        self.channel.on_unsolicited = self._unsolicited
        self.on_unsolicited: Callable[[PcpResponse], None] | None = None

    @property
    def local_address(self) -> IPv6Address:
        return self.channel.local_address

    async def announce(self, *, waits: Sequence[float] | None = None) -> PcpResponse:
        """Solicited ANNOUNCE (RFC 6887 §14.1.1): is PCP there over IPv6, and its epoch."""
        await self.open()
        request = PcpRequest(PcpOpcode.ANNOUNCE, 0, self.local_address)
        response = await self._exchange(
            request, lambda r: r.opcode is PcpOpcode.ANNOUNCE, "ANNOUNCE", waits
        )
        return succeeded(response, "ANNOUNCE")

    async def map(
        self,
        protocol: Protocol,
        internal_port: int,
        lifetime: int,
        *,
        nonce: bytes,
        filters: Sequence[tuple[IPv6Address, int, int]] = (),
        description: str | None = None,
    ) -> Pcp6Grant:
        """MAP for this host's address: open or renew a pinhole (lifetime > 0) or close it
        (lifetime 0). `filters`: (remote address, prefix length, remote port) for FILTER."""
        # A firewall does not translate: suggest the internal port as the external one.
        data = PcpMapData(nonce, protocol.number, internal_port, internal_port, ANY_V6)
        options: list[PcpOption] = [PcpFilter(p, port, a) for a, p, port in filters]
        if description:
            options.append(description_option(description))
        response = await self._map(data, lifetime, tuple(options))
        got = response.data
        assert isinstance(got, PcpMapData)  # matched on it
        if lifetime and got.external_port == 0:
            raise ProtocolError(f"PCP success without a port: {got}", mechanism=Mechanism.PCP)
        if lifetime and got.external_port != internal_port:
            # A pinhole on another port than the service listens on would reach nothing: close
            # what the router just opened (once, briefly: the lease ends it otherwise), or no
            # one could, the nonce being ours alone.
            closing = PcpMapData(nonce, protocol.number, internal_port, 0, ANY_V6)
            with contextlib.suppress(PortMappingError, OSError):
                await self._map(closing, 0, (), waits=(CLOSE_WAIT,))
            raise PortUnavailable(
                f"PCP over IPv6 gave port {got.external_port}, not {internal_port}: a NAT66?",
                mechanism=Mechanism.PCP,
            )
        return Pcp6Grant(
            protocol, internal_port, got.external_address, got.external_port,
            response.lifetime, response.epoch, nonce,
        )  # fmt: skip

    async def unmap(self, protocol: Protocol, internal_port: int, *, nonce: bytes) -> int:
        """Close the pinhole (lifetime 0, RFC 6887 §15); the epoch. Closing what is not
        open succeeds."""
        data = PcpMapData(nonce, protocol.number, internal_port, 0, ANY_V6)
        return (await self._map(data, 0, ())).epoch

    async def _map(
        self,
        data: PcpMapData,
        lifetime: int,
        options: tuple[PcpOption, ...],
        waits: Iterable[float] | None = None,
    ) -> PcpResponse:
        await self.open()
        request = PcpRequest(PcpOpcode.MAP, lifetime, self.local_address, data, options)

        def match(response: PcpResponse) -> bool:
            got = response.data
            return (
                response.opcode is PcpOpcode.MAP
                and isinstance(got, PcpMapData)
                and (got.nonce, got.protocol, got.internal_port)
                == (data.nonce, data.protocol, data.internal_port)
            )

        what = f"MAP {'delete' if not lifetime else 'request'} over IPv6"
        return succeeded(await self._exchange(request, match, what, waits), what)

    async def _exchange(
        self,
        request: PcpRequest,
        match: Callable[[PcpResponse], bool],
        what: str,
        waits: Iterable[float] | None = None,
    ) -> PcpResponse:
        payload = pcp.encode_request(request)
        schedule = self._waits(waits, None)
        return await self.channel.exchange(payload, answer_matcher(match), schedule, f"PCP {what}")
