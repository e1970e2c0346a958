"""Domain types shared by every mechanism: what a mapping is, who owns it, what was asked."""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address


@functools.lru_cache(maxsize=4096)
def address_text(address: IPv4Address | IPv6Address) -> str:
    """`str(address)`, remembered: formatting an address costs a microsecond (IPv6 about as
    much as the rest of a store row), a grant writes its client's about four times, and a
    LAN holds few addresses (bounded: 4096 remembered)."""
    return str(address)


class Protocol(enum.StrEnum):
    """Transport protocol of a mapping."""

    TCP = "tcp"
    UDP = "udp"

    @property
    def number(self) -> int:
        """IANA protocol number (as carried by PCP and nftables)."""
        return 6 if self is Protocol.TCP else 17

    @classmethod
    def from_number(cls, number: int) -> Protocol:
        """Inverse of `number`; ValueError for anything but 6 and 17."""
        if number == 6:
            return cls.TCP
        if number == 17:
            return cls.UDP
        raise ValueError(f"unsupported protocol number {number}")


class Mechanism(enum.StrEnum):
    """How a mapping was requested."""

    UPNP = "upnp"
    NATPMP = "natpmp"
    PCP = "pcp"
    STATIC = "static"
    """An admin-defined forward from the policy file: no protocol may renew or delete it."""


REQUESTED = (Mechanism.UPNP, Mechanism.NATPMP, Mechanism.PCP)
"""The mechanisms a client can request over (a rule's `via`, the client's `--via`)."""

STATIC_CLIENT = IPv4Address("0.0.0.0")
"""The owning client of every static forward: no requester ever has this address, so
forwards conflict with every client's requests (RFC 6886 §3.3's companion ports too)."""


DEFAULT_ADDRESS = IPv4Address("0.0.0.0")
"""In a MapRequest's external_address: the default external address, asked for by name (a
PCP client suggesting it); None there asks for nothing in particular."""


@dataclass(frozen=True, slots=True)
class MappingKey:
    """What identifies a mapping on the external side; remote_host None is the wildcard."""

    protocol: Protocol
    external_port: int
    remote_host: IPv4Address | None = None
    external_address: IPv4Address | None = None
    """One of `network.external_addresses`; None is the default external address (the
    interface's, followed as it changes), which is what nearly every mapping uses."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a mapping: the mechanism, the requesting client and, for PCP, its nonce."""

    mechanism: Mechanism
    client: IPv4Address
    nonce: bytes | None = None


@dataclass(frozen=True, slots=True, order=True)
class RemoteFilter:
    """Only traffic from this remote network (and port, 0 = any) may use a mapping (PCP FILTER)."""

    network: IPv4Network
    port: int = 0


@dataclass(frozen=True, slots=True)
class Mapping:
    """One granted inbound mapping. Times are monotonic seconds (the caller's clock)."""

    key: MappingKey
    internal_address: IPv4Address
    internal_port: int
    owner: Owner
    created: float
    expires: float
    description: str = ""
    filters: tuple[RemoteFilter, ...] = ()
    """Remote peers allowed in; empty admits everyone (RFC 6887 §13.3)."""
    peer_port: int = 0
    """Non-zero for an outbound PCP PEER mapping: the remote peer's port; the peer's address
    is key.remote_host (RFC 6887 §12)."""

    @property
    def is_peer(self) -> bool:
        return self.peer_port != 0

    @property
    def protocol(self) -> Protocol:
        return self.key.protocol

    @property
    def external_port(self) -> int:
        return self.key.external_port

    @property
    def external_address(self) -> IPv4Address | None:
        """The mapping's own external address; None: the default one."""
        return self.key.external_address

    @property
    def is_static(self) -> bool:
        """Whether this is an admin-defined forward (docs/policy.md, Forwards)."""
        return self.owner.mechanism is Mechanism.STATIC

    def remaining(self, now: float) -> int:
        """Whole seconds of lease left (never negative); 0 for a mapping without end, as UPnP
        writes a permanent lease."""
        if self.expires == math.inf:
            return 0
        return max(0, int(self.expires - now + 0.5))


@dataclass(frozen=True, slots=True)
class MapRequest:
    """A request to create or refresh a mapping, in mechanism-neutral terms."""

    mechanism: Mechanism
    client: IPv4Address
    protocol: Protocol
    internal_address: IPv4Address
    internal_port: int
    external_port: int
    """Suggested external port; 0 lets the gateway choose."""
    lifetime: int
    """Requested lease in seconds, > 0 (deletion is a separate operation)."""
    remote_host: IPv4Address | None = None
    description: str = ""
    nonce: bytes | None = None
    filters: tuple[RemoteFilter, ...] = ()
    peer_port: int = 0
    exact_port: bool = False
    """True when the protocol cannot accept another external port (UPnP AddPortMapping,
    PCP PREFER_FAILURE); False lets the gateway pick another allowed port."""
    external_address: IPv4Address | None = None
    """The external address asked for (PCP's suggested address, DEFAULT_ADDRESS for the
    default one); None: the one the deciding rule names first, else the default."""

    @classmethod
    def renewing(cls, mapping: Mapping, lifetime: int = 1) -> MapRequest:
        """The request that would renew a mapping as it stands (its external port fixed)."""
        return cls(
            mechanism=mapping.owner.mechanism,
            client=mapping.owner.client,
            protocol=mapping.protocol,
            internal_address=mapping.internal_address,
            internal_port=mapping.internal_port,
            external_port=mapping.external_port,
            lifetime=lifetime,
            remote_host=mapping.key.remote_host,
            description=mapping.description,
            nonce=mapping.owner.nonce,
            filters=mapping.filters,
            peer_port=mapping.peer_port,
            exact_port=True,
            external_address=mapping.external_address or DEFAULT_ADDRESS,
        )

    @property
    def third_party(self) -> bool:
        """Whether the mapping would point at an address other than the requester's."""
        return self.internal_address != self.client
