"""WANIPConnection's port-mapping actions (IGD v1 and v2) on top of the gateway service.

Every mapping lives in the one table shared with NAT-PMP and PCP; this module only turns
SOAP arguments into `MapRequest`s and table lookups, and refusals into UPnP codes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping as AbstractMapping
from ipaddress import IPv4Address

from igd.gateway import Refused
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Protocol
from igd.proto.description import MAX_LEASE_V2, ArgumentValue
from igd.proto.soap import escape
from igd.server.backends import BackendError
from igd.server.interfaces import ExternalAddress
from igd.server.service import Service
from igd.server.upnp import errors
from igd.server.upnp.errors import UpnpError
from igd.server.upstream import UpstreamRefusal

log = logging.getLogger("igd.upnp")

Args = AbstractMapping[str, ArgumentValue]
Out = list[tuple[str, ArgumentValue]]

# Longest description kept; longer ones are cut (clients send names, not documents).
MAX_DESCRIPTION = 256
# Per-client listing orders kept for GetGenericPortMappingEntry walks (least recent evicted).
MAX_CACHED_VIEWS = 256
PORT_LISTING_NS = "urn:schemas-upnp-org:gw:WANIPConnection"


class MappingActions:
    """AddPortMapping and friends for one gateway."""

    def __init__(self, service: Service, external: ExternalAddress) -> None:
        self.service = service
        self.external = external
        self._views: OrderedDict[IPv4Address, tuple[int, list[MappingKey]]] = OrderedDict()
        """Per-client listing orders, each valid while the service's change count stays."""

    def manager(self, client: IPv4Address) -> bool:
        """Whether a client may see and remove other clients' mappings (NewManage = 1): the
        policy's third-party grant."""
        return self.service.may_manage(client, Mechanism.UPNP)

    # -- adding ------------------------------------------------------------------------------

    async def add(self, args: Args, client: IPv4Address, version: int, *, any_port: bool) -> int:
        """AddPortMapping (exact external port) or AddAnyPortMapping; the port granted."""
        remote = remote_host(str(args["NewRemoteHost"]))
        external_port = int(args["NewExternalPort"])
        if external_port == 0 and not any_port:
            # WANIPConnection §2.4.16: the external port cannot be a wildcard here.
            raise UpnpError(errors.WILDCARD_EXTERNAL_PORT, "NewExternalPort 0")
        internal_port = int(args["NewInternalPort"])
        if internal_port == 0:
            # v2 has 732 for this. v1 has no such code; 724 (SamePortValuesRequired) tells a
            # v1 control point to ask again with the internal port equal to the external one.
            code = errors.WILDCARD_INTERNAL_PORT if version >= 2 else errors.SAME_PORT_VALUES
            raise UpnpError(code, "NewInternalPort 0")
        internal = _address(str(args["NewInternalClient"]), "NewInternalClient", default=client)
        if not args["NewEnabled"]:
            raise UpnpError(errors.ACTION_FAILED, "disabled mappings are not supported")
        if self.external.current is None:
            raise UpnpError(errors.ACTION_FAILED, "the gateway has no usable external address")
        request = MapRequest(
            mechanism=Mechanism.UPNP,
            client=client,
            protocol=Protocol(str(args["NewProtocol"]).lower()),
            internal_address=internal,
            internal_port=internal_port,
            external_port=external_port,
            lifetime=self._lifetime(int(args["NewLeaseDuration"]), version),
            remote_host=remote,
            description=str(args["NewPortMappingDescription"])[:MAX_DESCRIPTION],
            exact_port=not any_port,
        )
        result = await self.service.map(request)
        if isinstance(result, Refused):
            holder = result.existing.owner.mechanism if result.existing else None
            code = errors.refusal_code(result.deny.reason, version, holder)
            raise UpnpError(code, f"{result.deny.reason}: {result.deny.detail}".rstrip(": "))
        # Double NAT: a refusal upstream refuses here too (RFC 6970 §4.3's table of PCP
        # errors to UPnP codes, through the neutral reasons). The port stays the local one:
        # UPnP names mappings by external port (docs/upstream.md).
        public = await self.service.public(result.mapping, result.decision.lifetime)
        if isinstance(public, UpstreamRefusal):
            raise UpnpError(errors.refusal_code(public.reason, version, None), public.detail)
        return result.mapping.external_port

    def _lifetime(self, lease: int, version: int) -> int:
        if version >= 2:
            # WANIPConnection:2 §2.3.13: 0 and anything above 604800 become 604800.
            return MAX_LEASE_V2 if lease == 0 or lease > MAX_LEASE_V2 else lease
        if lease == 0:
            # IGD v1: 0 asks for a permanent mapping. We grant the longest lease the policy
            # allows (it clamps what we ask); the control point renews or re-adds after it.
            return self.service.max_lease()
        return lease

    # -- removing ----------------------------------------------------------------------------

    async def delete(self, args: Args, client: IPv4Address, version: int) -> None:
        """DeletePortMapping: only the client's own mapping unless it may manage others."""
        mapping = self.service.holder(_key(args))
        if mapping is None:
            raise UpnpError(errors.NO_SUCH_ENTRY, "no such mapping")
        if mapping.is_static and self.manager(client):
            # Read-only: the admin declared it in the policy file, which alone removes it.
            code = errors.NOT_AUTHORIZED if version >= 2 else errors.NO_SUCH_ENTRY
            raise UpnpError(code, "the mapping is a forward declared by the admin")
        if mapping.owner.client != client and not self.manager(client):
            # v1 has no 606 for this action; miniupnpd answers 714 there as well.
            code = errors.NOT_AUTHORIZED if version >= 2 else errors.NO_SUCH_ENTRY
            raise UpnpError(code, "the mapping belongs to another client")
        await self._remove([mapping], client)

    async def delete_range(self, args: Args, client: IPv4Address) -> None:
        """DeletePortMappingRange (v2)."""
        doomed = [m for m in self._select(args, client) if not m.is_static]
        if not doomed:
            raise UpnpError(errors.NOT_FOUND, "only forwards declared by the admin in that range")
        await self._remove(doomed, client)

    async def _remove(self, mappings: list[Mapping], client: IPv4Address) -> None:
        try:
            await self.service.remove(mappings, why=f"deleted by {client} over UPnP")
        except BackendError as error:
            raise UpnpError(errors.ACTION_FAILED, str(error)) from None

    # -- reading -----------------------------------------------------------------------------

    def generic_entry(self, index: int, client: IPv4Address) -> Out:
        """GetGenericPortMappingEntry: O(1) per index for a manager (the table's own order),
        and over the client's own mappings, in a cached order, for everyone else."""
        if self.manager(client):
            mapping = self.service.entry(index)
        else:
            mapping = self._own_entry(index, client)
        if mapping is None:
            raise UpnpError(errors.INVALID_INDEX, f"no entry {index}")
        return [
            ("NewRemoteHost", _remote_text(mapping)),
            ("NewExternalPort", mapping.external_port),
            ("NewProtocol", mapping.protocol.name),
            *self._body(mapping),
        ]

    def specific_entry(self, args: Args, client: IPv4Address) -> Out:
        """GetSpecificPortMappingEntry; another client's mapping is not shown."""
        mapping = self.service.holder(_key(args))
        if mapping is None or (mapping.owner.client != client and not self.manager(client)):
            raise UpnpError(errors.NO_SUCH_ENTRY, "no such mapping")
        return self._body(mapping)

    def listing(self, args: Args, client: IPv4Address) -> str:
        """GetListOfPortMappings (v2): the PortMappingList document, escaped as it must be."""
        chosen = sorted(self._select(args, client, listing=True), key=_order)
        wanted = int(args["NewNumberOfPorts"])
        if wanted:
            chosen = chosen[:wanted]
        now = self.service.now()
        entries = [
            "<p:PortMappingEntry>"
            f"<p:NewRemoteHost>{escape(_remote_text(m))}</p:NewRemoteHost>"
            f"<p:NewExternalPort>{m.external_port}</p:NewExternalPort>"
            f"<p:NewProtocol>{m.protocol.name}</p:NewProtocol>"
            f"<p:NewInternalPort>{m.internal_port}</p:NewInternalPort>"
            f"<p:NewInternalClient>{m.internal_address}</p:NewInternalClient>"
            "<p:NewEnabled>1</p:NewEnabled>"
            f"<p:NewDescription>{escape(m.description)}</p:NewDescription>"
            f"<p:NewLeaseTime>{m.remaining(now)}</p:NewLeaseTime>"
            "</p:PortMappingEntry>"
            for m in chosen
        ]
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<p:PortMappingList xmlns:p="{PORT_LISTING_NS}"'
            ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
            f' xsi:schemaLocation="{PORT_LISTING_NS} http://www.upnp.org/schemas/gw/'
            f'WANIPConnection-v2.xsd">{"".join(entries)}</p:PortMappingList>'
        )

    def _select(self, args: Args, client: IPv4Address, *, listing: bool = False) -> list[Mapping]:
        """The mappings a range action covers (v2 §2.5.x: NewManage, 730, 733)."""
        start, end = int(args["NewStartPort"]), int(args["NewEndPort"])
        protocol = Protocol(str(args["NewProtocol"]).lower())
        if start > end:
            raise UpnpError(errors.INCONSISTENT_PARAMETERS, f"NewStartPort {start} > {end}")
        manage = bool(args["NewManage"]) and self.manager(client)
        if args["NewManage"] and not manage and not listing:
            raise UpnpError(errors.NOT_AUTHORIZED, "NewManage needs the policy's third-party grant")
        # A listing asked with NewManage = 1 by a client without the grant shows its own
        # mappings (upnpc -L always asks for all); a range deletion is refused instead.
        if manage:
            service = self.service
            if end - start + 1 < service.count():
                found = [m for p in range(start, end + 1) for m in service.on_port(protocol, p)]
            else:
                found = [
                    m
                    for m in service.mappings()
                    if m.protocol is protocol and start <= m.external_port <= end
                ]
        else:
            # Without NewManage only the caller's own mappings, whatever the policy grants.
            found = [
                m
                for m in self.service.mappings_of(client)
                if m.protocol is protocol and start <= m.external_port <= end
            ]
        if not found:
            raise UpnpError(errors.NOT_FOUND, f"no mapping in {protocol.name} {start}-{end}")
        return found

    def _body(self, mapping: Mapping) -> Out:
        return [
            ("NewInternalPort", mapping.internal_port),
            ("NewInternalClient", str(mapping.internal_address)),
            ("NewEnabled", True),
            ("NewPortMappingDescription", mapping.description),
            ("NewLeaseDuration", mapping.remaining(self.service.now())),
        ]

    def _own_entry(self, index: int, client: IPv4Address) -> Mapping | None:
        generation = self.service.changes
        cached = self._views.get(client)
        if cached is None or cached[0] != generation:
            keys = [m.key for m in sorted(self.service.mappings_of(client), key=_order)]
            self._views[client] = cached = (generation, keys)
            if len(self._views) > MAX_CACHED_VIEWS:
                self._views.popitem(last=False)
        self._views.move_to_end(client)
        if not 0 <= index < len(cached[1]):
            return None
        mapping = self.service.holder(cached[1][index])
        return mapping if mapping is not None and mapping.owner.client == client else None


