"""The gateway core: conflicts, renewals, port choice, quotas and reloads across mechanisms."""

import random
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from igd.decision import Reason
from igd.gateway import Gateway, Granted, Refused
from igd.model import MapRequest, Mechanism, Protocol
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
    change = gateway.reload(stricter, now=62)
    assert change.removed == (keep.mapping,)
    assert len(gateway.table) == 0


def test_restore_skips_expired_and_clashing(gateway: Gateway) -> None:
    live = granted(gateway.map(request(), now=0)).mapping
    fresh = Gateway(gateway.policy)
    dropped = fresh.restore([live, replace(live, expires=-1.0), live], now=10)
    assert len(fresh.table) == 1 and len(dropped) == 2
