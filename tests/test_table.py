"""The mapping table: indexes, listing positions, expiry from the deadline heap."""

import random
from dataclasses import replace
from ipaddress import IPv4Address

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.table import MappingTable

A = IPv4Address("192.168.1.10")
B = IPv4Address("192.168.1.11")


def mapping(
    port: int,
    *,
    client: IPv4Address = A,
    expires: float = 100.0,
    protocol: Protocol = Protocol.TCP,
    internal_port: int | None = None,
    mechanism: Mechanism = Mechanism.NATPMP,
) -> Mapping:
    return Mapping(
        key=MappingKey(protocol, port),
        internal_address=client,
        internal_port=port if internal_port is None else internal_port,
        owner=Owner(mechanism, client),
        created=0.0,
        expires=expires,
    )


def test_lookups_by_every_index() -> None:
    table = MappingTable()
    table.put(mapping(1000))
    table.put(mapping(2000, client=B, internal_port=80))
    table.put(mapping(2000, protocol=Protocol.UDP, internal_port=80))
    assert table.get(MappingKey(Protocol.TCP, 2000)).owner.client == B  # type: ignore[union-attr]
    assert [m.external_port for m in table.by_internal(B, Protocol.TCP, 80)] == [2000]
    assert table.by_internal(B, Protocol.TCP, 80, Mechanism.PCP) == []
    assert table.count_for_client(A) == 2
    assert table.port_in_use(Protocol.UDP, 2000)
    assert not table.port_in_use(Protocol.UDP, 1000)
    assert {m.owner.client for m in table.port_users(Protocol.TCP, 2000)} == {B}


def test_replace_keeps_position_and_reindexes() -> None:
    table = MappingTable()
    table.put(mapping(1000))
    table.put(mapping(1001))
    previous = table.put(mapping(1000, client=B))
    assert previous is not None and previous.owner.client == A
    assert len(table) == 2
    assert table.entry(0).owner.client == B
    assert table.count_for_client(A) == 1


def test_positions_stay_dense_under_random_churn() -> None:
    table = MappingTable()
    rng = random.Random(7)
    live: set[int] = set()
    for _ in range(3000):
        port = rng.randrange(1, 400)
        if port in live and rng.random() < 0.5:
            assert table.remove(MappingKey(Protocol.TCP, port)) is not None
            live.discard(port)
        else:
            table.put(mapping(port))
            live.add(port)
    listed = [table.entry(i).external_port for i in range(len(table))]
    assert sorted(listed) == sorted(live)
    assert [m.external_port for m in table] == listed


def test_expiry_follows_deadlines_and_renewals() -> None:
    table = MappingTable()
    table.put(mapping(1, expires=10))
    table.put(mapping(2, expires=20))
    table.put(mapping(3, expires=30))
    table.put(mapping(1, expires=40))  # renewed: the old deadline must not expire it
    assert table.next_deadline() == 20
    assert [m.external_port for m in table.expire(now=25)] == [2]
    assert table.expire(now=25) == []
    assert [m.external_port for m in table.expire(now=100)] == [3, 1]
    assert len(table) == 0 and table.next_deadline() is None


def test_heap_stays_bounded_under_many_renewals() -> None:
    table = MappingTable()
    for i in range(10_000):
        table.put(mapping(1, expires=float(i)))
    assert len(table._deadlines) <= 2 * len(table) + 65
    assert table.next_deadline() == 9999.0


def test_shared_ports_and_endpoints_survive_removals() -> None:
    table = MappingTable()
    wildcard = mapping(5000, internal_port=80)
    remote = replace(wildcard, key=MappingKey(Protocol.TCP, 5000, B))
    other_port = mapping(6000, internal_port=80)
    for m in (wildcard, remote, other_port):
        table.put(m)
    assert set(table.port_users(Protocol.TCP, 5000)) == {wildcard, remote}
    assert len(table.by_internal(A, Protocol.TCP, 80)) == 3
    table.remove(wildcard.key)
    assert table.port_users(Protocol.TCP, 5000) == [remote]
    assert set(table.by_internal(A, Protocol.TCP, 80)) == {remote, other_port}
    table.remove(remote.key)
    assert not table.port_in_use(Protocol.TCP, 5000)
    assert table.by_internal(A, Protocol.TCP, 80) == [other_port]
    table.remove(other_port.key)
    assert table.by_internal(A, Protocol.TCP, 80) == [] and table.count_for_client(A) == 0


def test_used_port_bitmaps_follow_every_change() -> None:
    table = MappingTable()
    rng = random.Random(3)
    live: dict[MappingKey, Mapping] = {}
    for _ in range(3000):
        port = rng.randrange(1, 60)
        protocol = rng.choice(list(Protocol))
        remote = rng.choice([None, IPv4Address("203.0.113.9")])
        key = MappingKey(protocol, port, remote)
        if key in live and rng.random() < 0.5:
            table.remove(key)
            del live[key]
        else:
            live[key] = replace(mapping(port, protocol=protocol), key=key)
            table.put(live[key])
        if rng.random() < 0.01:
            for gone in table.expire(now=1e9):
                del live[gone.key]
        for proto in Protocol:
            expected = sum({1 << k.external_port for k in live if k.protocol is proto})
            assert table.used_ports(proto) == expected
