"""PCP (RFC 6887) on top of the gateway core: MAP, PEER and ANNOUNCE with the THIRD_PARTY,
PREFER_FAILURE, FILTER and DESCRIPTION (RFC 7220) options.

Requests are processed in the RFC 6887 §8.2 order; an error answer is the request copied
back with the result set (§8.2), and changes nothing (§7.3).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

from igd.decision import Reason
from igd.events import MappingRemoved
from igd.gateway import Granted, Refused
from igd.model import DEFAULT_ADDRESS, Mapping, MapRequest, Mechanism, Protocol
from igd.proto import pcp
from igd.proto.pcp import (
    PcpDecodeError,
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpPeerData,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
)
from igd.server.backends import BackendError
from igd.server.interfaces import ExternalAddress
from igd.server.pcp_options import DEFAULT_LIMITS, Limits, OptionRules, Options, PcpError
from igd.server.service import Service
from igd.server.upstream import Public, UpstreamRefusal

log = logging.getLogger("igd.pcp")

# Events PCP's Mapping Update bookkeeping may have waiting; past it, the oldest are dropped
# and the bookkeeping is checked against the live mappings instead.
FEED_BOUND = 4096
# RFC 6887 §7.4: recommended error lifetimes.
SHORT_ERROR_LIFETIME = 30
LONG_ERROR_LIFETIME = 1800
SHORT_ERRORS = frozenset(
    {PcpResult.NETWORK_FAILURE, PcpResult.NO_RESOURCES, PcpResult.USER_EX_QUOTA,
     PcpResult.CANNOT_PROVIDE_EXTERNAL}
)  # fmt: skip

RESULT_FOR: dict[Reason, PcpResult] = {
    Reason.POLICY_DENIED: PcpResult.NOT_AUTHORIZED,
    Reason.THIRD_PARTY_DENIED: PcpResult.UNSUPP_OPTION,  # RFC 6887 §13.1
    Reason.CLIENT_QUOTA: PcpResult.USER_EX_QUOTA,
    Reason.GATEWAY_QUOTA: PcpResult.NO_RESOURCES,
    Reason.PORT_IN_USE: PcpResult.CANNOT_PROVIDE_EXTERNAL,
    Reason.NO_FREE_PORT: PcpResult.NO_RESOURCES,
    Reason.RESERVED_PORT: PcpResult.CANNOT_PROVIDE_EXTERNAL,
    Reason.NOT_OWNER: PcpResult.NOT_AUTHORIZED,
    Reason.BACKEND_FAILURE: PcpResult.NO_RESOURCES,
    # §13.1: a THIRD_PARTY option naming no LAN host is a malformed option; without the
    # option the target is the client itself, answered NOT_AUTHORIZED in _refusal.
    Reason.INVALID_INTERNAL_ADDRESS: PcpResult.MALFORMED_OPTION,
    Reason.GATEWAY_CLIENT: PcpResult.NOT_AUTHORIZED,
}

PCP = Mechanism.PCP


class PcpHandler:
    """Answers PCP requests from LAN clients."""

    def __init__(
        self, service: Service, external: ExternalAddress, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.service = service
        self.external = external
        self.options = OptionRules(limits)
        self.endpoints: dict[tuple[IPv4Address, int, Protocol, int, int], tuple[str, int]] = {}
        """Where each PCP mapping's client last asked from, for Mapping Update (§14.2);
        one entry per live PCP mapping, dropped when the mapping goes."""
        self.feed = service.subscribe("pcp mapping update", FEED_BOUND, (MappingRemoved,))

    async def handle(self, data: bytes, source: tuple[str, int]) -> bytes | None:
        """The reply to one datagram, or None to stay silent."""
        client = IPv4Address(source[0])
        try:
            request = pcp.decode_request(data)
        except PcpDecodeError as error:
            if error.result is None:
                return None
            log.info("PCP from %s: %s -> %s", client, error, error.result.name)
            return self._error(data, error.result, None, parsed=False)
        try:
            if pcp.unmapped(request.client_address) != client:
                # RFC 6887 §8.2: the client's address field must be the packet's source.
                raise PcpError(PcpResult.ADDRESS_MISMATCH, f"{request.client_address} claimed")
            options = self.options.read(request, client)
            response = await self._dispatch(request, options, client, source)
        except PcpError as error:
            log.info(
                "PCP %s from %s refused: %s (%s)",
                request.opcode.name,
                client,
                error,
                error.result.name,
            )
            return self._error(data, error.result, error.lifetime, parsed=True)
        return pcp.encode_response(response)

    # -- opcodes --------------------------------------------------------------------------

    async def _dispatch(
        self, request: PcpRequest, options: Options, client: IPv4Address, source: tuple[str, int]
    ) -> PcpResponse:
        if request.opcode is PcpOpcode.ANNOUNCE:
            # RFC 6887 §14.1.1: answered with SUCCESS and lifetime 0.
            return PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, self.service.epoch())
        data = request.data
        assert isinstance(data, PcpMapData | PcpPeerData)
        if self.external.current is None:
            raise PcpError(PcpResult.NETWORK_FAILURE, "no usable external address")
        if isinstance(data, PcpPeerData):
            return await self._peer(request, data, options, client, source)
        return await self._map(request, data, options, client, source)

    async def _map(
        self,
        request: PcpRequest,
        data: PcpMapData,
        options: Options,
        client: IPv4Address,
        source: tuple[str, int],
    ) -> PcpResponse:
        protocol = _protocol(data.protocol, data.internal_port)
        internal = options.third_party or client
        if request.lifetime == 0:
            if options.filters:
                raise PcpError(PcpResult.MALFORMED_OPTION, "FILTER with lifetime 0 (§13.3)")
            if options.prefer_failure:
                raise PcpError(PcpResult.MALFORMED_OPTION, "PREFER_FAILURE with lifetime 0")
            return await self._delete(request, data, options, client, protocol, internal)
        if options.prefer_failure and data.external_port == 0:
            raise PcpError(PcpResult.MALFORMED_OPTION, "PREFER_FAILURE without a port (§13.2)")
        ask = MapRequest(
            mechanism=Mechanism.PCP,
            client=client,
            protocol=protocol,
            internal_address=internal,
            internal_port=data.internal_port,
            external_port=data.external_port,
            lifetime=request.lifetime,
            nonce=data.nonce,
            exact_port=options.prefer_failure,
            external_address=self._suggested(data.external_address),
        )
        existing = self._existing(ask)
        ask = self._told_port(ask, existing)
        ask = replace(
            ask,
            description=self.options.description(options, existing),
            filters=self.options.filters(options, existing),
        )
        mapping, granted = await self._grant(ask)
        port, address = mapping.external_port, self._external(mapping.external_address)
        # §13.2: PREFER_FAILURE takes the port asked or nothing.
        public = await self._public(
            mapping, granted, existing, data.external_port, options.prefer_failure
        )
        if public is not None:
            # Double NAT (RFC 7648): the upstream's endpoint, for the lesser of both leases;
            # the nonce is ours to match with the client, the upstream sees the proxy's own.
            port, granted = public.port, public.lifetime
            if public.address is not None and mapping.external_address is None:
                address = pcp.mapped(public.address)
        self._remember(mapping, source)
        return PcpResponse(
            PcpOpcode.MAP,
            PcpResult.SUCCESS,
            granted,
            self.service.epoch(),
            replace(data, external_port=port, external_address=address),
            self.options.echo(options, mapping),
        )

    async def _peer(
        self,
        request: PcpRequest,
        data: PcpPeerData,
        options: Options,
        client: IPv4Address,
        source: tuple[str, int],
    ) -> PcpResponse:
        # RFC 6887 §12.1: protocol, internal port and remote port must not be 0.
        if data.protocol == 0 or data.internal_port == 0 or data.remote_port == 0:
            raise PcpError(PcpResult.MALFORMED_REQUEST, "PEER with a zero protocol or port")
        protocol = _protocol(data.protocol, data.internal_port)
        remote = pcp.unmapped(data.remote_address)
        if remote is None or not self._valid_peer(remote):
            raise PcpError(
                PcpResult.MALFORMED_REQUEST, f"invalid remote peer {data.remote_address}"
            )
        ask = MapRequest(
            mechanism=Mechanism.PCP,
            client=client,
            protocol=protocol,
            internal_address=options.third_party or client,
            internal_port=data.internal_port,
            external_port=data.external_port,
            lifetime=request.lifetime,
            remote_host=remote,
            nonce=data.nonce,
            peer_port=data.remote_port,
            # §12.3: a suggestion that cannot be honoured fails a new PEER mapping.
            exact_port=data.external_port != 0,
        )
        existing = self._existing(ask)
        ask = self._told_port(ask, existing)
        if existing is not None:
            # PEER can extend a mapping but never shorten or delete it (§12.3, §15).
            ask = replace(
                ask, lifetime=max(request.lifetime, existing.remaining(self.service.now()))
            )
        elif request.lifetime == 0:
            return PcpResponse(PcpOpcode.PEER, PcpResult.SUCCESS, 0, self.service.epoch(), data)
        ask = replace(ask, description=self.options.description(options, existing))
        mapping, granted = await self._grant(ask)
        port, address = mapping.external_port, self._external()
        # Double NAT: the remote peer sees the upstream's endpoint, so that is the answer (a
        # PCP proxy, RFC 7648 §3); the mirror holds it with a MAP of our port (docs/upstream.md).
        # §12.3: a new PEER mapping whose suggested port cannot be honoured fails.
        public = await self._public(
            mapping, granted, existing, data.external_port, data.external_port != 0
        )
        if public is not None:
            port, granted = public.port, public.lifetime
            if public.address is not None:
                address = pcp.mapped(public.address)
        self._remember(mapping, source)
        return PcpResponse(
            PcpOpcode.PEER,
            PcpResult.SUCCESS,
            granted,
            self.service.epoch(),
            replace(data, external_port=port, external_address=address),
            self.options.echo(options, mapping),
        )

    async def _delete(
        self,
        request: PcpRequest,
        data: PcpMapData,
        options: Options,
        client: IPv4Address,
        protocol: Protocol,
        internal: IPv4Address,
    ) -> PcpResponse:
        doomed = [
            m
            for m in self.service.at_internal(internal, protocol, data.internal_port, Mechanism.PCP)
            if m.owner.client == client and not m.is_peer
        ]
        for mapping in doomed:
            if mapping.owner.nonce != data.nonce:
                raise PcpError(
                    PcpResult.NOT_AUTHORIZED,
                    "nonce does not match the mapping's",
                    mapping.remaining(self.service.now()),
                )
        try:
            await self.service.remove(doomed, why=f"deleted by {client} over PCP")
        except BackendError as error:
            raise PcpError(PcpResult.NO_RESOURCES, str(error)) from None
        # RFC 6887 §15.1: deleting what does not exist succeeds, so retransmits are safe.
        return PcpResponse(
            PcpOpcode.MAP, PcpResult.SUCCESS, 0, self.service.epoch(), data, options.processed
        )

    # -- helpers --------------------------------------------------------------------------

    def _told_port(self, ask: MapRequest, existing: Mapping | None) -> MapRequest:
        """`ask` for the port the mapping holds here when the client renews the port it was
        told, the upstream's (double NAT): RFC 6887 §13.2 asks only that the client keeps
        the port it knows."""
        if existing is not None and ask.exact_port and ask.external_port != existing.external_port:
            told = self.service.told(existing, 0)
            if told is not None and told.port == ask.external_port:
                return replace(ask, external_port=existing.external_port)
        return ask

    async def _public(
        self, mapping: Mapping, granted: int, existing: Mapping | None, suggested: int, exact: bool
    ) -> Public | None:
        """The upstream's endpoint for a mapping just granted (double NAT), or None. A refusal
        upstream fails the request; so does another port than `suggested` for a new `exact`
        mapping, which is removed again."""
        public = await self.service.public(mapping, granted)
        if isinstance(public, UpstreamRefusal):
            # A PCP proxy (RFC 7648) relays the server's refusal to its client.
            raise PcpError(RESULT_FOR[public.reason], public.detail, None)
        if (
            public is not None
            and exact
            and existing is None
            and public.address is not None
            and public.port != suggested
        ):
            try:
                await self.service.remove([mapping], why="upstream gave another port")
            except BackendError as error:
                log.error("could not remove %s: %s", mapping, error)
            detail = f"the upstream gateway gave port {public.port}, not {suggested}"
            raise PcpError(PcpResult.CANNOT_PROVIDE_EXTERNAL, detail, None)
        return public

    async def _grant(self, ask: MapRequest) -> tuple[Mapping, int]:
        result = await self.service.map(ask)
        if isinstance(result, Granted):
            return result.mapping, result.decision.lifetime
        raise self._refusal(ask, result)

    def _refusal(self, ask: MapRequest, refused: Refused) -> PcpError:
        reason = refused.deny.reason
        result = RESULT_FOR[reason]
        lifetime = None
        if refused.existing is not None:
            lifetime = refused.existing.remaining(self.service.now())
        if reason is Reason.INVALID_INTERNAL_ADDRESS and not ask.third_party:
            result = PcpResult.NOT_AUTHORIZED
        if reason is Reason.POLICY_DENIED and ask.exact_port and refused.deny.other_port_allowed:
            # Denied only because of the exact port: PREFER_FAILURE's answer applies (§13.2),
            # the client may retry without it.
            result = PcpResult.CANNOT_PROVIDE_EXTERNAL
        return PcpError(result, f"{reason}: {refused.deny.detail}", lifetime)

    def _existing(self, ask: MapRequest) -> Mapping | None:
        found = self.service.renewing(replace(ask, exact_port=False))
        if isinstance(found, Refused):
            assert found.existing is not None
            raise PcpError(
                PcpResult.NOT_AUTHORIZED,
                "nonce does not match the mapping's",
                found.existing.remaining(self.service.now()),
            )
        return found

    def _valid_peer(self, address: IPv4Address) -> bool:
        """§12.3: peers no outbound connection through the NAT could reach are refused."""
        # A LAN host or the gateway itself is never reached through the external address; a
        # PEER for one would only shadow another client's mapping for that address.
        return _valid_peer(address) and not self.service.is_local(address)

    def _external(self, own: IPv4Address | None = None) -> IPv6Address:
        """The assigned external address: the mapping's own, or the default (§11.1)."""
        address = self.external.current if own is None else own
        assert address is not None
        return pcp.mapped(address)

    def _suggested(self, suggested: IPv6Address) -> IPv4Address | None:
        """The address a MAP's suggested external address asks for, as the core reads it."""
        # RFC 6887 §11.1: the all-zeros address (either form) suggests nothing. An address
        # that is not ours (a stale one from before a renumbering) is only a hint: none.
        address = pcp.unmapped(suggested)
        if address is None or address.is_unspecified:
            return None
        if address in (self.external.current, self.external.reported):
            return DEFAULT_ADDRESS
        return address if address in self.external.further else None

    def _error(
        self, data: bytes, result: PcpResult, lifetime: int | None, *, parsed: bool
    ) -> bytes:
        return error_reply(data, result, lifetime, epoch=self.service.epoch(), parsed=parsed)

    def _remember(self, mapping: Mapping, source: tuple[str, int]) -> None:
        self.follow()
        self.endpoints[_endpoint_key(mapping)] = source

    def follow(self) -> None:
        """Forget the endpoints of PCP mappings that went away (from the event feed)."""
        events, lost = self.feed.take()
        if lost:
            # Some removals were missed: keep only endpoints a live PCP mapping still has.
            live = {_endpoint_key(m) for m in self.service.mappings() if m.owner.mechanism is PCP}
            self.endpoints = {k: v for k, v in self.endpoints.items() if k in live}
            return
        for event in events:
            if isinstance(event, MappingRemoved) and event.mapping.owner.mechanism is PCP:
                self.endpoints.pop(_endpoint_key(event.mapping), None)

    # -- announcements and Mapping Update ---------------------------------------------------

    def announcement(self) -> bytes:
        """The unsolicited ANNOUNCE response sent after a restart (§14.1.3)."""
        return pcp.encode_response(
            PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, self.service.epoch())
        )

    def mapping_updates(self) -> list[tuple[bytes, tuple[str, int]]]:
        """Unsolicited responses telling each PCP client its mappings' new external address
        (§14.2), with where to send them."""
        address = self.external.reported
        if address is None:
            return []
        self.follow()
        now = self.service.now()
        updates = []
        for mapping in self.service.mappings():
            destination = self.endpoints.get(_endpoint_key(mapping))
            if mapping.owner.mechanism is not Mechanism.PCP or destination is None:
                continue
            if mapping.external_address is not None:
                continue  # its own address did not change
            updates.append((self._update_for(mapping, address, now), destination))
        return updates

    def _update_for(self, mapping: Mapping, address: IPv4Address, now: float) -> bytes:
        nonce = mapping.owner.nonce or bytes(pcp.NONCE_SIZE)
        port, lifetime = mapping.external_port, mapping.remaining(now)
        told = self.service.told(mapping, lifetime)
        if told is not None and told.address is not None:
            # Double NAT: the endpoint the Internet reaches, as the MAP answer said (RFC 7648).
            address, port, lifetime = told.address, told.port, told.lifetime
        base = PcpMapData(
            nonce, mapping.protocol.number, mapping.internal_port, port, pcp.mapped(address),
        )  # fmt: skip
        options: list[PcpOption] = []
        if mapping.internal_address != mapping.owner.client:
            options.append(PcpThirdParty(pcp.mapped(mapping.internal_address)))
        data: pcp.PcpOpcodeData = base
        opcode = PcpOpcode.MAP
        if mapping.is_peer and mapping.key.remote_host is not None:
            opcode = PcpOpcode.PEER
            data = PcpPeerData(
                nonce, base.protocol, base.internal_port, base.external_port,
                base.external_address, mapping.peer_port, pcp.mapped(mapping.key.remote_host),
            )  # fmt: skip
        else:
            options += [
                PcpFilter(96 + f.network.prefixlen, f.port, pcp.mapped(f.network.network_address))
                for f in mapping.filters
            ]
        response = PcpResponse(
            opcode, PcpResult.SUCCESS, lifetime, self.service.epoch(), data, tuple(options),
        )  # fmt: skip
        return pcp.encode_response(response)


