"""IPv6 pinhole requests through the policy engine: the same rules, keys and default deny."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network

from igd.decision import Deny, Reason
from igd.model import MapRequest, Mechanism, Protocol
from igd.pinhole import (
    PinholeAllow,
    PinholeChange,
    PinholeDeny,
    PinholeFilter,
    PinholeKey,
    PinholeOwner,
    PinholeRequest,
    PinholeRules,
    Pinholes,
    Refusal,
)
from igd.policy import EMPTY_VIEW, Policy

LAN = IPv6Network("2001:db8:0:77::/64")
A = IPv6Address("2001:db8:0:77::a")
B = IPv6Address("2001:db8:0:77::b")
WAN = IPv6Network("2001:db8:0:1::/64")

POLICY = Policy.parse(
    """
[defaults]
action = "deny"
max_lease = 7200
min_lease = 120
max_mappings_per_client = 4
max_mappings = 10

[[rules]]
name = "no telnet"
action = "deny"
internal_ports = "23"

[[rules]]
name = "privileged"
action = "deny"
external_ports = "1-1023"

[[rules]]
name = "guests"
action = "deny"
clients = ["2001:db8:0:77:8000::/65"]

[[rules]]
name = "IPv4 LAN"
action = "allow"
clients = ["192.168.1.0/24"]

[[rules]]
name = "camera"
action = "allow"
clients = ["2001:db8:0:77::b/128"]
internal_addresses = ["2001:db8:0:77::c/128"]
allow_third_party = true
remote_hosts = ["2001:db8:0:1::/64", "198.51.100.0/24"]
max_lease = 600
max_mappings_per_client = 1

