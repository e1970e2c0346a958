"""[[forwards]] in the policy file and rules' remote_hosts: reading, errors, decisions."""

import math
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network

import pytest

from igd.decision import Allow, Deny, Reason
from igd.model import MappingKey, MapRequest, Mechanism, Protocol, RemoteFilter
from igd.policy import Policy, PolicyFileError

PORTAL = """
[[forwards]]
name = "customer portal"
protocols = ["tcp"]
external_ports = "443"
internal_address = "192.168.2.100"
internal_port = 8443
remote_hosts = ["198.51.100.0/24", "203.0.113.7"]
until = "2027-01-31T18:00:00Z"
owner = "ops@example.com"
purpose = "portal for customers"

[[forwards]]
name = "game"
protocols = ["tcp", "udp"]
external_ports = "27000-27002"
internal_address = "192.168.2.20"
internal_port = 37000
until = 2027-01-31T18:00:00+01:00
"""

UNTIL = datetime(2027, 1, 31, 18, tzinfo=UTC).timestamp()


def issues(text: str) -> list[str]:
    with pytest.raises(PolicyFileError) as caught:
        Policy.parse(text, "p.toml")
    return [str(issue) for issue in caught.value.issues]


def test_forwards_read_with_ranges_sources_and_until() -> None:
    policy = Policy.parse(PORTAL)
    portal, game = policy.forwards
    assert portal.name == "customer portal"
    assert portal.protocols == {Protocol.TCP}
    assert (portal.first_port, portal.last_port, portal.internal_port) == (443, 443, 8443)
    assert portal.internal_address == IPv4Address("192.168.2.100")
    assert portal.remote_hosts == (
        IPv4Network("198.51.100.0/24"),
        IPv4Network("203.0.113.7/32"),
    )
    assert portal.until == UNTIL
    assert (portal.owner, portal.purpose) == ("ops@example.com", "portal for customers")
    assert game.until == UNTIL - 3600  # a TOML date-time with its offset
    assert game.remote_hosts is None


def test_forward_mappings_map_ranges_one_to_one_and_expire_at_until() -> None:
    policy = Policy.parse(PORTAL)
    wall = UNTIL - 4000
    held = policy.forward_mappings(now=50.0, wall=wall)
    assert len(held) == 1 + 3 * 2
    portal = held[MappingKey(Protocol.TCP, 443)]
    assert portal.owner.mechanism is Mechanism.STATIC
    assert portal.is_static
    assert (portal.internal_address, portal.internal_port) == (IPv4Address("192.168.2.100"), 8443)
    assert portal.filters == (
        RemoteFilter(IPv4Network("198.51.100.0/24")),
        RemoteFilter(IPv4Network("203.0.113.7/32")),
    )
    assert portal.description == "customer portal"
    assert portal.expires == pytest.approx(4050.0)
    assert held[MappingKey(Protocol.UDP, 27002)].internal_port == 37002
    # The game ended an hour before the portal: at wall - 3600 + 1 only the portal is left.
    later = policy.forward_mappings(now=0.0, wall=UNTIL - 3599)
    assert list(later) == [MappingKey(Protocol.TCP, 443)]
    assert policy.forward_mappings(now=0.0, wall=UNTIL) == {}


def test_a_forward_without_until_never_expires_and_lists_as_permanent() -> None:
    policy = Policy.parse(
        '[[forwards]]\nname = "ssh"\nprotocols = ["tcp"]\nexternal_ports = "2222"\n'
        'internal_address = "192.168.2.5"\ninternal_port = 22\n'
    )
    (mapping,) = policy.forward_mappings(now=0.0, wall=0.0).values()
    assert mapping.expires == math.inf
    assert mapping.remaining(1e9) == 0  # UPnP's "permanent" lease


def test_a_passed_until_is_a_warning_not_an_error() -> None:
    policy = Policy.parse(PORTAL, "p.toml")
    assert policy.warnings(wall=UNTIL - 3601) == []
    assert [w.key for w in policy.warnings(wall=UNTIL - 10)] == ["forwards[1].until"]
    messages = [str(w) for w in policy.warnings(wall=UNTIL + 1)]
    assert messages == [
        "p.toml:9: forwards[0].until: warning: forward 'customer portal' ended at"
        " 2027-01-31T18:00:00Z; it is not installed",
        "p.toml:19: forwards[1].until: warning: forward 'game' ended at"
        " 2027-01-31T17:00:00Z; it is not installed",
    ]


def test_forward_errors_are_located_with_hints() -> None:
    found = issues(
        """
[[forwards]]
name = "a"
protocols = ["tcp"]
external_port = "80"
internal_address = "192.168.2.0/24"
remote_hosts = ["198.51.100.1/24"]
until = 2027-01-31T18:00:00

[[forwards]]
name = "b"
protocols = ["tcp", "sctp"]
external_ports = "60000-61100"
internal_address = "192.168.2.3"

[[forwards]]
name = "c"
protocols = ["udp"]
external_ports = "5351"
internal_address = "192.168.2.3"
internal_port = 65535
"""
    )
    assert found == [
        "p.toml:2: forwards[0].external_ports: required key is missing",
        "p.toml:5: forwards[0].external_port: unknown key 'external_port' in forwards[0]"
        " (did you mean 'external_ports'?)",
        "p.toml:6: forwards[0].internal_address: '192.168.2.0/24' is not an IPv4 address",
        "p.toml:7: forwards[0].remote_hosts: '198.51.100.1/24' has host bits set; write"
        " '198.51.100.0/24' for the network or '198.51.100.1/32' for the host",
        "p.toml:8: forwards[0].until: 2027-01-31T18:00:00 has no UTC offset; add Z or +HH:MM",
        "p.toml:12: forwards[1].protocols: unknown value 'sctp' (want one of: tcp, udp)",
        "p.toml:13: forwards[1].external_ports: 1101 ports; a forward holds at most 1024",
        "p.toml:19: forwards[2].external_ports: UDP 5350-5351 are the port-mapping"
        " service's own ports",
    ]


