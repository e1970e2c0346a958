"""Several external addresses: each mapping sits on one, and ports are per address."""

import random
from ipaddress import IPv4Address

import pytest

from igd.decision import Reason
from igd.gateway import Gateway, Granted, Refused
from igd.model import DEFAULT_ADDRESS, MappingKey, MapRequest, Mechanism, Protocol
from igd.policy import Policy, PolicyFileError
from igd.table import MappingTable

A = IPv4Address("192.168.1.10")
B = IPv4Address("192.168.1.11")
SECOND = IPv4Address("203.0.113.9")
THIRD = IPv4Address("203.0.113.10")

POLICY = """
[defaults]
action = "deny"

[[rules]]
name = "servers"
action = "allow"
clients = ["192.168.1.11/32"]
external_addresses = ["203.0.113.9", "default"]

[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]

[[forwards]]
name = "web on the default"
protocols = ["tcp"]
external_ports = "443"
internal_address = "192.168.1.20"

[[forwards]]
name = "web on the second"
protocols = ["tcp"]
external_ports = "443"
internal_address = "192.168.1.21"
external_address = "203.0.113.9"
"""


@pytest.fixture
def gateway() -> Gateway:
    return Gateway(Policy.parse(POLICY), rng=random.Random(1))


def ask(client: IPv4Address, external: int = 8080, **kw: object) -> MapRequest:
    fields: dict[str, object] = dict(
        mechanism=Mechanism.PCP,
        client=client,
        protocol=Protocol.TCP,
        internal_address=client,
        internal_port=8080,
        external_port=external,
        lifetime=600,
        nonce=bytes(12),
    )
    fields.update(kw)
    return MapRequest(**fields)  # type: ignore[arg-type]


def granted(result: object) -> Granted:
    assert isinstance(result, Granted), result
    return result


def test_one_port_on_two_addresses_reaches_two_hosts(gateway: Gateway) -> None:
    change = gateway.sync_forwards(None, now=0, wall=0)
    keys = {m.key: m.internal_address for m in change.added}
    assert keys == {
        MappingKey(Protocol.TCP, 443): IPv4Address("192.168.1.20"),
        MappingKey(Protocol.TCP, 443, None, SECOND): IPv4Address("192.168.1.21"),
    }


def test_rule_first_address_is_used_and_ports_are_per_address(gateway: Gateway) -> None:
    on_default = granted(gateway.map(ask(A), now=0)).mapping
    on_second = granted(gateway.map(ask(B), now=0)).mapping
    assert on_default.external_address is None
    assert on_second.external_address == SECOND
    # The same port on both: different addresses do not conflict.
    assert on_default.external_port == on_second.external_port == 8080
    assert gateway.table.used_ports(Protocol.TCP, SECOND) == 1 << 8080
    assert gateway.table.used_ports(Protocol.TCP) == 1 << 8080


def test_suggested_address_is_honoured_when_the_rule_allows_it(gateway: Gateway) -> None:
    mapping = granted(gateway.map(ask(B, external_address=DEFAULT_ADDRESS), now=0)).mapping
    assert mapping.external_address is None
    # Renewing keeps the mapping where it is, whatever the rule lists first.
    again = granted(gateway.map(ask(B, external_address=DEFAULT_ADDRESS), now=1))
    assert again.renewal and again.mapping.key == mapping.key


def test_other_address_is_redirected_or_refused_with_prefer_failure(gateway: Gateway) -> None:
    redirected = granted(gateway.map(ask(A, external_address=SECOND), now=0)).mapping
    assert redirected.external_address is None
    refused = gateway.map(ask(A, 9090, external_address=THIRD, exact_port=True), now=0)
    assert isinstance(refused, Refused)
    assert refused.deny.reason is Reason.POLICY_DENIED and refused.deny.other_port_allowed
    assert "203.0.113.10" in refused.deny.detail
    assert len(gateway.table) == 1


def test_exact_port_conflicts_only_on_its_own_address(gateway: Gateway) -> None:
    gateway.sync_forwards(None, now=0, wall=0)
    # 443 on the second address is the forward's; on the default it is the other forward's.
    refused = gateway.map(ask(B, 443, exact_port=True), now=0)
    assert isinstance(refused, Refused) and refused.deny.reason is Reason.PORT_IN_USE
    moved = granted(gateway.map(ask(B, 443), now=0)).mapping
    assert moved.external_address == SECOND and moved.external_port != 443


def test_policy_reload_removes_mappings_on_an_address_no_longer_allowed(
    gateway: Gateway,
) -> None:
    granted(gateway.map(ask(B), now=0))
    narrowed = Policy.parse(POLICY.replace('"203.0.113.9", "default"', '"default"'))
    change = gateway.reload(narrowed, now=1, wall=1)
    assert [m.external_address for m in change.removed] == [SECOND]


def test_policy_names_its_addresses_and_refuses_a_clash_on_one() -> None:
    policy = Policy.parse(POLICY)
    assert policy.address_issues([SECOND]) == []
    issues = policy.address_issues([THIRD])
    assert [i.key for i in issues] == [
        "rules[0].external_addresses",
        "forwards[1].external_address",
    ]
    assert all("203.0.113.9 is not one of network.external_addresses" in i.message for i in issues)
    clash = POLICY.replace('external_address = "203.0.113.9"\n', "")
    with pytest.raises(PolicyFileError, match="already forwarded"):
        Policy.parse(clash)
    with pytest.raises(PolicyFileError, match="external_addresses"):
        Policy.parse(POLICY.replace('"203.0.113.9", "default"', '"example"'))


def test_bitmaps_are_dropped_with_the_last_mapping_of_an_address() -> None:
    table = MappingTable()
    gateway = Gateway(Policy.parse(POLICY), table=table, rng=random.Random(1))
    mapping = granted(gateway.map(ask(B), now=0)).mapping
    table.remove(mapping.key)
    assert table.used_ports(Protocol.TCP, SECOND) == 0
    assert not table.port_in_use(Protocol.TCP, 8080, SECOND)


def test_natpmp_and_upnp_stay_on_the_default_address(gateway: Gateway) -> None:
    # The rule lists the second address first, and "default": these protocols get the default.
    for mechanism in (Mechanism.NATPMP, Mechanism.UPNP):
        result = gateway.map(ask(B, 7000, mechanism=mechanism, nonce=None), now=0)
        assert granted(result).mapping.external_address is None
    only_second = Gateway(Policy.parse(POLICY.replace(', "default"]', "]")))
    refused = only_second.map(ask(B, mechanism=Mechanism.NATPMP, nonce=None), now=0)
    assert isinstance(refused, Refused)
    assert "can report only the default external address" in refused.deny.detail
