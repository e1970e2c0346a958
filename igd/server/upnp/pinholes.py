"""WANIPv6FirewallControl:1 on top of the pinhole service: AddPinhole and the UniqueID
actions, with the spec's error codes (§2.4, §2.5) and its owner rules (§2.6.3.3).

Who owns a pinhole: the LAN host that asked for it. A host reaching the gateway from another
of its addresses (a ULA, a temporary address, its link-local or IPv4 address: miniupnpd
#600, #731) is the same host when the gateway's neighbour table puts both addresses behind
one link-layer address on one interface (docs/security.md, "Pinhole owners").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path

from igd.model import Mechanism, Protocol
from igd.pinhole import Pinhole, PinholeFilter, PinholeKey, PinholeOwner, PinholeRequest, Refusal
from igd.proto.description import MAX_PINHOLE_LEASE, ArgumentValue
from igd.server.backends import BackendError
from igd.server.neighbours import same_host
from igd.server.pinholes import CommitError, PinholeService
from igd.server.upnp import errors
from igd.server.upnp.errors import UpnpError

log = logging.getLogger("igd.upnp.pinholes")

Out = list[tuple[str, ArgumentValue]]
Client = IPv4Address | IPv6Address

PROTOCOL_WILDCARD = 65535
"""WANIPv6FirewallControl:1 §2.3.5: Protocol 65535 stands for every protocol."""
PROTOCOLS = {6: Protocol.TCP, 17: Protocol.UDP}
ANY_REMOTE = IPv6Network("::/0")
CONNTRACK = Path("/proc/sys/net/netfilter")
# RFC 6092 REC-35 (TCP established, 2 h 4 min) and REC-12 (UDP, 5 min): the floor a
# firewall keeps idle outbound flows, used when conntrack's own values cannot be read.
OUTBOUND_TIMEOUTS = {
    Protocol.TCP: ("nf_conntrack_tcp_timeout_established", 7440),
    Protocol.UDP: ("nf_conntrack_udp_timeout_stream", 300),
}

REFUSAL_CODES = {
    Refusal.NOT_ALLOWED: errors.NOT_AUTHORIZED,
    Refusal.THIRD_PARTY: errors.NOT_AUTHORIZED,
    Refusal.NOT_OWNER: errors.NOT_AUTHORIZED,
    Refusal.QUOTA: errors.PINHOLE_SPACE_EXHAUSTED,
    Refusal.FULL: errors.PINHOLE_SPACE_EXHAUSTED,
}


class PinholeActions:
    """Runs WANIPv6FirewallControl:1 actions for LAN clients."""

    def __init__(
        self,
        service: PinholeService,
        *,
        same: Callable[[Client, Client], bool] = same_host,
        clock: Callable[[], float] = time.monotonic,
        conntrack: Path = CONNTRACK,
    ) -> None:
        self.service = service
        self.same = same
        self.clock = clock
        self.conntrack = conntrack

    @property
    def inbound_allowed(self) -> bool:
        """InboundPinholeAllowed: whether the `[ipv6]` rules let any LAN host ask at all."""
        return bool(self.service.rules.internal_networks)

    async def run(self, action: str, args: dict[str, ArgumentValue], client: Client) -> Out:
        """One action; UpnpError for every refusal."""
        match action:
            case "GetFirewallStatus":
                return [("FirewallEnabled", True), ("InboundPinholeAllowed", self.inbound_allowed)]
            case "GetOutboundPinholeTimeout":
                return [("OutboundPinholeTimeout", self.outbound_timeout(args))]
            case "AddPinhole":
                return [("UniqueID", await self.add(args, client))]
            case "UpdatePinhole":
                await self.update(self._owned(args, client, manage=True), args)
                return []
            case "DeletePinhole":
                await self.delete(self._owned(args, client, manage=True))
                return []
            case "GetPinholePackets":
                return [("PinholePackets", await self._packets(self._owned(args, client)))]
            case "CheckPinholeWorking":
                # §2.4.7: working means traffic has come through it; 709 until some has.
                if not await self._packets(self._owned(args, client)):
                    raise UpnpError(errors.NO_TRAFFIC_RECEIVED, "no traffic through it yet")
                return [("IsWorking", True)]
        raise UpnpError(errors.INVALID_ACTION, action)  # pragma: no cover - the SCPD lists all

    # -- the actions -------------------------------------------------------------------------

    def outbound_timeout(self, args: dict[str, ArgumentValue]) -> int:
        """How long the firewall keeps an idle outbound flow of that protocol (conntrack)."""
        number = int(args["Protocol"])
        if number == PROTOCOL_WILDCARD:
            protocols = list(PROTOCOLS.values())
        elif number in PROTOCOLS:
            protocols = [PROTOCOLS[number]]
        else:
            raise UpnpError(errors.PROTOCOL_NOT_SUPPORTED, f"protocol {number}")
        return min(self._conntrack_timeout(p) for p in protocols)

    async def add(self, args: dict[str, ArgumentValue], client: Client) -> int:
        """AddPinhole: open or renew (same 5-tuple, same owner) and return the UniqueID."""
        if not self.inbound_allowed:
            raise UpnpError(errors.INBOUND_PINHOLE_NOT_ALLOWED, "no LAN prefix to open pinholes to")
        internal = _internal_client(str(args["InternalClient"]))
        port = int(args["InternalPort"])
        if port == 0:
            raise UpnpError(errors.INTERNAL_PORT_WILDCARD, "InternalPort 0")
        protocol = _protocol(int(args["Protocol"]))
        lease = _lease(int(args["LeaseTime"]))
        remote = _remote(str(args["RemoteHost"]), int(args["RemotePort"]))
        # §2.6.3.3: InternalClient names the control point itself; it may speak from
        # another of its addresses (owner rule above).
        owner = self._owner(client, internal)
        key = PinholeKey(internal, protocol, port, remote)
        existing = self.service.get(key)
        description = existing.description if existing is not None else ""
        return (await self._open(PinholeRequest(key, owner, lease, description))).uid

    async def update(self, hole: Pinhole, args: dict[str, ArgumentValue]) -> None:
        """UpdatePinhole: a new lease for the caller's own pinhole."""
        lease = _lease(int(args["NewLeaseTime"]))
        await self._open(PinholeRequest(hole.key, hole.owner, lease, hole.description,
                                        hole.filters))  # fmt: skip

    async def delete(self, hole: Pinhole) -> None:
        """DeletePinhole: close the caller's own pinhole."""
        try:
            refusal = await self.service.close(hole.key, hole.owner, now=self.clock())
        except CommitError as error:
            raise UpnpError(errors.ACTION_FAILED, f"not committed: {error}") from None
        if refusal is not None:
            raise UpnpError(REFUSAL_CODES[refusal], refusal.value)

    # -- helpers -----------------------------------------------------------------------------

    async def _open(self, request: PinholeRequest) -> Pinhole:
        try:
            result = await self.service.open(request, now=self.clock())
        except CommitError as error:
            raise UpnpError(errors.ACTION_FAILED, f"not committed: {error}") from None
        if isinstance(result, Refusal):
            raise UpnpError(REFUSAL_CODES[result], result.value)
        return result

    def _owner(self, client: Client, internal: IPv6Address) -> PinholeOwner:
        """The owner a request stands for: the InternalClient when the caller is that host."""
        if client == internal or self.same(client, internal):
            return PinholeOwner(Mechanism.UPNP, internal)
        if isinstance(client, IPv4Address):
            raise UpnpError(errors.NOT_AUTHORIZED, f"{client} is not the host at {internal}")
        return PinholeOwner(Mechanism.UPNP, client)  # the rules judge a third party

    def _owned(self, args: dict[str, ArgumentValue], client: Client, *, manage: bool = False
               ) -> Pinhole:  # fmt: skip
        """The pinhole a UniqueID names, if the caller is its owner (606) and it exists (704)."""
        hole = self.service.by_uid(int(args["UniqueID"]))
        if hole is None:
            raise UpnpError(errors.NO_SUCH_ENTRY_V6, f"no pinhole {args['UniqueID']}")
        if manage and hole.owner.mechanism is not Mechanism.UPNP:
            # A PCP pinhole is its nonce's to renew or delete (RFC 6887 §11.3).
            raise UpnpError(errors.NOT_AUTHORIZED, f"pinhole {hole.uid} was opened over PCP")
        if not (
            client in (hole.owner.client, hole.key.internal_address)
            or self.same(client, hole.owner.client)
        ):
            raise UpnpError(errors.NOT_AUTHORIZED, f"pinhole {hole.uid} belongs to another host")
        return hole

    async def _packets(self, hole: Pinhole) -> int:
        try:
            return min(await self.service.packets(hole), 0xFFFFFFFF)
        except BackendError as error:
            raise UpnpError(errors.ACTION_FAILED, f"cannot read the counters: {error}") from None

    def _conntrack_timeout(self, protocol: Protocol) -> int:
        name, fallback = OUTBOUND_TIMEOUTS[protocol]
        try:
            return min(int((self.conntrack / name).read_text().strip()), 0xFFFFFFFF)
        except (OSError, ValueError):
            return fallback