def test_overlapping_forwards_and_duplicate_names_are_errors() -> None:
    found = issues(
        """
[[forwards]]
name = "web"
protocols = ["tcp"]
external_ports = "8000-8010"
internal_address = "192.168.2.3"

[[forwards]]
name = "web"
protocols = ["udp"]
external_ports = "9000"
internal_address = "192.168.2.3"

[[forwards]]
name = "other"
protocols = ["udp", "tcp"]
external_ports = "8010"
internal_address = "192.168.2.4"
internal_port = 65535
"""
    )
    assert found == [
        "p.toml:9: forwards[1].name: duplicate forward name 'web' (first used on line 3)",
        "p.toml:17: forwards[2].external_ports: tcp port 8010 is already forwarded by 'web'"
        " (line 2)",
    ]


def test_internal_ports_may_not_run_past_65535() -> None:
    found = issues(
        '[[forwards]]\nname = "x"\nprotocols = ["tcp"]\nexternal_ports = "100-110"\n'
        'internal_address = "192.168.2.3"\ninternal_port = 65530\n'
    )
    assert found == [
        "p.toml:6: forwards[0].internal_port: internal ports 65530-65540 run past 65535"
        " (the external range maps 1:1 onto internal ports from internal_port)"
    ]


# -- rules' remote_hosts ---------------------------------------------------------------------

RESTRICTED = """
[[rules]]
name = "partners only"
action = "allow"
remote_hosts = ["198.51.100.0/24", "203.0.113.0/28"]
"""
CLIENT = IPv4Address("192.168.1.10")


def ask(**kw: object) -> MapRequest:
    fields: dict[str, object] = dict(
        mechanism=Mechanism.PCP,
        client=CLIENT,
        protocol=Protocol.TCP,
        internal_address=CLIENT,
        internal_port=8080,
        external_port=8080,
        lifetime=600,
    )
    fields.update(kw)
    return MapRequest(**fields)  # type: ignore[arg-type]


def evaluate(request: MapRequest) -> Allow | Deny:
    view = Policy.parse(RESTRICTED)
    return view.evaluate(request, _Empty(), now=0)


class _Empty:
    def __len__(self) -> int:
        return 0

    def count_for_client(self, client: IPv4Address) -> int:
        return 0


def rf(text: str, port: int = 0) -> RemoteFilter:
    return RemoteFilter(IPv4Network(text), port)


def test_a_request_without_filters_gets_the_rules_sources() -> None:
    decision = evaluate(ask())
    assert isinstance(decision, Allow)
    assert decision.filters == (rf("198.51.100.0/24"), rf("203.0.113.0/28"))
    assert (
        "remote sources limited to 198.51.100.0/24, 203.0.113.0/28 by rule 'partners only'"
        in decision.restrictions
    )


def test_pcp_filters_are_intersected_with_the_rules_sources() -> None:
    decision = evaluate(
        ask(filters=(rf("198.51.100.64/26", 443), rf("203.0.0.0/16"), rf("192.0.2.0/24")))
    )
    assert isinstance(decision, Allow)
    # The narrower prefix of each overlapping pair; the filter outside both is dropped.
    assert decision.filters == (rf("198.51.100.64/26", 443), rf("203.0.113.0/28"))


def test_filters_outside_the_rules_sources_are_refused() -> None:
    decision = evaluate(ask(filters=(rf("192.0.2.0/24"),)))
    assert isinstance(decision, Deny)
    assert decision.reason is Reason.POLICY_DENIED
    assert decision.rule == "partners only"
    assert "admit no source in remote_hosts" in decision.detail


def test_a_remote_host_must_lie_inside_the_rules_sources() -> None:
    inside = evaluate(ask(mechanism=Mechanism.UPNP, remote_host=IPv4Address("203.0.113.5")))
    assert isinstance(inside, Allow)
    assert inside.filters == ()
    outside = evaluate(ask(mechanism=Mechanism.UPNP, remote_host=IPv4Address("203.0.113.50")))
    assert isinstance(outside, Deny)
    assert outside.detail == (
        "remote host 203.0.113.50 is outside the rule's remote_hosts"
        " (198.51.100.0/24, 203.0.113.0/28)"
    )


def test_a_rule_without_remote_hosts_leaves_filters_as_asked() -> None:
    policy = Policy.parse('[defaults]\naction = "allow"\n')
    decision = policy.evaluate(ask(filters=(rf("192.0.2.0/24"),)), _Empty(), now=0)
    assert isinstance(decision, Allow)
    assert decision.filters is None


def test_recheck_refuses_mappings_admitting_sources_the_rule_no_longer_allows() -> None:
    from igd.gateway import Gateway, Granted

    loose = Policy.parse('[[rules]]\nname = "partners only"\naction = "allow"\n')
    gateway = Gateway(loose)
    result = gateway.map(ask(), now=0)
    assert isinstance(result, Granted)
    assert result.mapping.filters == ()
    change = gateway.reload(Policy.parse(RESTRICTED), now=1, wall=0)
    assert change.removed == (result.mapping,)
    # Granted under the restriction, it survives a reload of the same rule.
    again = gateway.map(ask(), now=2)
    assert isinstance(again, Granted)
    assert again.mapping.filters == (rf("198.51.100.0/24"), rf("203.0.113.0/28"))
    assert not gateway.reload(Policy.parse(RESTRICTED), now=3, wall=0)
