"""The gateway core: conflicts, renewals, port choice, quotas and reloads across mechanisms."""

import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from igd.decision import Reason
from igd.gateway import Gateway, Granted, Refused
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Owner, Protocol
from igd.policy import Policy

A = IPv4Address("192.168.1.10")
B = IPv4Address("192.168.1.11")

POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 60
max_mappings_per_client = 3
max_mappings = 5

[[rules]]
name = "no telnet"
action = "deny"
internal_ports = "23"

[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]
external_ports = "1024-65535"
"""


@pytest.fixture
def gateway() -> Gateway:
    return Gateway(Policy.parse(POLICY), rng=random.Random(1))


def request(
    client: IPv4Address = A,
    port: int = 8080,
    external: int = 8080,
    mechanism: Mechanism = Mechanism.NATPMP,
    **kw: object,
) -> MapRequest:
    fields: dict[str, object] = dict(
        mechanism=mechanism,
        client=client,
        protocol=Protocol.TCP,
        internal_address=client,
        internal_port=port,
        external_port=external,
        lifetime=600,
    )
    fields.update(kw)
    return MapRequest(**fields)  # type: ignore[arg-type]


def granted(result: object) -> Granted:
    assert isinstance(result, Granted), result
    return result


def refused(result: object) -> Refused:
    assert isinstance(result, Refused), result
    return result


def test_grant_honours_free_suggestion(gateway: Gateway) -> None:
    result = granted(gateway.map(request(), now=0))
    assert result.mapping.external_port == 8080
    assert result.mapping.expires == 600
    assert result.change.added == (result.mapping,) and result.change.removed == ()


def test_same_client_renewal_refreshes_and_keeps_port(gateway: Gateway) -> None:
    first = granted(gateway.map(request(external=0), now=0))
    again = granted(gateway.map(request(external=9999), now=100))
    assert again.renewal
    assert again.mapping.external_port == first.mapping.external_port
    assert again.mapping.expires == 700 and again.mapping.created == 0
    assert again.change.removed == (first.mapping,)
    assert len(gateway.table) == 1


def test_other_client_gets_another_port_where_protocol_allows(gateway: Gateway) -> None:
    granted(gateway.map(request(), now=0))
    other = granted(gateway.map(request(client=B), now=0))
    assert other.mapping.external_port not in (8080, 0)
    assert other.mapping.external_port >= 1024


def test_exact_port_conflict_is_an_error(gateway: Gateway) -> None:
    granted(gateway.map(request(mechanism=Mechanism.PCP), now=0))
    result = refused(
        gateway.map(request(client=B, mechanism=Mechanism.UPNP, exact_port=True), now=0)
    )
    assert result.deny.reason is Reason.PORT_IN_USE
    assert result.existing is not None and result.existing.owner.client == A
    assert len(gateway.table) == 1


def test_companion_port_stays_with_its_client(gateway: Gateway) -> None:
    granted(gateway.map(request(), now=0))
    udp_other = granted(gateway.map(request(client=B, protocol=Protocol.UDP), now=0))
    assert udp_other.mapping.external_port != 8080
    udp_own = granted(gateway.map(request(protocol=Protocol.UDP), now=0))
    assert udp_own.mapping.external_port == 8080


def test_gateway_chosen_port_never_reserved_or_privileged(gateway: Gateway) -> None:
    result = granted(gateway.map(request(port=5351, external=5351, protocol=Protocol.UDP), now=0))
    assert result.mapping.external_port not in (5350, 5351)
    low = granted(gateway.map(request(port=2000, external=80), now=0))
    assert low.mapping.external_port == 2000  # falls back to the internal port


def test_exact_reserved_port_is_refused() -> None:
    gateway = Gateway(Policy.parse('[defaults]\naction = "allow"\n'))
    result = refused(
        gateway.map(request(protocol=Protocol.UDP, external=5351, exact_port=True), now=0)
    )
    assert result.deny.reason is Reason.RESERVED_PORT


def test_policy_denial_changes_nothing(gateway: Gateway) -> None:
    result = refused(gateway.map(request(port=23), now=0))
    assert result.deny.reason is Reason.POLICY_DENIED and result.deny.rule == "no telnet"
    assert len(gateway.table) == 0


def test_client_quota_then_renewals_still_work(gateway: Gateway) -> None:
    for port in (2001, 2002, 2003):
        granted(gateway.map(request(port=port, external=port), now=0))
    assert refused(gateway.map(request(port=2004), now=0)).deny.reason is Reason.CLIENT_QUOTA
    assert granted(gateway.map(request(port=2001, external=2001), now=10)).renewal


def test_gateway_quota(gateway: Gateway) -> None:
    for client_byte, port in [(10, 1), (10, 2), (10, 3), (11, 4), (11, 5)]:
        client = IPv4Address(f"192.168.1.{client_byte}")
        granted(gateway.map(request(client=client, port=3000 + port), now=0))
    result = refused(gateway.map(request(client=IPv4Address("192.168.1.12"), port=4000), now=0))
    assert result.deny.reason is Reason.GATEWAY_QUOTA


def test_pcp_nonce_mismatch_is_not_owner(gateway: Gateway) -> None:
    granted(gateway.map(request(mechanism=Mechanism.PCP, nonce=b"a" * 12), now=0))
    result = refused(gateway.map(request(mechanism=Mechanism.PCP, nonce=b"b" * 12), now=5))
    assert result.deny.reason is Reason.NOT_OWNER
    assert result.existing is not None and result.existing.remaining(5) == 595


def test_no_free_port_when_range_exhausted() -> None:
    policy = Policy.parse(
        '[defaults]\naction = "allow"\n[[rules]]\nname = "tiny"\naction = "allow"\n'
        'external_ports = "4000-4001"\n'
    )
    gateway = Gateway(policy)
    granted(gateway.map(request(port=1, external=0), now=0))
    granted(gateway.map(request(port=2, external=0), now=0))
    assert refused(gateway.map(request(port=3, external=0), now=0)).deny.reason is (
        Reason.NO_FREE_PORT
    )


def test_rollback_restores_exactly(gateway: Gateway) -> None:
    first = granted(gateway.map(request(), now=0))
    renewal = granted(gateway.map(request(), now=50))
    gateway.rollback(renewal.change)
    assert gateway.table.get(first.mapping.key) == first.mapping
    gateway.rollback(first.change)
    assert len(gateway.table) == 0


def test_expire_and_reload(gateway: Gateway) -> None:
    short = granted(gateway.map(request(port=2001, external=2001, lifetime=60), now=0))
    keep = granted(gateway.map(request(port=2002, external=2002), now=0))
    assert gateway.expire(now=61).removed == (short.mapping,)
    stricter = Policy.parse(POLICY.replace('internal_ports = "23"', 'internal_ports = "2002"'))
    change = gateway.reload(stricter, now=62, wall=0)
    assert change.removed == (keep.mapping,)
    assert len(gateway.table) == 0


def test_restore_skips_expired_and_clashing(gateway: Gateway) -> None:
    live = granted(gateway.map(request(), now=0)).mapping
    fresh = Gateway(gateway.policy)
    dropped = fresh.restore([live, replace(live, expires=-1.0), live], now=10)
    assert len(fresh.table) == 1 and len(dropped) == 2


# -- issue 8: takeovers, targets, the gateway's own addresses, a full table ------------------

LAN = IPv4Network("192.168.1.0/24")
ROUTER = IPv4Address("192.168.1.1")
WAN_HOST = IPv4Address("203.0.113.9")
THIRD_PARTY = """
[defaults]
action = "deny"
[[rules]]
name = "router"
action = "allow"
clients = ["192.168.1.1"]
allow_third_party = true
[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]
allow_third_party = true
"""


def lan_gateway(policy: str = THIRD_PARTY) -> Gateway:
    return Gateway(
        Policy.parse(policy),
        rng=random.Random(1),
        internal_networks=(LAN,),
        own_addresses=frozenset({ROUTER, IPv4Address("198.51.100.2")}),
    )


@pytest.mark.parametrize("mechanism", [Mechanism.UPNP, Mechanism.PCP])
def test_remote_host_mapping_cannot_shadow_another_clients_wildcard(
    gateway: Gateway, mechanism: Mechanism
) -> None:
    held = granted(gateway.map(request(external=30001, exact_port=True), now=0)).mapping
    takeover = request(client=B, external=30001, remote_host=WAN_HOST, exact_port=True)
    result = refused(gateway.map(replace(takeover, mechanism=mechanism), now=0))
    assert result.deny.reason is Reason.PORT_IN_USE and result.existing == held
    assert list(gateway.table) == [held]


def test_wildcard_cannot_hide_behind_another_clients_remote_host_mapping(
    gateway: Gateway,
) -> None:
    peer = request(external=30005, remote_host=WAN_HOST, exact_port=True, peer_port=443)
    held = granted(gateway.map(peer, now=0)).mapping
    result = refused(gateway.map(request(client=B, external=30005, exact_port=True), now=0))
    assert result.deny.reason is Reason.PORT_IN_USE and result.existing == held


def test_remote_host_mappings_of_one_client_or_distinct_peers_coexist(gateway: Gateway) -> None:
    granted(gateway.map(request(external=30001, exact_port=True), now=0))
    granted(
        gateway.map(request(port=81, external=30001, remote_host=WAN_HOST, exact_port=True), now=0)
    )
    other_peer = IPv4Address("203.0.113.10")
    granted(
        gateway.map(request(client=B, external=30002, remote_host=WAN_HOST, exact_port=True), now=0)
    )
    granted(gateway.map(request(external=30002, remote_host=other_peer, exact_port=True), now=0))


def test_exact_companion_port_of_another_client_conflicts(gateway: Gateway) -> None:
    held = granted(gateway.map(request(external=30001), now=0)).mapping
    udp = request(client=B, protocol=Protocol.UDP, external=30001, exact_port=True)
    result = refused(gateway.map(replace(udp, mechanism=Mechanism.UPNP), now=0))
    assert result.deny.reason is Reason.PORT_IN_USE and result.existing == held
    own = request(protocol=Protocol.UDP, external=30001, exact_port=True)
    assert granted(gateway.map(own, now=0)).mapping.external_port == 30001


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1",  # the router's loopback services
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "192.168.1.0",  # the LAN's network address
        "192.168.1.255",  # and its broadcast address
        "192.168.1.1",  # the gateway's LAN address
        "198.51.100.2",  # the gateway's WAN address
        "203.0.113.9",  # a WAN host: a relay (UPnProxy)
        "8.8.8.8",
    ],
)
def test_third_party_target_must_be_a_lan_host(target: str) -> None:
    gateway = lan_gateway()
    ask = request(internal_address=IPv4Address(target), mechanism=Mechanism.UPNP)
    result = refused(gateway.map(ask, now=0))
    assert result.deny.reason is Reason.INVALID_INTERNAL_ADDRESS
    assert target in result.deny.detail
    assert len(gateway.table) == 0


def test_third_party_lan_host_is_still_granted() -> None:
    gateway = lan_gateway()
    ask = request(internal_address=B, mechanism=Mechanism.UPNP)
    assert granted(gateway.map(ask, now=0)).mapping.internal_address == B


def test_gateway_address_as_client_needs_a_rule_naming_it() -> None:
    router = request(client=ROUTER, internal_address=B, mechanism=Mechanism.UPNP)
    named = lan_gateway()
    assert granted(named.map(router, now=0)).decision.rule == "router"
    unnamed = lan_gateway(
        THIRD_PARTY.replace('clients = ["192.168.1.1"]', 'clients = ["10.9.9.9"]')
    )
    result = refused(unnamed.map(router, now=0))
    assert (result.deny.reason, result.deny.rule) == (Reason.GATEWAY_CLIENT, "lan")
    assert len(unnamed.table) == 0


def test_gateway_address_mapping_itself_is_refused_even_when_named() -> None:
    gateway = lan_gateway()
    result = refused(gateway.map(request(client=ROUTER, mechanism=Mechanism.NATPMP), now=0))
    assert result.deny.reason is Reason.INVALID_INTERNAL_ADDRESS


def test_reload_drops_mappings_the_addresses_no_longer_allow() -> None:
    gateway = lan_gateway()
    kept = granted(gateway.map(request(), now=0)).mapping
    doomed = granted(gateway.map(request(client=ROUTER, internal_address=B), now=0)).mapping
    gateway.own_addresses = gateway.own_addresses | {A}
    change = gateway.reload(
        Policy.parse(THIRD_PARTY.replace('192.168.1.1"]', '10.9.9.9"]')), now=1, wall=0
    )
    assert set(change.removed) == {kept, doomed} and len(gateway.table) == 0


def full_gateway(free: int | None, host_port: int | None = None) -> Gateway:
    """Every TCP port of 1024-65535 held by A except `free`."""
    policy = Policy.parse(
        '[defaults]\naction = "allow"\nmax_mappings = 70000\nmax_mappings_per_client = 70000\n'
        '[[rules]]\nname = "high"\naction = "allow"\nexternal_ports = "1024-65535"\n'
    )
    host = frozenset({(Protocol.TCP, host_port)}) if host_port else frozenset()
    gateway = Gateway(policy, rng=random.Random(2), host_ports=host)
    owner = Owner(Mechanism.NATPMP, A)
    for port in range(1024, 65536):
        if port not in (free, host_port):
            key = MappingKey(Protocol.TCP, port)
            gateway.table.put(Mapping(key, A, port, owner, created=0, expires=600))
    return gateway


def test_full_table_refuses_and_finds_the_one_free_port() -> None:
    gateway = full_gateway(free=40000)
    found = granted(gateway.map(request(client=B, port=1, external=0), now=0))
    assert found.mapping.external_port == 40000
    result = refused(gateway.map(request(client=B, port=2, external=0), now=0))
    assert result.deny.reason is Reason.NO_FREE_PORT


def test_full_table_skips_host_ports_and_others_companions() -> None:
    gateway = full_gateway(free=40000, host_port=50000)
    # 50000 is free in the table but the router listens on it.
    exact = refused(gateway.map(request(client=B, port=1, external=50000, exact_port=True), now=0))
    assert exact.deny.reason is Reason.RESERVED_PORT
    # UDP 40000 for B blocks TCP 40000 for A's companion rule in reverse: B holds UDP 40000.
    granted(gateway.map(request(client=B, port=9, external=40000, protocol=Protocol.UDP), now=0))
    result = refused(
        gateway.map(request(client=IPv4Address("192.168.1.12"), port=3, external=0), now=0)
    )
    assert result.deny.reason is Reason.NO_FREE_PORT
    # B itself may take TCP 40000: the companion of its own UDP mapping.
    assert (
        granted(gateway.map(request(client=B, port=3, external=0), now=0)).mapping.external_port
        == 40000
    )


def test_forbidden_lists_restored_mappings_the_addresses_refuse() -> None:
    old = Gateway(Policy.parse(THIRD_PARTY))  # as before: no addresses known
    relay = granted(old.map(request(internal_address=WAN_HOST), now=0)).mapping
    fine = granted(old.map(request(port=81, internal_address=B), now=0)).mapping
    named = granted(old.map(request(client=ROUTER, port=82, internal_address=B), now=0)).mapping
    gateway = lan_gateway()
    assert gateway.restore([relay, fine, named], now=1) == []
    [(mapping, deny)] = gateway.forbidden(now=1)
    assert mapping == relay and deny.reason is Reason.INVALID_INTERNAL_ADDRESS
    gateway.policy = Policy.parse(THIRD_PARTY.replace('"192.168.1.1"]', '"10.9.9.9"]'))
    assert {m for m, _ in gateway.forbidden(now=1)} == {relay, named}


def test_host_ports_are_never_chosen_nor_granted_exactly() -> None:
    gateway = Gateway(Policy.parse(POLICY), host_ports=frozenset({(Protocol.TCP, 8080)}))
    chosen = granted(gateway.map(request(port=8080, external=8080), now=0)).mapping
    assert chosen.external_port != 8080
    exact = refused(
        gateway.map(request(client=B, mechanism=Mechanism.UPNP, exact_port=True), now=0)
    )
    assert exact.deny.reason is Reason.RESERVED_PORT
