"""Every NAT-PMP, PCP and UPnP code has a typed error that says what to do."""

from __future__ import annotations

from igd.client.errors import (
    Advice,
    NotAuthorized,
    PortUnavailable,
    UnsupportedVersion,
    natpmp_error,
    pcp_error,
    upnp_error,
)
from igd.model import Mechanism
from igd.proto.natpmp import NatPmpResult
from igd.proto.pcp import PcpResult


def test_every_natpmp_and_pcp_error_code_is_typed() -> None:
    for result in NatPmpResult:
        if result is not NatPmpResult.SUCCESS:
            error = natpmp_error(result)
            assert type(error).__name__ != "MappingRefused", result
            assert error.mechanism is Mechanism.NATPMP and error.code == result
    for code in PcpResult:
        if code is not PcpResult.SUCCESS:
            assert type(pcp_error(code, 30)).__name__ != "MappingRefused", code


def test_refusals_say_what_to_do() -> None:
    assert isinstance(natpmp_error(NatPmpResult.NOT_AUTHORIZED), NotAuthorized)
    assert natpmp_error(NatPmpResult.OUT_OF_RESOURCES).advice is Advice.RETRY_LATER
    quota = pcp_error(PcpResult.USER_EX_QUOTA, 30)
    assert quota.advice is Advice.RETRY_LATER and quota.retry_after == 30
    assert pcp_error(PcpResult.ADDRESS_MISMATCH, 1800).advice is Advice.UPSTREAM_NAT
    version = pcp_error(PcpResult.UNSUPP_VERSION, 0)
    assert isinstance(version, UnsupportedVersion)


def test_upnp_codes() -> None:
    assert isinstance(upnp_error(606, None), NotAuthorized)
    conflict = upnp_error(718, "ConflictInMappingEntry")
    assert isinstance(conflict, PortUnavailable) and conflict.advice is Advice.OTHER_PORT
    assert upnp_error(725, None).advice is Advice.CHANGE_REQUEST
    assert upnp_error(714, None).advice is Advice.NOT_FOUND
    assert upnp_error(899, "vendor").code == 899


def test_only_transient_pcp_errors_suggest_a_retry() -> None:
    # RFC 6887 §7.4: a long-lifetime error (policy) holds for its lifetime and is not a
    # "try again later"; a short one (quota, no resources) is.
    refused = pcp_error(PcpResult.NOT_AUTHORIZED, 1800)
    assert (refused.retry_after, refused.error_lifetime) == (None, 1800)
    assert refused.advice is Advice.NOT_AUTHORIZED
    busy = pcp_error(PcpResult.NO_RESOURCES, 30)
    assert (busy.retry_after, busy.error_lifetime, busy.advice) == (30, 30, Advice.RETRY_LATER)
