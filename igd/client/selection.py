"""Which mechanism to use, and what the external address says about the network: pure
functions of what the probe heard."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from igd.model import Mechanism

DEFAULT_PREFERENCE = (Mechanism.PCP, Mechanism.NATPMP, Mechanism.UPNP)

SHARED = IPv4Network("100.64.0.0/10")  # RFC 6598: carrier-grade NAT


class AddressKind(enum.StrEnum):
    """What kind of address a gateway reported as its external one."""

    PUBLIC = "public"
    PRIVATE = "private"
    """RFC 1918 and the like: another NAT is upstream (double NAT)."""
    SHARED = "shared"
    """100.64.0.0/10: carrier-grade NAT upstream."""
    RESERVED = "reserved"
    """Documentation, benchmarking, link-local or other special ranges: not reachable."""
    UNSPECIFIED = "unspecified"
    """0.0.0.0 (or loopback): the gateway has no usable external address; a router bug."""


class Verdict(enum.StrEnum):
    """The network situation, as a caller would act on it."""

    PUBLIC = "public"
    DOUBLE_NAT = "double-nat"
    CGN = "cgn"
    UPSTREAM_NAT = "upstream-nat"
    """PCP ADDRESS_MISMATCH: a NAT between this host and the gateway."""
    UNKNOWN = "unknown"
    """A mechanism works but did not say its external address (PCP alone before a MAP)."""
    NO_GATEWAY = "no-gateway"


def classify(address: IPv4Address) -> AddressKind:
    """Classify an external address (miniupnpc's reserved list, 100.64/10 separately)."""
    if address.is_unspecified or address.is_loopback:
        return AddressKind.UNSPECIFIED
    if address in SHARED:
        return AddressKind.SHARED
    if address.is_private and not (address.is_link_local or _is_special(address)):
        return AddressKind.PRIVATE
    if not address.is_global or address.is_multicast:
        return AddressKind.RESERVED
    return AddressKind.PUBLIC


def _is_special(address: IPv4Address) -> bool:
    """Documentation and benchmarking ranges, which Python counts as private."""
    return any(
        address in IPv4Network(net)
        for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "198.18.0.0/15")
    )


_VERDICT = {
    AddressKind.PUBLIC: Verdict.PUBLIC,
    AddressKind.PRIVATE: Verdict.DOUBLE_NAT,
    AddressKind.SHARED: Verdict.CGN,
    AddressKind.RESERVED: Verdict.DOUBLE_NAT,
    AddressKind.UNSPECIFIED: Verdict.UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class MechanismReport:
    """What probing one mechanism found."""

    mechanism: Mechanism
    available: bool
    external_address: IPv4Address | None = None
    epoch: int | None = None
    error: str | None = None
    """Why it is not available (or, if available, a warning)."""
    refuses: bool = False
    """It answered, but with a refusal (it runs, yet will not map for us)."""
    upstream_nat: bool = False
    seconds: float | None = None
    """Time until the answer came."""
    detail: str = ""
    """Free text: the UPnP service and server, the PCP fallback ..."""

    @property
    def address_kind(self) -> AddressKind | None:
        return None if self.external_address is None else classify(self.external_address)


@dataclass(frozen=True, slots=True)
class Choice:
    """The mechanism picked, why, and the network verdict."""

    mechanism: Mechanism | None
    verdict: Verdict
    reason: str
    external_address: IPv4Address | None = None
    ranked: tuple[Mechanism, ...] = field(default=())


def _address_rank(report: MechanismReport) -> int:
    kind = report.address_kind
    if kind is AddressKind.PUBLIC:
        return 0
    if kind is None:
        return 1  # unknown yet (PCP ANNOUNCE carries no address): maybe public
    if kind is AddressKind.UNSPECIFIED:
        return 3
    return 2


def choose(
    reports: Sequence[MechanismReport], prefer: Sequence[Mechanism] = DEFAULT_PREFERENCE
) -> Choice:
    """Pick the mechanism: a public external address first, whatever the protocol; among
    equals, the order of `prefer`. Report double NAT or CGN instead of pretending."""
    usable = [r for r in reports if r.available and r.mechanism in prefer]
    if not usable:
        if any(r.upstream_nat for r in reports):
            return Choice(None, Verdict.UPSTREAM_NAT, "PCP reports a NAT between us and it")
        refusing = [r.mechanism.value for r in reports if r.refuses]
        if refusing:
            reason = f"the gateway answers over {', '.join(refusing)} but refuses us"
        else:
            reason = "no gateway answered over " + ", ".join(m.value for m in prefer)
        return Choice(None, Verdict.NO_GATEWAY, reason)
    ranked = sorted(usable, key=lambda r: (_address_rank(r), prefer.index(r.mechanism)))
    best = ranked[0]
    address = best.external_address or next(
        (r.external_address for r in ranked if r.external_address is not None), None
    )
    verdict = Verdict.UNKNOWN if address is None else _VERDICT[classify(address)]
    if address is None:
        reason = f"{best.mechanism.value} answers; its external address is not known yet"
    elif verdict is Verdict.PUBLIC:
        reason = f"{best.mechanism.value} gives the public address {address}"
    else:
        kind = classify(address).value
        reason = (
            f"{best.mechanism.value} works, but its external address {address} is {kind}: "
            f"{_EXPLAIN[verdict]}"
        )
    return Choice(best.mechanism, verdict, reason, address, tuple(r.mechanism for r in ranked))


_EXPLAIN = {
    Verdict.DOUBLE_NAT: "another NAT is upstream (double NAT); a mapping here is not enough "
    "to be reachable from the internet",
    Verdict.CGN: "the provider's carrier-grade NAT is upstream; the mapping is not reachable "
    "from the internet",
    Verdict.UNKNOWN: "the gateway reports no usable external address",
}
