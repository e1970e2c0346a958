"""NAT-PMP (RFC 6886) on top of the gateway core: decode, decide, encode."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from igd.decision import Reason
from igd.gateway import Refused
from igd.model import MapRequest, Mechanism
from igd.proto import natpmp
from igd.proto.errors import DecodeError
from igd.proto.natpmp import (
    NatPmpExternalAddressRequest,
    NatPmpExternalAddressResponse,
    NatPmpMapRequest,
    NatPmpMapResponse,
    NatPmpResult,
)
from igd.server.backends import BackendError
from igd.server.interfaces import ExternalAddress
from igd.server.service import Service
from igd.server.upstream import UpstreamRefusal

log = logging.getLogger("igd.natpmp")

RESULT_FOR: dict[Reason, NatPmpResult] = {
    Reason.POLICY_DENIED: NatPmpResult.NOT_AUTHORIZED,
    Reason.THIRD_PARTY_DENIED: NatPmpResult.NOT_AUTHORIZED,
    Reason.RESERVED_PORT: NatPmpResult.NOT_AUTHORIZED,
    Reason.NOT_OWNER: NatPmpResult.NOT_AUTHORIZED,
    Reason.CLIENT_QUOTA: NatPmpResult.OUT_OF_RESOURCES,
    Reason.GATEWAY_QUOTA: NatPmpResult.OUT_OF_RESOURCES,
    Reason.PORT_IN_USE: NatPmpResult.OUT_OF_RESOURCES,
    Reason.NO_FREE_PORT: NatPmpResult.OUT_OF_RESOURCES,
    Reason.BACKEND_FAILURE: NatPmpResult.OUT_OF_RESOURCES,
    Reason.INVALID_INTERNAL_ADDRESS: NatPmpResult.NOT_AUTHORIZED,
    Reason.GATEWAY_CLIENT: NatPmpResult.NOT_AUTHORIZED,
}


class NatPmpHandler:
    """Answers NAT-PMP requests from LAN clients."""

    def __init__(self, service: Service, external: ExternalAddress) -> None:
        self.service = service
        self.external = external

    async def handle(self, data: bytes, client: IPv4Address) -> bytes | None:
        """The reply to one datagram, or None to stay silent."""
        epoch = self.service.epoch()
        try:
            request = natpmp.decode_request(data)
        except natpmp.NatPmpUnsupportedVersion:
            return natpmp.encode_unsupported_version(epoch)
        except natpmp.NatPmpUnsupportedOpcode:
            return natpmp.encode_unsupported_opcode(data, epoch)
        except DecodeError:
            # Responses (opcode >= 128) and truncated requests: RFC 6886 gives no answer.
            return None
        if isinstance(request, NatPmpExternalAddressRequest):
            address = self.external.reported
            result = NatPmpResult.SUCCESS if address else NatPmpResult.NETWORK_FAILURE
            return natpmp.encode_response(
                NatPmpExternalAddressResponse(result, epoch, address or IPv4Address(0))
            )
        response = await self._map(request, client)
        return natpmp.encode_response(response)

    async def _map(self, request: NatPmpMapRequest, client: IPv4Address) -> NatPmpMapResponse:
        if request.lifetime == 0:
            return await self._delete(request, client)
        if self.external.current is None:
            return self._refusal(request, NatPmpResult.NETWORK_FAILURE)
        if request.internal_port == 0:
            # RFC 6886 §3.4: internal port 0 only has a meaning for deletion.
            return self._refusal(request, NatPmpResult.NOT_AUTHORIZED)
        result = await self.service.map(
            MapRequest(
                mechanism=Mechanism.NATPMP,
                client=client,
                protocol=request.protocol,
                internal_address=client,
                internal_port=request.internal_port,
                external_port=request.external_port,
                lifetime=request.lifetime,
            )
        )
        if isinstance(result, Refused):
            return self._refusal(request, RESULT_FOR[result.deny.reason])
        mapping = result.mapping
        port, lifetime = mapping.external_port, result.decision.lifetime
        public = await self.service.public(mapping, lifetime)
        if isinstance(public, UpstreamRefusal):
            return self._refusal(request, RESULT_FOR[public.reason])
        if public is not None:
            # Double NAT: the upstream's public port, for the lesser of both leases.
            port, lifetime = public.port, public.lifetime
        return NatPmpMapResponse(
            request.protocol,
            NatPmpResult.SUCCESS,
            self.service.epoch(),
            request.internal_port,
            port,
            lifetime,
        )

    async def _delete(self, request: NatPmpMapRequest, client: IPv4Address) -> NatPmpMapResponse:
        if request.internal_port == 0:
            # RFC 6886 §3.4: internal port 0 with lifetime 0 deletes all of the client's
            # mappings of this protocol (made over NAT-PMP).
            doomed = [
                m
                for m in self.service.mappings_of(client)
                if m.owner.mechanism is Mechanism.NATPMP and m.protocol is request.protocol
            ]
        else:
            doomed = [
                m
                for m in self.service.at_internal(
                    client, request.protocol, request.internal_port, Mechanism.NATPMP
                )
                if m.owner.client == client
            ]
        try:
            await self.service.remove(doomed, why=f"deleted by {client} over NAT-PMP")
        except BackendError:
            return self._refusal(request, NatPmpResult.OUT_OF_RESOURCES)
        # Deleting what does not exist succeeds too (RFC 6886 §3.4), so retransmits are safe.
        return NatPmpMapResponse(
            request.protocol,
            NatPmpResult.SUCCESS,
            self.service.epoch(),
            request.internal_port,
            0,
            0,
        )

    def _refusal(self, request: NatPmpMapRequest, result: NatPmpResult) -> NatPmpMapResponse:
        # RFC 6886 §3.5: errors carry the internal port, external port 0 and lifetime 0.
        return NatPmpMapResponse(
            request.protocol, result, self.service.epoch(), request.internal_port, 0, 0
        )

    def announcement(self) -> bytes | None:
        """The unsolicited external address response (RFC 6886 §3.2.1), if there is one."""
        address = self.external.reported
        if address is None:
            return None
        return natpmp.encode_response(
            NatPmpExternalAddressResponse(NatPmpResult.SUCCESS, self.service.epoch(), address)
        )