def error_reply(
    data: bytes, result: PcpResult, lifetime: int | None, *, epoch: int, parsed: bool
) -> bytes:
    """The error answer to request `data`: its copy with `result` set (§8.2), for `lifetime`
    or else the one §7.4 recommends for `result`."""
    if lifetime is None:
        lifetime = SHORT_ERROR_LIFETIME if result in SHORT_ERRORS else LONG_ERROR_LIFETIME
    return pcp.encode_error(data, result, lifetime=lifetime, epoch=epoch, parsed=parsed)


def _protocol(number: int, internal_port: int) -> Protocol:
    """The mapping's protocol; §11.3's rules for protocol 0 and port 0."""
    if number == 0:
        if internal_port != 0:
            raise PcpError(PcpResult.MALFORMED_REQUEST, "protocol 0 with a port (§11.3)")
        raise PcpError(PcpResult.UNSUPP_PROTOCOL, "all-protocol mappings are not offered")
    try:
        protocol = Protocol.from_number(number)
    except ValueError:
        raise PcpError(PcpResult.UNSUPP_PROTOCOL, f"protocol {number} is not offered") from None
    if internal_port == 0:
        raise PcpError(PcpResult.UNSUPP_PROTOCOL, "all-ports mappings are not offered")
    return protocol


def _valid_peer(address: IPv4Address) -> bool:
    """§12.3: peers no outbound connection could reach are refused."""
    return not (
        address.is_unspecified or address.is_loopback or address.is_multicast
        or address.is_reserved or address == IPv4Address("255.255.255.255")
    )  # fmt: skip


def _endpoint_key(mapping: Mapping) -> tuple[IPv4Address, int, Protocol, int, int]:
    return (
        mapping.internal_address, mapping.internal_port, mapping.protocol,
        int(mapping.key.remote_host or 0), mapping.peer_port,
    )  # fmt: skip
