"""PCP client (RFC 6887): ANNOUNCE, MAP and PEER with THIRD_PARTY, PREFER_FAILURE, FILTER
and DESCRIPTION (RFC 7220); answers checked against the request (nonce included) and
retransmitted on the RFC's schedule; a NAT-PMP-only server is recognised (§9)."""

from __future__ import annotations

import itertools
import random
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from igd.client.errors import (
    GatewayTimeout,
    NoGatewayError,
    PortMappingError,
    PortUnavailable,
    ProtocolError,
    UnsupportedVersion,
    pcp_error,
)
from igd.client.timing import PCP_IRT, pcp_waits
from igd.client.udp import ChannelClient, UdpChannel
from igd.model import Mechanism, Protocol
from igd.proto import pcp
from igd.proto.errors import DecodeError
from igd.proto.pcp import (
    PcpDescription,
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpPeerData,
    PcpPreferFailure,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
    mapped,
    unmapped,
)

# RFC 7488 §4: give one server address four transmissions (3 + 6 + 12 + 24 s ≈ 45 s).
MAX_TRANSMISSIONS = 4
ANY_V4 = mapped(IPv4Address(0))  # ::ffff:0:0, "any IPv4 address" (erratum 3621)


def new_nonce() -> bytes:
    """A random 96-bit mapping nonce (RFC 6887 §11.1)."""
    return secrets.token_bytes(pcp.NONCE_SIZE)


@dataclass(frozen=True, slots=True)
class PcpGrant:
    """A granted MAP or PEER mapping."""

    protocol: Protocol
    internal_port: int
    external_address: IPv4Address
    external_port: int
    lifetime: int
    epoch: int
    nonce: bytes
    description: str | None = None
    """The description the server stored and echoed (None if it ignored the option)."""


class PcpChannelClient(ChannelClient):
    """What PCP over IPv4 and over IPv6 share: the retransmission schedule (RFC 6887 §8.1.1)
    and the unsolicited answers (ANNOUNCE, Mapping Update) handed to `on_unsolicited`."""

    transmissions: int
    first_wait: float
    rand: Callable[[], float]
    on_unsolicited: Callable[[PcpResponse], None] | None

    def _unsolicited(self, data: bytes) -> None:
        try:
            response = pcp.decode_response(data)
        except DecodeError:
            return
        if self.on_unsolicited is not None:
            self.on_unsolicited(response)

    def _waits(self, waits: Iterable[float] | None, transmissions: int | None) -> Iterable[float]:
        """`waits` if given, else the RFC's schedule for `transmissions` (default: ours)."""
        if waits is not None:
            return waits
        return itertools.islice(
            pcp_waits(self.rand, irt=self.first_wait), transmissions or self.transmissions
        )


