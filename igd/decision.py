"""Outcomes of policy evaluation and gateway operations, with neutral refusal reasons.

Each protocol adapter maps `Reason` to its own result codes; a test checks that every
reason has an entry in every protocol's table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from igd.model import RemoteFilter
from igd.ports import PortSet


class Reason(enum.StrEnum):
    """Why a request was refused, independent of the protocol that carried it."""

    # A missing external address is not among them: the core never sees that address, and
    # each adapter answers its absence before the request reaches the gateway (NAT-PMP and
    # PCP NETWORK_FAILURE, RFC 6886 §3.5 and RFC 6887 §7.4; UPnP 501).
    POLICY_DENIED = "policy-denied"
    """A deny rule or the default action refused it."""
    THIRD_PARTY_DENIED = "third-party-denied"
    """The internal address is not the requester's and the policy does not allow that."""
    CLIENT_QUOTA = "client-quota"
    """The requester holds max_mappings_per_client already."""
    GATEWAY_QUOTA = "gateway-quota"
    """The gateway holds max_mappings already."""
    PORT_IN_USE = "port-in-use"
    """The exact external port asked for belongs to another mapping."""
    NO_FREE_PORT = "no-free-port"
    """No external port the policy allows is free."""
    RESERVED_PORT = "reserved-port"
    """The exact external port asked for is reserved by the gateway itself."""
    NOT_OWNER = "not-owner"
    """The mapping exists but belongs to another client or nonce."""
    BACKEND_FAILURE = "backend-failure"
    """The kernel or the lease store refused the change."""
    INVALID_INTERNAL_ADDRESS = "invalid-internal-address"
    """The mapping would point at no LAN host: the gateway itself, a broadcast, multicast or
    loopback address, or an address outside the internal networks."""
    GATEWAY_CLIENT = "gateway-client"
    """The request came from the gateway's own address and no deciding rule names it."""


@dataclass(frozen=True, slots=True)
class Allow:
    """The policy grants the request, possibly restricted."""

    rule: str
    lifetime: int
    """Granted lease in seconds after clamping."""
    external_ports: PortSet
    """External ports the gateway may assign."""
    restrictions: tuple[str, ...] = ()
    """Human-readable notes on what was narrowed (lease shortened, ports limited)."""
    filters: tuple[RemoteFilter, ...] | None = None
    """The remote sources the mapping admits when the rule's remote_hosts restrict them
    (the request's FILTERs intersected with the rule's networks); None: as asked."""


@dataclass(frozen=True, slots=True)
class Deny:
    """The request is refused."""

    reason: Reason
    rule: str
    detail: str = ""
    other_port_allowed: bool = False
    """Refused only because of the exact external port asked for: the policy would grant
    the request with a port of the gateway's choosing (PCP answers PREFER_FAILURE's
    CANNOT_PROVIDE_EXTERNAL then, RFC 6887 §13.2)."""


Decision = Allow | Deny
