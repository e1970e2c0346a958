"""The memory backend behaves like the kernel's maps, failures included."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol, RemoteFilter
from igd.server.backends import Backend, BackendError, KernelEntry, ReconcileReport
from igd.server.backends.memory import MemoryBackend

LAN = IPv4Address("192.168.78.10")


WAN2, WAN3 = IPv4Address("203.0.113.2"), IPv4Address("203.0.113.3")
TCP = Protocol.TCP


def mapping(
    port: int,
    *,
    internal_port: int = 8080,
    remote: str | None = None,
    expires: float = 200.0,
    filters: tuple[RemoteFilter, ...] = (),
    peer_port: int = 0,
) -> Mapping:
    key = MappingKey(Protocol.TCP, port, IPv4Address(remote) if remote else None)
    owner = Owner(Mechanism.PCP, LAN)
    return Mapping(
        key, LAN, internal_port, owner, 0.0, expires, filters=filters, peer_port=peer_port
    )


def only(network: str, port: int = 0) -> RemoteFilter:
    return RemoteFilter(IPv4Network(network), port)


async def test_is_a_backend_and_applies_adds_and_removes() -> None:
    backend: Backend = MemoryBackend()
    await backend.open()
    a, b = mapping(1), mapping(2, remote="203.0.113.2")
    await backend.apply([], [a, b], now=0.0)
    assert await backend.entries() == {KernelEntry.of(a), KernelEntry.of(b)}
    await backend.apply([a], [], now=0.0)
    assert await backend.entries() == {KernelEntry.of(b)}


async def test_renewal_works_even_when_the_entry_is_missing() -> None:
    backend = MemoryBackend()
    old, new = mapping(1, expires=100.0), mapping(1, expires=500.0)
    await backend.apply([old], [new], now=50.0)
    assert await backend.entries() == {KernelEntry.of(new)}
    assert backend.timeouts[KernelEntry.of(new)] == 450 + 60


async def test_conflicting_add_fails_and_changes_nothing() -> None:
    backend = MemoryBackend()
    a = mapping(1)
    await backend.apply([], [a], now=0.0)
    with pytest.raises(BackendError):
        await backend.apply([], [mapping(2), mapping(1, internal_port=9)], now=0.0)
    assert await backend.entries() == {KernelEntry.of(a)}


async def test_fail_next_fails_once_and_changes_nothing() -> None:
    backend = MemoryBackend()
    backend.fail_next = BackendError("injected")
    with pytest.raises(BackendError, match="injected"):
        await backend.apply([], [mapping(1)], now=0.0)
    assert await backend.entries() == set()
    assert backend.transactions == 0
    await backend.apply([], [mapping(1)], now=0.0)
    assert backend.transactions == 1


async def test_reconcile_reports_orphans_and_missing() -> None:
    backend = MemoryBackend()
    keep, orphan, missing = mapping(1), mapping(2), mapping(3)
    await backend.apply([], [keep, orphan], now=0.0)
    report = await backend.reconcile([keep, missing], now=0.0)
    assert report == ReconcileReport(
        removed=(KernelEntry.of(orphan),), added=(KernelEntry.of(missing),)
    )
    assert await backend.entries() == {KernelEntry.of(keep), KernelEntry.of(missing)}


async def test_close_keeps_or_flushes() -> None:
    backend = MemoryBackend()
    await backend.apply([], [mapping(1)], now=0.0)
    await backend.close(flush=False)
    assert await backend.entries() == {KernelEntry.of(mapping(1))}
    await backend.close(flush=True)
    assert await backend.entries() == set()


async def test_filters_decide_who_reaches_a_mapping_and_a_renewal_can_clear_them() -> None:
    backend = MemoryBackend()
    filtered = mapping(18080, filters=(only("203.0.113.2/32"), only("198.51.100.0/24", 5000)))
    await backend.apply([], [filtered], now=0.0)
    assert await backend.entries() == {KernelEntry.of(filtered)}
    assert backend.forward(TCP, 18080, WAN2, 1234) == (LAN, 8080)
    assert backend.forward(TCP, 18080, WAN3, 1234) is None
    assert backend.forward(TCP, 18080, IPv4Address("198.51.100.9"), 5000) == (LAN, 8080)
    assert backend.forward(TCP, 18080, IPv4Address("198.51.100.9"), 5001) is None
    cleared = replace(filtered, filters=())
    await backend.apply([filtered], [cleared], now=0.0)
    assert backend.forward(TCP, 18080, WAN3, 1234) == (LAN, 8080)
    assert backend.forward(TCP, 18081, WAN3, 1234) is None  # nothing mapped there


async def test_a_remote_host_entry_takes_its_hosts_flows_before_a_filtered_wildcard() -> None:
    backend = MemoryBackend()
    wildcard = mapping(18080, filters=(only("203.0.113.2/32"),))
    for_wan3 = mapping(18080, remote="203.0.113.3", internal_port=8081)
    await backend.apply([], [wildcard, for_wan3], now=0.0)
    assert backend.forward(TCP, 18080, WAN3, 1) == (LAN, 8081)
    assert backend.forward(TCP, 18080, WAN2, 1) == (LAN, 8080)
    # Filters on the remote-host entry apply to its host, with no fall-back to the wildcard.
    strict = replace(for_wan3, filters=(only("203.0.113.0/24", 7),))
    await backend.apply([for_wan3], [strict], now=0.0)
    assert backend.forward(TCP, 18080, WAN3, 7) == (LAN, 8081)
    assert backend.forward(TCP, 18080, WAN3, 8) is None


async def test_peer_entry_gives_its_flow_the_external_port_and_forwards_from_its_peer() -> None:
    backend = MemoryBackend()
    peer = mapping(40000, remote="203.0.113.2", internal_port=4000, peer_port=7000)
    await backend.apply([], [peer], now=0.0)
    assert await backend.entries() == {KernelEntry.of(peer)}
    assert backend.outbound(TCP, LAN, 4000, WAN2, 7000) == 40000
    assert backend.outbound(TCP, LAN, 4000, WAN2, 7001) is None
    assert backend.forward(TCP, 40000, WAN2, 9999) == (LAN, 4000)
    assert backend.forward(TCP, 40000, WAN3, 9999) is None
    # The kernel holds one external port per flow: a second PEER entry for it is refused.
    with pytest.raises(BackendError, match="PEER"):
        await backend.apply([], [replace(peer, key=replace(peer.key, external_port=40001))], now=0)
    await backend.apply([peer], [], now=0.0)
    assert backend.outbound(TCP, LAN, 4000, WAN2, 7000) is None


async def test_entries_the_kernel_cannot_hold_are_refused_like_nftables_does() -> None:
    backend = MemoryBackend()
    with pytest.raises(BackendError, match="invalid mapping"):
        await backend.apply([], [mapping(1, peer_port=7000)], now=0.0)  # PEER without peer
    with pytest.raises(BackendError, match="invalid mapping"):
        await backend.reconcile([mapping(1, filters=(only("203.0.113.2/32"),) * 2)], now=0.0)
    assert await backend.entries() == set() and backend.transactions == 0


async def test_counters_are_zero_per_mapping_and_restore_holds_exactly_what_is_wanted() -> None:
    backend = MemoryBackend()
    a, b = mapping(1), mapping(2, remote="203.0.113.2")
    await backend.apply([], [a, b], now=0.0)
    assert await backend.counters() == {a.key: (0, 0), b.key: (0, 0)}
    await backend.restore([b], now=0.0)
    assert await backend.entries() == {KernelEntry.of(b)}
    assert await backend.counters() == {b.key: (0, 0)}
