"""What happened in the gateway, as data: one small frozen type per kind of event.

The server's `Service` publishes these on its feed (igd/server/feed.py); GENA eventing, the
NAT-PMP/PCP announcements and PCP's Mapping Update bookkeeping consume them, and metrics, an
admin console or an audit log can subscribe the same way. Grants, renewals and removals are
published once the kernel and the lease store hold them; refusals as they are decided. IPv6
pinholes (igd/pinhole.py) have their own four kinds, published by the pinhole service on the
same feed under the same rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address

from igd.decision import Reason
from igd.model import Mapping, MapRequest
from igd.pinhole import Pinhole, PinholeRequest, Refusal


class RemovalCause(enum.StrEnum):
    """Why a mapping went away."""

    EXPIRED = "expired"
    CLIENT = "deleted-by-client"
    POLICY_RELOAD = "policy-reload"
    ADMIN = "deleted-by-admin"
    ADDRESS_CHANGE = "address-change"
    """The gateway's addresses changed and the mapping now points off the LAN (or its client
    became one of the gateway's own addresses); for a pinhole, its internal address left the
    LAN prefixes."""


class DropReason(enum.StrEnum):
    """Why a datagram was dropped unanswered before any protocol looked at it."""

    RATE_LIMIT = "rate-limit"
    CLIENT_IN_FLIGHT = "client-in-flight"
    """The client has MAX_IN_FLIGHT_PER_CLIENT requests being answered already."""
    TOTAL_IN_FLIGHT = "total-in-flight"
    """The daemon has MAX_IN_FLIGHT requests being answered already."""


@dataclass(frozen=True, slots=True)
class MappingGranted:
    """A new mapping is in the table, the kernel and the lease store."""

    mapping: Mapping
    request: MapRequest
    rule: str
    restrictions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MappingRenewed:
    """A mapping's lease (or description, filters) was refreshed by its owner."""

    mapping: Mapping
    previous: Mapping
    request: MapRequest
    rule: str


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """A map request was refused; nothing changed."""

    request: MapRequest
    reason: Reason
    rule: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class MappingRemoved:
    """A mapping is gone from the table, the kernel and the lease store."""

    mapping: Mapping
    cause: RemovalCause


@dataclass(frozen=True, slots=True)
class CommitFailed:
    """The kernel or the lease store refused a change; the table was put back."""

    removed: tuple[Mapping, ...]
    added: tuple[Mapping, ...]
    error: str


@dataclass(frozen=True, slots=True)
class ExternalAddressChanged:
    """The external address changed, appeared or went away (None)."""

    previous: IPv4Address | None
    current: IPv4Address | None


@dataclass(frozen=True, slots=True)
class DatagramDropped:
    """A NAT-PMP/PCP datagram was dropped by the UDP dispatcher's bounds."""

    client: IPv4Address
    reason: DropReason


@dataclass(frozen=True, slots=True)
class PinholeOpened:
    """A new pinhole is in the pinhole table, the kernel and the lease store."""

    pinhole: Pinhole
    rule: str
    restrictions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PinholeRenewed:
    """A pinhole's lease (or description, filters) was refreshed by its owner."""

    pinhole: Pinhole
    previous: Pinhole
    rule: str


@dataclass(frozen=True, slots=True)
class PinholeRefused:
    """A pinhole request (open, renew or delete) was refused; nothing changed."""

    request: PinholeRequest
    refusal: Refusal
    rule: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PinholeRemoved:
    """A pinhole is gone from the pinhole table, the kernel and the lease store."""

    pinhole: Pinhole
    cause: RemovalCause


PINHOLE_EVENTS = (PinholeOpened, PinholeRenewed, PinholeRefused, PinholeRemoved)

Event = (
    MappingGranted
    | MappingRenewed
    | RequestRefused
    | MappingRemoved
    | CommitFailed
    | ExternalAddressChanged
    | DatagramDropped
    | PinholeOpened
    | PinholeRenewed
    | PinholeRefused
    | PinholeRemoved
)