def remote_host(text: str) -> IPv4Address | None:
    """NewRemoteHost: empty (or "*", 0.0.0.0) is the wildcard; else a literal IPv4 address."""
    text = text.strip()
    if text in ("", "*", "0.0.0.0"):
        return None
    if "*" in text:
        # A partial wildcard (192.168.1.*): only the whole address may be wild-carded.
        raise UpnpError(errors.WILDCARD_REMOTE_HOST, f"NewRemoteHost {text[:40]!r}")
    return _address(text, "NewRemoteHost")


def _address(text: str, name: str, default: IPv4Address | None = None) -> IPv4Address:
    text = text.strip()
    if not text and default is not None:
        # miniupnpd issue 236: some control points leave NewInternalClient empty, meaning
        # themselves.
        return default
    try:
        return IPv4Address(text)
    except ValueError:
        # Host names are not resolved: a request must not make the gateway query DNS.
        raise UpnpError(
            errors.INVALID_ARGS, f"{name} {text[:40]!r} is not an IPv4 address"
        ) from None


def _key(args: Args) -> MappingKey:
    """The mapping DeletePortMapping and GetSpecificPortMappingEntry name."""
    return MappingKey(
        Protocol(str(args["NewProtocol"]).lower()),
        int(args["NewExternalPort"]),
        remote_host(str(args["NewRemoteHost"])),
    )


def _remote_text(mapping: Mapping) -> str:
    return str(mapping.key.remote_host) if mapping.key.remote_host else ""


def _order(mapping: Mapping) -> tuple[int, str, int]:
    remote = mapping.key.remote_host
    return (mapping.external_port, mapping.protocol.value, int(remote) if remote else 0)