def _internal_client(text: str) -> IPv6Address:
    text = text.strip()
    if text in ("", "*"):
        # §2.5.8: the internal client may never be a wildcard.
        raise UpnpError(errors.WILDCARD_IN_SRC_IP, "InternalClient must name one host")
    try:
        return IPv6Address(text.split("%")[0])
    except ValueError:
        raise UpnpError(errors.INVALID_ARGS, f"InternalClient {text[:60]!r}") from None


def _protocol(number: int) -> Protocol:
    if number == PROTOCOL_WILDCARD:
        raise UpnpError(errors.PROTOCOL_WILDCARD, "Protocol 65535 (all)")
    if number not in PROTOCOLS:
        raise UpnpError(errors.PROTOCOL_NOT_SUPPORTED, f"protocol {number}: TCP and UDP only")
    return PROTOCOLS[number]


def _lease(seconds: int) -> int:
    # §2.3.7: LeaseTime is 1..86400; anything else is an argument error.
    if not 1 <= seconds <= MAX_PINHOLE_LEASE:
        raise UpnpError(errors.INVALID_ARGS, f"LeaseTime {seconds} outside 1..{MAX_PINHOLE_LEASE}")
    return seconds


def _remote(host: str, port: int) -> PinholeFilter | None:
    """RemoteHost "" and RemotePort 0 are wildcards (§2.3.1); so are "*" (miniupnpd takes it)
    and "::", the unspecified address no packet comes from (async-upnp-client sends an
    IPv6Address, so "::" is how its users say "any")."""
    host = host.strip()
    if host in ("", "*", "::"):
        return None if port == 0 else PinholeFilter(ANY_REMOTE, port)
    try:
        address = IPv6Address(host.split("%")[0])
    except ValueError:
        raise UpnpError(errors.INVALID_ARGS, f"RemoteHost {host[:60]!r}") from None
    return PinholeFilter(IPv6Network(address), port)
