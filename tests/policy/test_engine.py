"""Policy evaluation: rule matching, first-match order, ports, third party, quotas, leases."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igd.decision import Allow, Deny, Reason
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Owner, Protocol
from igd.policy import EMPTY_VIEW, Policy, TableView
from igd.ports import PortSet
from igd.table import MappingTable

POLICIES = Path(__file__).resolve().parents[2] / "policies"
HOST = IPv4Address("192.168.1.20")
OTHER = IPv4Address("192.168.1.30")


def request(**changes: object) -> MapRequest:
    base = MapRequest(
        mechanism=Mechanism.NATPMP,
        client=HOST,
        protocol=Protocol.TCP,
        internal_address=HOST,
        internal_port=8080,
        external_port=8080,
        lifetime=3600,
    )
    return replace(base, **changes)


def decide(
    policy: Policy, req: MapRequest, view: TableView = EMPTY_VIEW, *, renewal: bool = False
) -> Allow | Deny:
    return policy.evaluate(req, view, now=100.0, renewal=renewal)


def allowed(decision: Allow | Deny) -> Allow:
    assert isinstance(decision, Allow), decision
    return decision


def denied(decision: Allow | Deny) -> Deny:
    assert isinstance(decision, Deny), decision
    return decision


def policy(rules: str, defaults: str = 'action = "deny"') -> Policy:
    return Policy.parse(f"[defaults]\n{defaults}\n{rules}")


LAN_ALLOW = """
[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]
"""


# -- matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("criterion", "matching", "other"),
    [
        ('clients = ["192.168.1.16/28"]', {}, {"client": IPv4Address("192.168.1.40")}),
        ('clients = ["192.168.1.20"]', {}, {"client": OTHER, "internal_address": OTHER}),
        ('protocols = ["udp"]', {"protocol": Protocol.UDP}, {}),
        ('via = ["pcp", "upnp"]', {"mechanism": Mechanism.PCP}, {}),
        ('internal_ports = "8000-8999"', {}, {"internal_port": 9000}),
        ("internal_ports = 8080", {}, {"internal_port": 8081}),
        ('description = "game"', {"description": "my game server"}, {"description": "web"}),
        ('description = "^web$"', {"description": "web"}, {"description": "web server"}),
        (
            'internal_addresses = ["192.168.1.30"]\nallow_third_party = true',
            {"internal_address": OTHER},
            {},
        ),
    ],
)
def test_each_criterion_narrows_which_requests_a_rule_decides(
    criterion: str, matching: dict[str, object], other: dict[str, object]
) -> None:
    p = policy(f'[[rules]]\nname = "r"\naction = "allow"\n{criterion}\n')
    assert allowed(decide(p, request(**matching))).rule == "r"
    refused = denied(decide(p, request(**other)))
    assert (refused.reason, refused.rule) == (Reason.POLICY_DENIED, "defaults")


def test_description_regex_sees_the_empty_description_of_natpmp() -> None:
    p = policy('[[rules]]\nname = "named"\naction = "allow"\ndescription = "."\n')
    assert denied(decide(p, request(description=""))).rule == "defaults"
    printable = policy('[[rules]]\nname = "p"\naction = "allow"\ndescription = "^[ -~]*$"\n')
    assert allowed(decide(printable, request(description=""))).rule == "p"
    assert denied(decide(printable, request(description="evil\x1b[2J"))).rule == "defaults"


def test_first_matching_rule_decides() -> None:
    deny_first = policy(
        '[[rules]]\nname = "block host"\naction = "deny"\nclients = ["192.168.1.20"]\n' + LAN_ALLOW
    )
    allow_first = policy(
        LAN_ALLOW + '[[rules]]\nname = "block host"\naction = "deny"\nclients = ["192.168.1.20"]\n'
    )
    assert denied(decide(deny_first, request())).rule == "block host"
    assert allowed(decide(allow_first, request())).rule == "lan"
    neighbour = request(client=OTHER, internal_address=OTHER)
    assert allowed(decide(deny_first, neighbour)).rule == "lan"


def test_default_action_applies_when_no_rule_matches() -> None:
    refused = denied(decide(policy(""), request()))
    assert (refused.reason, refused.rule) == (Reason.POLICY_DENIED, "defaults")
    assert "no rule matches" in refused.detail
    granted = allowed(decide(policy("", 'action = "allow"'), request()))
    assert granted.rule == "defaults"
    assert granted.external_ports == PortSet.full()
    assert granted.restrictions == ()


def test_an_empty_policy_denies_everything() -> None:
    empty = Policy.parse("")
    assert empty.rules == ()
    assert denied(decide(empty, request())).rule == "defaults"


# -- external ports ----------------------------------------------------------------------------

PRIVILEGED = """
[[rules]]
name = "privileged"
action = "deny"
external_ports = "0-1023"
"""


def test_deny_rule_on_external_ports_narrows_a_request_the_gateway_may_move() -> None:
    p = policy(PRIVILEGED + LAN_ALLOW)
    granted = allowed(decide(p, request(external_port=80)))
    assert granted.rule == "lan"
    assert granted.external_ports == PortSet.parse("1024-65535")
    assert 80 not in granted.external_ports
    assert any("deny rule 'privileged'" in note for note in granted.restrictions)
    assert any("suggested external port 80" in note for note in granted.restrictions)


def test_deny_rule_on_external_ports_refuses_an_exact_port_inside_them() -> None:
    p = policy(PRIVILEGED + LAN_ALLOW)
    refused = denied(decide(p, request(external_port=80, exact_port=True)))
    assert (refused.reason, refused.rule) == (Reason.POLICY_DENIED, "privileged")
    assert "80" in refused.detail
    assert allowed(decide(p, request(external_port=8080, exact_port=True))).rule == "lan"


def test_renewal_counts_as_an_exact_port() -> None:
    p = policy(PRIVILEGED + LAN_ALLOW)
    assert denied(decide(p, request(external_port=80), renewal=True)).rule == "privileged"


def test_deny_rule_without_external_ports_refuses_even_a_movable_request() -> None:
    p = policy(
        '[[rules]]\nname = "no telnet"\naction = "deny"\ninternal_ports = "23"\n' + LAN_ALLOW
    )
    refused = denied(decide(p, request(internal_port=23, external_port=0)))
    assert refused.rule == "no telnet"


def test_narrowing_deny_rules_accumulate_and_can_leave_nothing() -> None:
    low = '[[rules]]\nname = "low"\naction = "deny"\nexternal_ports = "1-2000"\n'
    high = '[[rules]]\nname = "high"\naction = "deny"\nexternal_ports = "3000-65535"\n'
    narrowed = allowed(decide(policy(low + high + LAN_ALLOW), request()))
    assert narrowed.external_ports == PortSet.parse("2001-2999")
    everything = '[[rules]]\nname = "rest"\naction = "deny"\nexternal_ports = "2001-2999"\n'
    refused = denied(decide(policy(low + high + everything + LAN_ALLOW), request()))
    assert (refused.reason, refused.rule) == (Reason.POLICY_DENIED, "lan")
    assert "no external port" in refused.detail


def test_narrowing_deny_rule_only_counts_when_it_matches_the_request() -> None:
    udp_only = (
        '[[rules]]\nname = "udp low"\naction = "deny"\nprotocols = ["udp"]\n'
        'external_ports = "1-1023"\n'
    )
    p = policy(udp_only + LAN_ALLOW)
    assert allowed(decide(p, request(protocol=Protocol.TCP))).external_ports == PortSet.full()
    assert 80 not in allowed(decide(p, request(protocol=Protocol.UDP))).external_ports


def test_allow_rule_external_ports_bound_what_the_gateway_assigns() -> None:
    p = policy(LAN_ALLOW + 'external_ports = "20000-20099"\n')
    moved = allowed(decide(p, request(external_port=8080)))
    assert moved.external_ports == PortSet.parse("20000-20099")
    assert "external ports limited to 20000-20099 by rule 'lan'" in moved.restrictions
    refused = denied(decide(p, request(external_port=8080, exact_port=True)))
    assert refused.rule == "lan"
    assert "outside the allowed ports 20000-20099" in refused.detail
    assert allowed(decide(p, request(external_port=20050, exact_port=True))).rule == "lan"


def test_external_port_zero_is_never_assignable() -> None:
    p = policy(LAN_ALLOW + 'external_ports = "0-10"\n')
    assert allowed(decide(p, request(external_port=0))).external_ports == PortSet.parse("1-10")


# -- third party -----------------------------------------------------------------------------


def test_secure_mode_refuses_mapping_to_another_address() -> None:
    refused = denied(decide(policy(LAN_ALLOW), request(internal_address=OTHER)))
    assert (refused.reason, refused.rule) == (Reason.THIRD_PARTY_DENIED, "lan")
    assert "192.168.1.30" in refused.detail


def test_allow_third_party_on_the_rule_permits_it() -> None:
    p = policy(LAN_ALLOW + "allow_third_party = true\n")
    assert allowed(decide(p, request(internal_address=OTHER))).rule == "lan"


def test_secure_mode_off_permits_third_party_everywhere() -> None:
    p = policy(LAN_ALLOW, 'action = "allow"\nsecure_mode = false')
    assert allowed(decide(p, request(internal_address=OTHER))).rule == "lan"
    outsider = request(client=IPv4Address("10.0.0.5"), internal_address=OTHER)
    assert allowed(decide(p, outsider)).rule == "defaults"


def test_default_allow_still_honours_secure_mode() -> None:
    p = policy("", 'action = "allow"')
    refused = denied(decide(p, request(internal_address=OTHER)))
    assert (refused.reason, refused.rule) == (Reason.THIRD_PARTY_DENIED, "defaults")


def test_deny_rule_decides_before_third_party_is_considered() -> None:
    p = policy(
        '[[rules]]\nname = "no smb"\naction = "deny"\ninternal_ports = "445"\n'
        + LAN_ALLOW
        + "allow_third_party = true\n"
    )
    refused = denied(decide(p, request(internal_address=OTHER, internal_port=445)))
    assert (refused.reason, refused.rule) == (Reason.POLICY_DENIED, "no smb")


# -- quotas ----------------------------------------------------------------------------------


def held(table: MappingTable, client: IPv4Address, count: int, first_port: int = 10000) -> None:
    for port in range(first_port, first_port + count):
        table.put(
            Mapping(
                key=MappingKey(Protocol.TCP, port),
                internal_address=client,
                internal_port=port,
                owner=Owner(Mechanism.NATPMP, client),
                created=0.0,
                expires=1000.0,
            )
        )


def test_client_quota_counts_the_requesters_mappings() -> None:
    p = policy(LAN_ALLOW, 'action = "deny"\nmax_mappings_per_client = 3')
    table = MappingTable()
    held(table, HOST, 2)
    held(table, OTHER, 5, first_port=20000)
    assert allowed(decide(p, request(), table)).rule == "lan"
    held(table, HOST, 1, first_port=30000)
    refused = denied(decide(p, request(), table))
    assert (refused.reason, refused.rule) == (Reason.CLIENT_QUOTA, "defaults")
    assert "holds 3 mappings (limit 3)" in refused.detail


def test_rule_can_override_the_client_quota() -> None:
    p = policy(LAN_ALLOW + "max_mappings_per_client = 5\n", "max_mappings_per_client = 2")
    table = MappingTable()
    held(table, HOST, 4)
    assert allowed(decide(p, request(), table)).rule == "lan"
    held(table, HOST, 1, first_port=30000)
    refused = denied(decide(p, request(), table))
    assert (refused.reason, refused.rule) == (Reason.CLIENT_QUOTA, "lan")


def test_gateway_quota_counts_every_mapping() -> None:
    p = policy(LAN_ALLOW, "max_mappings = 4")
    table = MappingTable()
    held(table, OTHER, 4)
    refused = denied(decide(p, request(), table))
    assert (refused.reason, refused.rule) == (Reason.GATEWAY_QUOTA, "defaults")


def test_renewals_are_exempt_from_quotas() -> None:
    p = policy(LAN_ALLOW, "max_mappings_per_client = 1\nmax_mappings = 1")
    table = MappingTable()
    held(table, HOST, 1, first_port=8080)
    assert isinstance(decide(p, request(), table), Deny)
    assert allowed(decide(p, request(), table, renewal=True)).rule == "lan"


# -- leases ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "rule_max", "granted", "note"),
    [
        (3600, None, 3600, None),
        (100000, None, 86400, "lease shortened from 100000 s to 86400 s (defaults.max_lease)"),
        (3600, "max_lease = 600", 600, "lease shortened from 3600 s to 600 s (max_lease of rule"),
        (300, "max_lease = 600", 300, None),
        (30, None, 120, "lease lengthened from 30 s to 120 s (defaults.min_lease)"),
        (1, "max_lease = 600", 120, "lease lengthened from 1 s to 120 s"),
    ],
)
def test_lease_is_clamped_and_the_change_noted(
    requested: int, rule_max: str | None, granted: int, note: str | None
) -> None:
    p = policy(LAN_ALLOW + (rule_max or "") + "\n", "max_lease = 86400\nmin_lease = 120")
    decision = allowed(decide(p, request(lifetime=requested)))
    assert decision.lifetime == granted
    lease_notes = [n for n in decision.restrictions if n.startswith("lease")]
    if note is None:
        assert lease_notes == []
    else:
        assert len(lease_notes) == 1 and lease_notes[0].startswith(note)


def test_unvalidated_policy_never_grants_more_than_the_maximum_lease() -> None:
    # A Policy built in code skips file validation; the clamp still holds.
    p = Policy.parse(LAN_ALLOW)
    odd = replace(p, defaults=replace(p.defaults, min_lease=500, max_lease=300))
    assert allowed(decide(odd, request(lifetime=10))).lifetime == 300


# -- recheck ---------------------------------------------------------------------------------


def mapping(port: int = 8080, internal: IPv4Address = HOST, expires: float = 400.0) -> Mapping:
    return Mapping(
        key=MappingKey(Protocol.TCP, port),
        internal_address=internal,
        internal_port=8080,
        owner=Owner(Mechanism.UPNP, HOST),
        created=0.0,
        expires=expires,
        description="web",
    )


def test_recheck_keeps_what_the_new_policy_allows() -> None:
    assert policy(LAN_ALLOW).recheck(mapping(), now=100.0) is None


def test_recheck_reports_mappings_the_new_policy_refuses() -> None:
    stricter = policy(PRIVILEGED + LAN_ALLOW + 'via = ["pcp"]\n')
    refused = stricter.recheck(mapping(), now=100.0)
    assert refused is not None and refused.rule == "defaults"
    narrowed = policy(PRIVILEGED + LAN_ALLOW)
    on_80 = narrowed.recheck(mapping(port=80), now=100.0)
    assert on_80 is not None and on_80.rule == "privileged"
    assert narrowed.recheck(mapping(port=8080), now=100.0) is None


def test_recheck_applies_secure_mode_but_not_quotas() -> None:
    p = policy(LAN_ALLOW, "max_mappings_per_client = 0\nmax_mappings = 0")
    assert p.recheck(mapping(), now=100.0) is None
    third = p.recheck(mapping(internal=OTHER), now=100.0)
    assert third is not None and third.reason is Reason.THIRD_PARTY_DENIED


def test_recheck_of_a_mapping_about_to_expire_still_evaluates() -> None:
    assert policy(LAN_ALLOW).recheck(mapping(expires=100.2), now=100.0) is None


# -- the policies shipped in policies/ -------------------------------------------------------


def verdict(p: Policy, req: MapRequest, view: TableView = EMPTY_VIEW) -> tuple[str, str]:
    """("allow" or the refusal reason, deciding rule)."""
    decision = decide(p, req, view)
    return ("allow" if isinstance(decision, Allow) else str(decision.reason), decision.rule)


def test_home_policy() -> None:
    home = Policy.load(POLICIES / "home.toml")
    lan = IPv4Address("10.1.2.3")
    suggests_80 = request(client=lan, internal_address=lan, external_port=80)
    assert verdict(home, suggests_80) == ("allow", "LAN high ports to self")
    assert allowed(decide(home, suggests_80)).external_ports == PortSet.parse("1024-65535")
    insists_80 = request(mechanism=Mechanism.UPNP, external_port=80, exact_port=True)
    assert verdict(home, insists_80) == ("policy-denied", "privileged external ports")
    for port in (21, 23, 135, 137, 139, 445, 3389):
        assert verdict(home, request(internal_port=port)) == ("policy-denied", "dangerous services")
    assert verdict(home, request(internal_port=80)) == ("policy-denied", "defaults")
    cgnat = IPv4Address("100.64.0.9")
    assert verdict(home, request(client=cgnat, internal_address=cgnat))[1] == "defaults"
    assert verdict(home, request(internal_address=OTHER))[0] == "third-party-denied"
    assert verdict(home, request(description="x\x07")) == ("policy-denied", "defaults")
    assert allowed(decide(home, request(description="Plex Media Server"))).lifetime == 3600


def test_office_policy() -> None:
    office = Policy.load(POLICIES / "office.toml")
    build = IPv4Address("10.20.0.15")
    webhook = request(client=build, internal_address=build, lifetime=86400)
    webhook = replace(webhook, mechanism=Mechanism.UPNP, exact_port=True)
    granted = allowed(decide(office, webhook))
    assert (granted.rule, granted.lifetime) == ("build server webhooks", 3600)
    moved = replace(webhook, external_port=8081)
    assert verdict(office, moved) == ("policy-denied", "build server webhooks")
    natpmp = replace(webhook, mechanism=Mechanism.NATPMP)
    assert verdict(office, natpmp) == ("policy-denied", "defaults")

    phone = IPv4Address("10.20.30.7")
    rtp = request(client=phone, internal_address=phone, internal_port=10002, external_port=0)
    call = allowed(decide(office, replace(rtp, protocol=Protocol.UDP, lifetime=7200)))
    assert (call.rule, call.lifetime) == ("VoIP phones", 1800)
    assert call.external_ports == PortSet.parse("5060,10000-20000")

    facilities, recorder = IPv4Address("10.20.0.40"), IPv4Address("10.20.0.50")
    cctv = request(client=facilities, internal_address=recorder, internal_port=443)
    cctv = replace(cctv, external_port=8443, exact_port=True, mechanism=Mechanism.UPNP)
    assert verdict(office, replace(cctv, description="CCTV lobby")) == ("allow", "CCTV recorder")
    assert verdict(office, replace(cctv, description="lobby")) == ("policy-denied", "defaults")

    guest = IPv4Address("10.20.99.4")
    guest_request = request(client=guest, internal_address=guest)
    assert verdict(office, guest_request) == ("policy-denied", "guest network")

    portal, erp = office.forwards
    assert (portal.first_port, str(portal.internal_address), portal.internal_port) == (
        443,
        "10.20.0.60",
        8443,
    )
    assert erp.until is not None
    # Before its end both are installed; after it only the portal.
    assert len(office.forward_mappings(now=0, wall=erp.until - 1)) == 2
    assert len(office.forward_mappings(now=0, wall=erp.until)) == 1


def test_lab_policy() -> None:
    lab = Policy.load(POLICIES / "lab.toml")
    host = IPv4Address("192.168.77.10")
    base = request(client=host, internal_address=host, lifetime=3)
    short = allowed(decide(lab, base))
    assert (short.rule, short.lifetime) == ("lab LAN to self", 3)
    assert allowed(decide(lab, replace(base, lifetime=1))).lifetime == 2
    assert verdict(lab, replace(base, internal_port=23)) == ("policy-denied", "no telnet")
    table = MappingTable()
    held(table, host, 16)
    assert verdict(lab, base, table) == ("client-quota", "defaults")
    exact_80 = replace(base, external_port=80, exact_port=True)
    assert verdict(lab, exact_80) == ("policy-denied", "lab LAN to self")
    assert 80 not in allowed(decide(lab, replace(base, external_port=80))).external_ports


# -- properties ------------------------------------------------------------------------------

HOME = Policy.load(POLICIES / "home.toml")
LAB = Policy.load(POLICIES / "lab.toml")

requests = st.builds(
    MapRequest,
    mechanism=st.sampled_from(Mechanism),
    client=st.sampled_from([HOST, IPv4Address("192.168.77.10"), IPv4Address("10.9.8.7")]),
    protocol=st.sampled_from(Protocol),
    internal_address=st.sampled_from([HOST, IPv4Address("192.168.77.10"), OTHER]),
    internal_port=st.integers(1, 65535),
    external_port=st.integers(0, 65535),
    lifetime=st.integers(1, 2**32 - 1),
    exact_port=st.booleans(),
)


@given(st.sampled_from([HOME, LAB]), requests, st.booleans())
def test_every_allow_respects_lease_bounds_and_ports(
    p: Policy, req: MapRequest, renewal: bool
) -> None:
    decision = decide(p, req, renewal=renewal)
    if isinstance(decision, Allow):
        assert p.defaults.min_lease <= decision.lifetime <= p.defaults.max_lease
        assert decision.lifetime <= max(req.lifetime, p.defaults.min_lease)
        assert 0 not in decision.external_ports and decision.external_ports
        if req.exact_port or renewal:
            assert req.external_port in decision.external_ports
        assert req.internal_address == req.client or not p.defaults.secure_mode


@given(requests)
def test_a_renewal_is_never_refused_for_quota(req: MapRequest) -> None:
    class Full:
        def __len__(self) -> int:
            return 10**6

        def count_for_client(self, client: IPv4Address) -> int:
            return 10**6

    decision = decide(HOME, req, Full(), renewal=True)
    assert not isinstance(decision, Deny) or decision.reason not in (
        Reason.CLIENT_QUOTA,
        Reason.GATEWAY_QUOTA,
    )


def test_a_refused_exact_port_says_whether_another_port_would_do() -> None:
    carved = policy(
        '[[rules]]\nname = "no low ports"\naction = "deny"\nexternal_ports = "1-1023"\n' + LAN_ALLOW
    )
    low = denied(decide(carved, request(external_port=80, exact_port=True)))
    assert (low.rule, low.other_port_allowed) == ("no low ports", True)
    # Without exact_port the same deny rule narrows the choice instead of refusing.
    assert 80 not in allowed(decide(carved, request(external_port=80))).external_ports
    ranged = policy(LAN_ALLOW + 'external_ports = "2000-3000"\n')
    outside = denied(decide(ranged, request(external_port=80, exact_port=True)))
    assert (outside.rule, outside.other_port_allowed) == ("lan", True)
    # Refused for more than the port: another port would not help.
    full = denied(decide(carved, request(external_port=80, exact_port=True), view(10**6)))
    assert full.reason is Reason.POLICY_DENIED and not full.other_port_allowed
    nobody = policy('[[rules]]\nname = "no low"\naction = "deny"\nexternal_ports = "1-1023"\n')
    assert not denied(decide(nobody, request(external_port=80, exact_port=True))).other_port_allowed


def view(held: int) -> TableView:
    class Full:
        def __len__(self) -> int:
            return held

        def count_for_client(self, client: IPv4Address) -> int:
            return held

    return Full()


def test_may_manage_is_the_third_party_grant() -> None:
    grant = policy(
        '[[rules]]\nname = "admin"\naction = "allow"\nclients = ["192.168.1.2/32"]\n'
        'via = ["upnp"]\nallow_third_party = true\n' + LAN_ALLOW,
        'action = "deny"\nmax_mappings_per_client = 1',
    )
    admin = IPv4Address("192.168.1.2")
    assert grant.may_manage(admin, Mechanism.UPNP)
    assert not grant.may_manage(admin, Mechanism.PCP)  # the rule is for UPnP only
    assert not grant.may_manage(HOST, Mechanism.UPNP)
    assert policy(LAN_ALLOW, 'action = "deny"\nsecure_mode = false').may_manage(
        HOST, Mechanism.UPNP
    )