[[rules]]
name = "IPv6 LAN"
action = "allow"
clients = ["2001:db8:0:77::/64"]
protocols = ["tcp", "udp"]
""",
    "six.toml",
)


def ask(
    client: IPv6Address = A,
    internal: IPv6Address | None = None,
    port: int = 8080,
    lifetime: int = 3600,
    filters: tuple[PinholeFilter, ...] = (),
    mechanism: Mechanism = Mechanism.PCP,
) -> PinholeRequest:
    key = PinholeKey(internal or client, Protocol.TCP, port)
    return PinholeRequest(key, PinholeOwner(mechanism, client), lifetime, "", filters)


def decide(
    request: PinholeRequest, *, held: int = 0, total: int = 0, renewal: bool = False
) -> PinholeAllow | PinholeDeny:
    return POLICY.evaluate_pinhole(request, held=held, total=total, now=0.0, renewal=renewal)


def test_an_ipv6_prefix_rule_allows_and_clamps_the_lease() -> None:
    decision = decide(ask(lifetime=100_000))
    assert decision == PinholeAllow(
        "IPv6 LAN", 7200, ("lease shortened from 100000 s to 7200 s (defaults.max_lease)",)
    )


def test_ipv4_rules_never_match_a_pinhole_and_the_default_denies() -> None:
    outsider = IPv6Address("2001:db8:0:99::1")
    decision = decide(ask(client=outsider))
    assert isinstance(decision, PinholeDeny) and decision.rule == "defaults"
    assert decision.refusal is Refusal.NOT_ALLOWED and "default action is deny" in decision.detail


def test_a_deny_rule_for_a_prefix_refuses_its_hosts_only() -> None:
    guest = IPv6Address("2001:db8:0:77:8000::5")
    assert decide(ask(client=guest)) == PinholeDeny(
        Refusal.NOT_ALLOWED, "guests", f"pinhole tcp [{guest}]:8080 for {guest} via pcp is denied"
    )
    assert isinstance(decide(ask(client=IPv6Address("2001:db8:0:77:7fff::5"))), PinholeAllow)


def test_a_pinholes_external_port_is_its_internal_port() -> None:
    denied = decide(ask(port=443))
    assert isinstance(denied, PinholeDeny) and denied.rule == "privileged"
    telnet = decide(ask(port=23))
    assert isinstance(telnet, PinholeDeny) and telnet.rule == "no telnet"


def test_secure_mode_refuses_third_party_pinholes_unless_the_rule_allows_them() -> None:
    other = decide(ask(internal=A, client=IPv6Address("2001:db8:0:77::d")))
    assert isinstance(other, PinholeDeny) and other.refusal is Refusal.THIRD_PARTY
    assert other.rule == "IPv6 LAN" and "secure mode" in other.detail
    camera = decide(ask(client=B, internal=IPv6Address("2001:db8:0:77::c"), lifetime=3600))
    assert isinstance(camera, PinholeAllow) and (camera.rule, camera.lifetime) == ("camera", 600)


def test_remote_hosts_limit_a_pinhole_to_the_rules_ipv6_sources() -> None:
    camera = IPv6Address("2001:db8:0:77::c")
    granted = decide(ask(client=B, internal=camera))
    assert isinstance(granted, PinholeAllow) and granted.filters == (PinholeFilter(WAN),)
    assert "remote sources limited to 2001:db8:0:1::/64 by rule 'camera'" in granted.notes
    narrower = (PinholeFilter(IPv6Network("2001:db8:0:1::5/128"), 443),)
    assert decide(ask(client=B, internal=camera, filters=narrower)).filters == narrower  # type: ignore[union-attr]
    elsewhere = (PinholeFilter(IPv6Network("2001:db8:0:2::/64")),)
    refused = decide(ask(client=B, internal=camera, filters=elsewhere))
    assert isinstance(refused, PinholeDeny) and "admit no source in remote_hosts" in refused.detail


def test_quotas_count_pinholes_against_the_same_limits_and_spare_renewals() -> None:
    camera = ask(client=B, internal=IPv6Address("2001:db8:0:77::c"))
    assert decide(camera, held=1) == PinholeDeny(
        Refusal.QUOTA, "camera", f"client {B} holds 1 pinholes (limit 1)"
    )
    assert isinstance(decide(camera, held=1, renewal=True), PinholeAllow)
    assert decide(ask(), held=4).refusal is Refusal.QUOTA  # type: ignore[union-attr]
    full = decide(ask(), total=10)
    assert isinstance(full, PinholeDeny) and (full.refusal, full.rule) == (Refusal.FULL, "defaults")


def test_an_ipv4_mapping_under_ipv6_only_remote_hosts_admits_no_source() -> None:
    policy = Policy.parse(
        '[[rules]]\nname = "r"\naction = "allow"\nremote_hosts = ["2001:db8::/32"]\n'
    )
    host = IPv4Address("192.168.1.20")
    request = MapRequest(Mechanism.NATPMP, host, Protocol.TCP, host, 8080, 8080, 3600)
    decision = policy.evaluate(request, EMPTY_VIEW, now=0.0)
    assert isinstance(decision, Deny) and decision.reason is Reason.POLICY_DENIED
    assert "hold no IPv4 source" in decision.detail


def test_the_pinhole_table_asks_the_policy_and_keeps_the_lan_rule_itself() -> None:
    holes = Pinholes(PinholeRules((LAN,), max_pinholes=2), POLICY)
    opened = holes.open(ask(), now=0)
    assert isinstance(opened, PinholeChange) and opened.rule == "IPv6 LAN"
    assert opened.added[0].expires == 3600
    # No rule makes a host outside the LAN prefixes (or the subnet-router anycast) a target.
    for target in (IPv6Address("2001:db8:0:1::5"), LAN.network_address):
        refused = holes.open(ask(client=B, internal=target), now=0)
        assert isinstance(refused, PinholeDeny) and refused.rule == "gateway"
    assert isinstance(holes.open(ask(client=B), now=0), PinholeChange)
    full = holes.open(ask(client=IPv6Address("2001:db8:0:77::e")), now=0)
    assert isinstance(full, PinholeDeny) and full.refusal is Refusal.FULL  # [ipv6] max_pinholes


def test_a_stricter_policy_finds_the_pinholes_it_no_longer_allows() -> None:
    holes = Pinholes(PinholeRules((LAN,)), POLICY)
    holes.open(ask(), now=0)
    holes.open(ask(client=B, port=9000), now=0)
    stricter = Policy.parse(
        '[[rules]]\nname = "only A"\naction = "allow"\nclients = ["2001:db8:0:77::a/128"]\n'
    )
    assert [h.owner.client for h in holes.refused(now=10, policy=stricter)] == [B]
