"""Typed errors for every NAT-PMP, PCP and UPnP IGD result code, each saying what the
caller can do about it (`advice`), plus the errors of the client itself (no gateway, no
answer, an answer that does not fit the request)."""

from __future__ import annotations

import enum

from igd.model import Mechanism
from igd.proto.natpmp import NatPmpResult
from igd.proto.pcp import PcpResult


class Advice(enum.StrEnum):
    """What the caller can do about an error."""

    RETRY_LATER = "retry-later"
    """Transient: the same request may succeed later (see `retry_after`)."""
    OTHER_PORT = "other-port"
    """The external port is taken or refused: ask for another one, or let the gateway pick."""
    NOT_AUTHORIZED = "not-authorized"
    """The gateway's policy refuses this request; retrying will not help."""
    CHANGE_REQUEST = "change-request"
    """The request itself is not acceptable to this gateway (lease, port, argument)."""
    OTHER_MECHANISM = "other-mechanism"
    """This gateway does not support what was asked over this mechanism: try another."""
    NOT_FOUND = "not-found"
    """There is no such mapping (deleting it again is harmless)."""
    UPSTREAM_NAT = "upstream-nat"
    """Another NAT sits between this host and the gateway; mappings here would not work."""
    CHECK_NETWORK = "check-network"
    """No gateway answered: check the network, the gateway address, or the gateway's setup."""


class PortMappingError(Exception):
    """Base of every error this package raises."""

    advice: Advice = Advice.RETRY_LATER

    def __init__(
        self,
        message: str,
        *,
        mechanism: Mechanism | None = None,
        code: int | None = None,
        retry_after: float | None = None,
        error_lifetime: float | None = None,
    ) -> None:
        super().__init__(message)
        self.mechanism = mechanism
        self.code = code
        self.retry_after = retry_after
        """Seconds after which the same request may succeed; only on transient errors."""
        self.error_lifetime = error_lifetime
        """PCP: how long the gateway's answer holds (RFC 6887 §7.4): do not repeat the
        same request sooner, whatever the error (a refusal stays a refusal after it)."""


class NoGatewayError(PortMappingError):
    """No gateway was found, or none answered over the mechanisms asked for."""

    advice = Advice.CHECK_NETWORK


class GatewayTimeout(NoGatewayError):
    """The gateway did not answer within the retransmission schedule."""


class ProtocolError(PortMappingError):
    """The gateway answered something that does not fit the request (wrong nonce, port or
    opcode, undecodable reply); the answer was not trusted."""

    advice = Advice.RETRY_LATER


class MappingRefused(PortMappingError):
    """The gateway answered with an error result code."""


class TemporaryFailure(MappingRefused):
    """The gateway cannot do it now (network failure, action failed): retry later."""

    advice = Advice.RETRY_LATER


class OutOfResources(MappingRefused):
    """Quota or table full: release mappings you no longer need, or retry later."""

    advice = Advice.RETRY_LATER


class PortUnavailable(MappingRefused):
    """The external port is taken (or, on some routers, refused): pick another port."""

    advice = Advice.OTHER_PORT


class NotAuthorized(MappingRefused):
    """The gateway's policy refuses the request."""

    advice = Advice.NOT_AUTHORIZED


class InvalidRequest(MappingRefused):
    """The gateway rejected the request's form or arguments."""

    advice = Advice.CHANGE_REQUEST


class Unsupported(MappingRefused):
    """The gateway does not implement this version, opcode, option, protocol or action."""

    advice = Advice.OTHER_MECHANISM


class UnsupportedVersion(Unsupported):
    """The gateway does not speak this protocol version; `version` is the one it named."""

    def __init__(
        self,
        message: str,
        *,
        version: int,
        mechanism: Mechanism | None = None,
        code: int | None = None,
        retry_after: float | None = None,
        error_lifetime: float | None = None,
    ) -> None:
        super().__init__(
            message, mechanism=mechanism, code=code, retry_after=retry_after,
            error_lifetime=error_lifetime,
        )  # fmt: skip
        self.version = version


class NoSuchMapping(MappingRefused):
    """The mapping does not exist on the gateway."""

    advice = Advice.NOT_FOUND


class UpstreamNat(MappingRefused):
    """PCP ADDRESS_MISMATCH: a NAT between us and the PCP server rewrote our address."""

    advice = Advice.UPSTREAM_NAT


_Entry = tuple[type[MappingRefused], str]

NATPMP_ERRORS: dict[NatPmpResult, _Entry] = {
    NatPmpResult.UNSUPPORTED_VERSION: (UnsupportedVersion, "unsupported NAT-PMP version"),
    NatPmpResult.NOT_AUTHORIZED: (NotAuthorized, "not authorized or refused by the gateway"),
    NatPmpResult.NETWORK_FAILURE: (TemporaryFailure, "network failure (no external address?)"),
    NatPmpResult.OUT_OF_RESOURCES: (OutOfResources, "out of resources (quota or table full)"),
    NatPmpResult.UNSUPPORTED_OPCODE: (Unsupported, "unsupported NAT-PMP opcode"),
}

