"""Classifying external addresses and choosing a mechanism."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from igd.client.selection import AddressKind, MechanismReport, Verdict, choose, classify
from igd.model import Mechanism

A = IPv4Address


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", AddressKind.PUBLIC),
        ("100.128.7.1", AddressKind.PUBLIC),  # just past 100.64/10
        ("100.64.1.1", AddressKind.SHARED),
        ("192.168.1.3", AddressKind.PRIVATE),
        ("10.0.0.1", AddressKind.PRIVATE),
        ("203.0.113.1", AddressKind.RESERVED),
        ("169.254.1.1", AddressKind.RESERVED),
        ("0.0.0.0", AddressKind.UNSPECIFIED),
        ("127.0.0.1", AddressKind.UNSPECIFIED),
    ],
)
def test_classify(address: str, kind: AddressKind) -> None:
    assert classify(A(address)) is kind


def report(mechanism: Mechanism, address: str | None, available: bool = True) -> MechanismReport:
    return MechanismReport(mechanism, available, A(address) if address else None)


def test_public_address_wins_over_preference() -> None:
    # Tailscale #13745: NAT-PMP said 192.168.1.3 while UPnP reached the real public address.
    choice = choose([report(Mechanism.NATPMP, "192.168.1.3"), report(Mechanism.UPNP, "8.8.8.8")])
    assert (choice.mechanism, choice.verdict) == (Mechanism.UPNP, Verdict.PUBLIC)
    assert choice.ranked == (Mechanism.UPNP, Mechanism.NATPMP)


def test_preference_among_equals_pcp_first() -> None:
    reports = [report(m, "8.8.8.8") for m in (Mechanism.UPNP, Mechanism.NATPMP, Mechanism.PCP)]
    assert choose(reports).mechanism is Mechanism.PCP
    assert choose(reports, [Mechanism.UPNP, Mechanism.PCP]).mechanism is Mechanism.UPNP


def test_double_nat_and_cgn_are_reported_not_hidden() -> None:
    choice = choose([report(Mechanism.NATPMP, "203.0.113.1")])
    assert choice.mechanism is Mechanism.NATPMP and choice.verdict is Verdict.DOUBLE_NAT
    assert "203.0.113.1" in choice.reason
    assert choose([report(Mechanism.UPNP, "100.100.0.1")]).verdict is Verdict.CGN


def test_zero_address_ranks_last() -> None:
    choice = choose([report(Mechanism.UPNP, "0.0.0.0"), report(Mechanism.NATPMP, "10.1.1.1")])
    assert choice.mechanism is Mechanism.NATPMP


def test_nothing_usable() -> None:
    none = choose([report(Mechanism.NATPMP, None, available=False)])
    assert (none.mechanism, none.verdict) == (None, Verdict.NO_GATEWAY)
    mismatch = MechanismReport(Mechanism.PCP, False, upstream_nat=True)
    assert choose([mismatch]).verdict is Verdict.UPSTREAM_NAT