class PcpClient(PcpChannelClient):
    """Talks PCP to one server. Keep it open: the server sends Mapping Updates and ANNOUNCEs
    to the address and port the requests came from, and `on_unsolicited` receives them.

    A server with several addresses (`also`: its other addresses, in order of preference)
    is reached as RFC 7488 §3 says: MRC 4 transmissions to one address, then the next one
    (at once after a hard ICMP error); the address that answered is kept for later requests;
    when none answers, `GatewayTimeout` says to repeat in 15 minutes (`retry_after`).
    """

    channel: UdpChannel[IPv4Address]

    def __init__(
        self,
        gateway: IPv4Address | str,
        *,
        also: Sequence[IPv4Address | str] = (),
        transmissions: int = MAX_TRANSMISSIONS,
        first_wait: float = PCP_IRT,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.gateway = IPv4Address(gateway)
        self.addresses = tuple(dict.fromkeys([self.gateway, *map(IPv4Address, also)]))
        """Every address of the server; `gateway` is the one in use."""
        self.transmissions = transmissions
        self.first_wait = first_wait
        self.rand = rand
        self.channel = self._channel(self.gateway)
        self.on_unsolicited: Callable[[PcpResponse], None] | None = None
        self._closed = False

    def _channel(self, address: IPv4Address) -> UdpChannel[IPv4Address]:
        channel = UdpChannel(address, pcp.SERVER_PORT)
        channel.on_unsolicited = self._unsolicited
        return channel

    def close(self) -> None:
        """Close the socket."""
        self._closed = True
        super().close()

    async def open(self) -> None:
        """Open the socket."""
        self._closed = False
        await super().open()

    @property
    def local_address(self) -> IPv4Address:
        return self.channel.local_address

    async def announce(
        self, *, transmissions: int | None = None, waits: Sequence[float] | None = None
    ) -> PcpResponse:
        """Solicited ANNOUNCE (RFC 6887 §14.1.1): is PCP there, and its epoch; `waits`
        replaces the retransmission schedule (a probe cannot wait 3 s)."""
        await self.open()
        request = PcpRequest(PcpOpcode.ANNOUNCE, 0, mapped(self.local_address))

        def match(response: PcpResponse) -> bool:
            return response.opcode is PcpOpcode.ANNOUNCE

        response = await self._exchange(request, match, transmissions, "ANNOUNCE", waits)
        return succeeded(response, "ANNOUNCE")

    async def map(
        self,
        protocol: Protocol,
        internal_port: int,
        lifetime: int,
        *,
        nonce: bytes,
        external_port: int = 0,
        external_address: IPv4Address | None = None,
        third_party: IPv4Address | None = None,
        prefer_failure: bool = False,
        filters: Sequence[tuple[IPv4Address, int, int]] = (),
        description: str | None = None,
        transmissions: int | None = None,
    ) -> PcpGrant:
        """MAP (RFC 6887 §11): create or renew (lifetime > 0) or delete (lifetime 0).

        `filters` are (remote address, prefix length within IPv4, remote port) triples for
        the FILTER option. Renew with the same nonce and the assigned port as suggestion.
        """
        suggested = mapped(external_address) if external_address else ANY_V4
        data = PcpMapData(nonce, protocol.number, internal_port, external_port, suggested)
        options = _options(third_party, prefer_failure, filters, description)
        response = await self._request(PcpOpcode.MAP, lifetime, data, options, transmissions)
        grant = _grant(response, protocol, internal_port, nonce)
        # RFC 6887 §13.2: with PREFER_FAILURE, a success must carry what was suggested.
        if prefer_failure and external_port and grant.external_port != external_port:
            raise PortUnavailable(
                f"PCP server gave port {grant.external_port}, not {external_port}",
                mechanism=Mechanism.PCP,
            )
        return grant

    async def unmap(
        self,
        protocol: Protocol,
        internal_port: int,
        *,
        nonce: bytes,
        third_party: IPv4Address | None = None,
        transmissions: int | None = None,
    ) -> int:
        """Delete a MAP mapping: lifetime 0, suggested port 0 and address ::ffff:0:0
        (erratum 3621); the epoch. Deleting what does not exist succeeds (§15.1)."""
        data = PcpMapData(nonce, protocol.number, internal_port, 0, ANY_V4)
        options = _options(third_party, False, (), None)
        response = await self._request(PcpOpcode.MAP, 0, data, options, transmissions)
        return response.epoch

    async def peer(
        self,
        protocol: Protocol,
        internal_port: int,
        remote_address: IPv4Address,
        remote_port: int,
        lifetime: int,
        *,
        nonce: bytes,
        external_port: int = 0,
        third_party: IPv4Address | None = None,
        description: str | None = None,
        transmissions: int | None = None,
    ) -> PcpGrant:
        """PEER (RFC 6887 §12): create or extend the outbound mapping toward one peer."""
        data = PcpPeerData(
            nonce, protocol.number, internal_port, external_port, ANY_V4,
            remote_port, mapped(remote_address),
        )  # fmt: skip
        options = _options(third_party, False, (), description)
        response = await self._request(PcpOpcode.PEER, lifetime, data, options, transmissions)
        return _grant(response, protocol, internal_port, nonce)

    async def _request(
        self,
        opcode: PcpOpcode,
        lifetime: int,
        data: PcpMapData | PcpPeerData,
        options: tuple[PcpOption, ...],
        transmissions: int | None,
    ) -> PcpResponse:
        await self.open()
        request = PcpRequest(opcode, lifetime, mapped(self.local_address), data, options)

        def match(response: PcpResponse) -> bool:
            got = response.data
            if response.opcode is not opcode or type(got) is not type(data) or got is None:
                return False
            same = (got.nonce, got.protocol, got.internal_port) == (
                data.nonce, data.protocol, data.internal_port,
            )  # fmt: skip
            if isinstance(got, PcpPeerData) and isinstance(data, PcpPeerData):
                same = same and (got.remote_address, got.remote_port) == (
                    data.remote_address, data.remote_port,
                )  # fmt: skip
            return same

        what = f"{opcode.name} {'delete' if not lifetime else 'request'}"
        return succeeded(await self._exchange(request, match, transmissions, what), what)

    async def _exchange(
        self,
        request: PcpRequest,
        match: Callable[[PcpResponse], bool],
        transmissions: int | None,
        what: str,
        waits: Iterable[float] | None = None,
    ) -> PcpResponse:
        matcher = answer_matcher(match)
        payload = pcp.encode_request(request)
        if len(self.addresses) == 1:
            return await self.channel.exchange(
                payload, matcher, self._waits(waits, transmissions), f"PCP {what}"
            )
        # RFC 7488 §3 step 6: the address that answered first, then the others in order.
        failures = []
        for address in (self.gateway, *(a for a in self.addresses if a != self.gateway)):
            if address != self.gateway:
                await self._use(address)
            try:
                return await self.channel.exchange(
                    payload, matcher, self._waits(waits, transmissions), f"PCP {what}"
                )
            except NoGatewayError as exc:
                # Step 4: no answer after MRC transmissions, or a hard ICMP error at once.
                if self._closed:
                    raise
                failures.append(f"{address}: {exc}")
        # Step 5: every address tried; repeat every 15 minutes until one answers.
        raise GatewayTimeout(
            f"no address of the PCP server answered the {what}: {'; '.join(failures)}",
            mechanism=Mechanism.PCP,
            retry_after=SERVER_RETRY,
        )

    async def _use(self, address: IPv4Address) -> None:
        """Talk to another address of the server from now on (a late answer to the one
        given up on is dropped with its socket, RFC 7488 §3 step 4)."""
        self.channel.close()
        self.gateway, self.channel = address, self._channel(address)
        await self.channel.open()


def succeeded(response: PcpResponse, what: str) -> PcpResponse:
    """`response` if it is a success, else the error its result code stands for."""
    if response.result != PcpResult.SUCCESS:
        raise pcp_error(response.result, response.lifetime, what)
    return response


def answer_matcher(
    match: Callable[[PcpResponse], bool],
) -> Callable[[bytes], PcpResponse | PortMappingError | None]:
    """A datagram matcher for `UdpChannel.exchange`: the matching answer, UnsupportedVersion
    for a server of another version, None for anything else."""

    def matcher(data: bytes) -> PcpResponse | PortMappingError | None:
        if len(data) >= 4 and data[0] != pcp.VERSION and data[3] == PcpResult.UNSUPP_VERSION:
            # RFC 6887 §9 and appendix A: a NAT-PMP server's "unsupported version" names
            # version 0; the caller falls back to NAT-PMP for this request only.
            # For a version this client cannot speak, RFC 6887 §9 step 5: retry in
            # 30 minutes (or the answer's lifetime, if shorter): the server may have been
            # upgraded by then.
            return UnsupportedVersion(
                f"the gateway does not speak PCP (it offers version {data[0]})",
                version=data[0],
                mechanism=Mechanism.PCP,
                code=int(PcpResult.UNSUPP_VERSION),
                retry_after=None if data[0] == 0 else _version_retry(data),
            )
        try:
            response = pcp.decode_response(data)
        except DecodeError:
            return None
        return response if match(response) else None

    return matcher


SERVER_RETRY = 900.0  # RFC 7488 §3 step 5: no address answered; try again in 15 minutes
VERSION_RETRY = 1800.0  # RFC 6887 §9: retry an unsupported-version server after 30 minutes


def _version_retry(data: bytes) -> float:
    """min(30 minutes, the answer's lifetime) for an UNSUPP_VERSION answer (RFC 6887 §9)."""
    if len(data) >= 8:
        lifetime = int.from_bytes(data[4:8], "big")  # where version 2 carries it
        if lifetime:
            return min(VERSION_RETRY, float(lifetime))
    return VERSION_RETRY


def _options(
    third_party: IPv4Address | None,
    prefer_failure: bool,
    filters: Sequence[tuple[IPv4Address, int, int]],
    description: str | None,
) -> tuple[PcpOption, ...]:
    options: list[PcpOption] = []
    if third_party is not None:
        options.append(PcpThirdParty(mapped(third_party)))
    if prefer_failure:
        options.append(PcpPreferFailure())
    for address, prefix, port in filters:
        # RFC 6887 §13.3: an IPv4 filter's prefix length counts the 96-bit mapped prefix.
        options.append(PcpFilter(96 + prefix, port, mapped(address)))
    if description is not None:
        options.append(description_option(description))
    return tuple(options)


def description_option(description: str) -> PcpDescription:
    """The DESCRIPTION option (RFC 7220), cut to what fits, on a character boundary."""
    text = description.encode()[: pcp.DESCRIPTION_MAX].decode(errors="ignore")
    return PcpDescription(text)


def _grant(response: PcpResponse, protocol: Protocol, internal_port: int, nonce: bytes) -> PcpGrant:
    data = response.data
    assert isinstance(data, PcpMapData | PcpPeerData)  # matched on opcode above
    address = _v4(data.external_address)
    if response.lifetime and (address is None or data.external_port == 0):
        raise ProtocolError(
            f"PCP success without a usable external address or port: {data}",
            mechanism=Mechanism.PCP,
        )
    described = next((o.text for o in response.options if isinstance(o, PcpDescription)), None)
    return PcpGrant(
        protocol,
        internal_port,
        address or IPv4Address(0),
        data.external_port,
        response.lifetime,
        response.epoch,
        nonce,
        described,
    )


def _v4(address: IPv6Address) -> IPv4Address | None:
    return unmapped(address)