PCP_ERRORS: dict[PcpResult, _Entry] = {
    PcpResult.UNSUPP_VERSION: (UnsupportedVersion, "unsupported PCP version"),
    PcpResult.NOT_AUTHORIZED: (NotAuthorized, "not authorized (policy, or another nonce owns it)"),
    PcpResult.MALFORMED_REQUEST: (InvalidRequest, "malformed request"),
    PcpResult.UNSUPP_OPCODE: (Unsupported, "unsupported opcode"),
    PcpResult.UNSUPP_OPTION: (Unsupported, "unsupported or prohibited option"),
    PcpResult.MALFORMED_OPTION: (InvalidRequest, "malformed option"),
    PcpResult.NETWORK_FAILURE: (TemporaryFailure, "network failure (no external address?)"),
    PcpResult.NO_RESOURCES: (OutOfResources, "no resources on the gateway"),
    PcpResult.UNSUPP_PROTOCOL: (Unsupported, "transport protocol not supported"),
    PcpResult.USER_EX_QUOTA: (OutOfResources, "per-host quota exceeded"),
    PcpResult.CANNOT_PROVIDE_EXTERNAL: (PortUnavailable, "cannot provide that external port"),
    PcpResult.ADDRESS_MISMATCH: (UpstreamNat, "address mismatch: a NAT is in the path"),
    PcpResult.EXCESSIVE_REMOTE_PEERS: (InvalidRequest, "too many FILTER remote peers"),
}

UPNP_ERRORS: dict[int, _Entry] = {
    401: (Unsupported, "Invalid Action: the gateway does not implement this action"),
    402: (InvalidRequest, "Invalid Args"),
    403: (TemporaryFailure, "Out of Sync"),
    501: (TemporaryFailure, "Action Failed"),
    600: (InvalidRequest, "Argument Value Invalid"),
    601: (InvalidRequest, "Argument Value Out of Range"),
    602: (Unsupported, "Optional Action Not Implemented"),
    603: (OutOfResources, "Out of Memory"),
    604: (NotAuthorized, "Human Intervention Required"),
    605: (InvalidRequest, "String Argument Too Long (shorten the description)"),
    606: (NotAuthorized, "Action Not Authorized"),
    713: (NoSuchMapping, "SpecifiedArrayIndexInvalid (end of the mapping list)"),
    714: (NoSuchMapping, "NoSuchEntryInArray"),
    715: (InvalidRequest, "WildCardNotPermittedInSrcIP"),
    716: (InvalidRequest, "WildCardNotPermittedInExtPort"),
    # Often "not authorized" in disguise (miniupnp #359: IGDv1 has no 606).
    718: (PortUnavailable, "ConflictInMappingEntry (or refused by an IGDv1 secure mode)"),
    724: (InvalidRequest, "SamePortValuesRequired"),
    725: (InvalidRequest, "OnlyPermanentLeasesSupported"),
    726: (InvalidRequest, "RemoteHostOnlySupportsWildcard"),
    727: (InvalidRequest, "ExternalPortOnlySupportsWildcard"),
    728: (OutOfResources, "NoPortMapsAvailable"),
    729: (PortUnavailable, "ConflictWithOtherMechanisms"),
    730: (NoSuchMapping, "PortMappingNotFound"),
    732: (InvalidRequest, "WildCardNotPermittedInIntPort"),
    733: (InvalidRequest, "InconsistentParameters"),
}

# RFC 6887 §7.4: short-lifetime errors are the transient ones.
_PCP_SHORT = {
    PcpResult.NETWORK_FAILURE,
    PcpResult.NO_RESOURCES,
    PcpResult.USER_EX_QUOTA,
}


def natpmp_error(result: NatPmpResult | int, what: str = "request") -> MappingRefused:
    """The typed error for a NAT-PMP result code (unknown codes are fatal, RFC 6886 §3.5)."""
    try:
        cls, text = NATPMP_ERRORS[NatPmpResult(result)]
    except (KeyError, ValueError):
        cls, text = MappingRefused, "unknown result code"
    message = f"NAT-PMP {what}: {text} (result {int(result)})"
    if cls is UnsupportedVersion:
        return UnsupportedVersion(message, version=0, mechanism=Mechanism.NATPMP, code=int(result))
    return cls(message, mechanism=Mechanism.NATPMP, code=int(result))


def pcp_error(result: PcpResult, lifetime: int, what: str = "request") -> MappingRefused:
    """The typed error for a PCP result code; `lifetime` is how long the answer holds."""
    cls, text = PCP_ERRORS.get(result, (MappingRefused, "unknown result code"))
    message = f"PCP {what}: {text} ({result.name}, result {int(result)})"
    # RFC 6887 §7.4: do not repeat the request before the error lifetime ends. Only the
    # short-lifetime errors are transient; after a long one (NOT_AUTHORIZED, 1800 s from
    # igd-server) the same request is refused again, so it carries no `retry_after`.
    held = float(lifetime)
    retry_after = held if result in _PCP_SHORT else None
    if cls is UnsupportedVersion:
        return UnsupportedVersion(
            message, version=2, mechanism=Mechanism.PCP, code=int(result),
            retry_after=retry_after, error_lifetime=held,
        )  # fmt: skip
    return cls(
        message, mechanism=Mechanism.PCP, code=int(result), retry_after=retry_after,
        error_lifetime=held,
    )  # fmt: skip


def upnp_error(code: int | None, description: str | None, what: str = "action") -> PortMappingError:
    """The typed error for a UPnP SOAP fault code."""
    if code is None:
        return ProtocolError(f"UPnP {what} failed without an error code", mechanism=Mechanism.UPNP)
    cls, text = UPNP_ERRORS.get(code, (MappingRefused, "vendor or unknown error"))
    said = f": {description}" if description and description not in text else ""
    return cls(f"UPnP {what}: error {code} {text}{said}", mechanism=Mechanism.UPNP, code=code)
