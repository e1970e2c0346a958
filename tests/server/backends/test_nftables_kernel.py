"""The nftables backend against the real kernel, in throwaway namespaces (root only)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest

from igd.model import Protocol
from igd.server.backends import BackendError, KernelEntry, ReconcileReport
from igd.server.backends.nftables import NftablesBackend
from tests.netns import Netns, netns
from tests.server.backends.nftlab import (
    NOW,
    PREFIX,
    mapping,
    only,
    rules,
    ruleset,
    snapshot,
    timeouts,
)

pytestmark = pytest.mark.lab


@pytest.fixture
def gw() -> Iterator[Netns]:
    with netns(PREFIX) as ns:
        yield ns


@pytest.fixture
async def backend(gw: Netns) -> AsyncIterator[NftablesBackend]:
    b = NftablesBackend("igd", "wan0", netns=gw.name)
    await b.open()
    yield b
    await b.close(flush=False)


async def test_open_is_idempotent_and_keeps_elements(gw: Netns, backend: NftablesBackend) -> None:
    a, b = mapping(1), mapping(2, remote="203.0.113.2")
    await backend.apply([], [a, b], now=NOW)
    await backend.open()
    # A restarted daemon: new backend, same table.
    again = NftablesBackend("igd", "wan0", netns=gw.name)
    await again.open()
    assert await again.entries() == {KernelEntry.of(a), KernelEntry.of(b)}
    assert len(rules(gw)) == 2
    # The external interface was renamed between runs: the rules follow, elements stay.
    renamed = NftablesBackend("igd", "wan1", netns=gw.name, hairpin=False)
    await renamed.open()
    assert [r.split()[1] for r in rules(gw)] == ['"wan1"', '"wan1"']
    assert '"wan0"' not in gw.run("nft", "list", "table", "ip", "igd").stdout
    assert await renamed.entries() == {KernelEntry.of(a), KernelEntry.of(b)}
    for other in (again, renamed):
        await other.close(flush=False)


async def test_apply_adds_and_removes_with_kernel_timeouts(
    gw: Netns, backend: NftablesBackend
) -> None:
    tcp = mapping(18080, lease=100.0)
    udp = mapping(5000, protocol=Protocol.UDP, remote="203.0.113.3", lease=7200.5)
    await backend.apply([], [tcp, udp], now=NOW)
    assert await backend.entries() == {KernelEntry.of(tcp), KernelEntry.of(udp)}
    # Remaining lease + 60 s grace, rounded up.
    assert timeouts(gw) == {"tcp . 18080": 160, "203.0.113.3 . udp . 5000": 7261}
    await backend.apply([tcp], [], now=NOW)
    assert await backend.entries() == {KernelEntry.of(udp)}


async def test_renewal_succeeds_when_the_element_is_missing_or_expired(
    gw: Netns, backend: NftablesBackend
) -> None:
    # Removed entry never in the kernel, renewed in the same call.
    never, renewed = mapping(1, lease=10.0), mapping(1, lease=500.0)
    await backend.apply([never], [renewed], now=NOW)
    assert timeouts(gw) == {"tcp . 1": 560}
    # An element the kernel already timed out (the daemon was late): renew it all the same.
    gw.run("nft", "add element ip igd portmap { tcp . 2 timeout 1s : 192.168.78.10 . 8080 }")
    time.sleep(1.5)
    assert "tcp . 2" not in timeouts(gw)
    await backend.apply([mapping(2)], [mapping(2, lease=20.0)], now=NOW)
    assert timeouts(gw)["tcp . 2"] == 80
    # A plain removal of something absent is not an error either.
    await backend.apply([mapping(3)], [], now=NOW)
    assert await backend.entries() == {KernelEntry.of(renewed), KernelEntry.of(mapping(2))}


async def test_failed_transaction_changes_nothing(gw: Netns, backend: NftablesBackend) -> None:
    held, gone = mapping(1), mapping(2)
    await backend.apply([], [held, gone], now=NOW)
    before = snapshot(gw)
    # The kernel refuses to add a key that forwards elsewhere (EEXIST), which aborts the whole
    # transaction: the removal and the other add in the same call must not happen either.
    clash = mapping(1, internal_port=9999)
    with pytest.raises(BackendError, match="File exists"):
        await backend.apply([gone], [mapping(3), clash], now=NOW)
    assert await backend.entries() == {KernelEntry.of(held), KernelEntry.of(gone)}
    assert snapshot(gw) == before
    # Invalid entries never reach the kernel.
    with pytest.raises(BackendError, match="invalid"):
        await backend.apply([], [mapping(3), mapping(0)], now=NOW)
    assert snapshot(gw) == before


async def test_reconcile_removes_orphans_adds_missing_and_refreshes(
    gw: Netns, backend: NftablesBackend
) -> None:
    keep, orphan, stale = mapping(1, lease=100.0), mapping(2), mapping(3)
    await backend.apply([], [keep, orphan, stale], now=NOW)
    missing = mapping(4, protocol=Protocol.UDP, remote="203.0.113.9")
    moved = mapping(3, internal_port=9999)
    wanted = [replace(keep, expires=NOW + 900), missing, moved]
    report = await backend.reconcile(wanted, now=NOW)
    assert report == ReconcileReport(
        removed=(KernelEntry.of(orphan), KernelEntry.of(stale)),
        added=(KernelEntry.of(moved), KernelEntry.of(missing)),
    )
    assert await backend.entries() == {KernelEntry.of(e) for e in (keep, missing, moved)}
    assert timeouts(gw)["tcp . 1"] == 960  # the matching entry's timeout was refreshed
    assert await backend.reconcile(wanted, now=NOW) == ReconcileReport((), ())
    # A daemon that starts with no leases clears the table.
    await backend.reconcile([], now=NOW)
    assert await backend.entries() == set()


async def test_reconcile_without_audit_still_replaces_the_table(
    gw: Netns, backend: NftablesBackend
) -> None:
    keep, orphan = mapping(1), mapping(2)
    await backend.apply([], [keep, orphan], now=NOW)
    missing = mapping(4, protocol=Protocol.UDP, remote="203.0.113.9")
    report = await backend.reconcile([keep, missing], now=NOW, audit=False)
    assert report == ReconcileReport((), (), audited=False)
    assert await backend.entries() == {KernelEntry.of(keep), KernelEntry.of(missing)}


async def test_a_large_unaudited_reconcile_is_one_netlink_refill(
    gw: Netns, backend: NftablesBackend
) -> None:
    # Above MAX_BATCH octets (the start-up refill of a large table): the batch goes out in
    # one sendmsg with the buffers raised, and still replaces everything, filters included.
    filtered = mapping(9, filters=(only("198.51.100.0/24"),))
    await backend.apply([], [mapping(1), filtered], now=NOW)
    wanted = [mapping(port, internal_port=port, lease=600.0) for port in range(1024, 5024)]
    report = await backend.reconcile(wanted, now=NOW, audit=False)
    assert report == ReconcileReport((), (), audited=False)
    assert await backend.entries() == {KernelEntry.of(m) for m in wanted}
    held = timeouts(gw)
    assert held["tcp . 1024"] == 660  # the lease plus the kernel's grace, as in every path
    assert not [key for key in held if key.startswith(("tcp . 1 ", "tcp . 9 ")) or key in (
        "tcp . 1", "tcp . 9")]  # fmt: skip
    assert "198.51.100.0" not in snapshot(gw)  # the FILTER's elements went too
    # The path for ordinary changes still works after the refill.
    await backend.apply([wanted[0]], [], now=NOW)
    assert len(await backend.entries()) == len(wanted) - 1


async def test_close_keeps_or_flushes_the_table(gw: Netns, backend: NftablesBackend) -> None:
    await backend.apply([], [mapping(1)], now=NOW)
    await backend.close(flush=False)
    assert "tcp . 1" in timeouts(gw)
    with pytest.raises(BackendError, match="closed"):
        await backend.entries()
    last = NftablesBackend("igd", "wan0", netns=gw.name)
    await last.close(flush=True)
    assert not [o for o in ruleset(gw) if "table" in o]
    # Flushing a table that is already gone is fine too.
    await NftablesBackend("igd", "wan0", netns=gw.name).close(flush=True)


async def test_unknown_namespace_is_a_backend_error() -> None:
    b = NftablesBackend("igd", "wan0", netns="igdnft-does-not-exist")
    with pytest.raises(BackendError, match="igdnft-does-not-exist"):
        await b.open()
    await b.close(flush=False)


# -- FILTER and PEER entries ----------------------------------------------------------------

FILTERED = mapping(
    18080, filters=(only("203.0.113.0/24"), only("198.51.100.7/32", 5000), only("0.0.0.0/0", 7))
)
REMOTE_FILTERED = mapping(
    5000,
    protocol=Protocol.UDP,
    remote="203.0.113.3",
    internal_port=5001,
    filters=(only("203.0.113.0/24", 9), only("198.51.100.0/24")),
)
PEER = mapping(40000, protocol=Protocol.UDP, remote="198.51.100.7", internal_port=4000,
               peer_port=7000)  # fmt: skip
PLAIN = mapping(18081)


async def test_filters_and_peer_entries_read_back_exactly(
    gw: Netns, backend: NftablesBackend
) -> None:
    every = [FILTERED, REMOTE_FILTERED, PEER, PLAIN]
    await backend.apply([], every, now=NOW)
    assert await backend.entries() == {KernelEntry.of(m) for m in every}
    # A restarted daemon finds exactly what it wrote: reconcile changes nothing.
    again = NftablesBackend("igd", "wan0", netns=gw.name)
    await again.open()
    assert await again.reconcile(every, now=NOW) == ReconcileReport((), ())
    assert await again.entries() == {KernelEntry.of(m) for m in every}
    # Every element carries the mapping's kernel timeout.
    assert set(timeouts(gw).values()) == {3660}
    await again.close(flush=False)
    # Removal takes every element of every set with it.
    await backend.apply(every, [], now=NOW)
    assert await backend.entries() == set() and timeouts(gw) == {}


async def test_renewal_with_other_filters_swaps_them_atomically(
    gw: Netns, backend: NftablesBackend
) -> None:
    await backend.apply([], [FILTERED, PLAIN], now=NOW)
    narrower = replace(FILTERED, filters=(only("203.0.113.2/32"),))
    await backend.apply([FILTERED], [narrower], now=NOW)
    assert await backend.entries() == {KernelEntry.of(narrower), KernelEntry.of(PLAIN)}
    assert [k for k in timeouts(gw) if k.endswith("tcp . 18080") and k.count(".") > 8] == [
        "203.0.113.2 . 203.0.113.2 . 0 . tcp . 18080"
    ]
    # A failing transaction (the add of PLAIN's key with another target) changes nothing,
    # filters included.
    before = snapshot(gw)
    clash = mapping(18081, internal_port=9999)
    with pytest.raises(BackendError, match="File exists"):
        await backend.apply([narrower], [FILTERED, clash], now=NOW)
    assert snapshot(gw) == before
    # Filters cleared by a renewal: the mapping is no longer marked filtered.
    cleared = replace(narrower, filters=())
    await backend.apply([narrower], [cleared], now=NOW)
    assert await backend.entries() == {KernelEntry.of(cleared), KernelEntry.of(PLAIN)}
    assert not [k for k in timeouts(gw) if "18080" in k and k != "tcp . 18080"]


async def test_reconcile_rewrites_changed_filters_and_clears_stray_elements(
    gw: Netns, backend: NftablesBackend
) -> None:
    await backend.apply([], [FILTERED, PEER], now=NOW)
    # Hand edits: a stray allowed peer, a PEER flow with no DNAT entry, a filter mark alone.
    gw.run("nft", "add element ip igd allowed { 192.0.2.1 . 192.0.2.1 . 0 . udp . 9 }")
    gw.run("nft", "add element ip igd peers { 192.168.78.10 . tcp . 1 . 192.0.2.1 . 2 : 3 }")
    gw.run("nft", "add element ip igd filtered { udp . 9 }")
    assert await backend.entries() == {KernelEntry.of(FILTERED), KernelEntry.of(PEER)}
    changed = replace(FILTERED, filters=(only("192.0.2.0/24"),))
    report = await backend.reconcile([changed, PEER], now=NOW)
    assert report == ReconcileReport(
        removed=(KernelEntry.of(FILTERED),), added=(KernelEntry.of(changed),)
    )
    assert await backend.entries() == {KernelEntry.of(changed), KernelEntry.of(PEER)}
    assert sorted(timeouts(gw)) == sorted(
        [
            "tcp . 18080",
            "192.0.2.0 . 192.0.2.255 . 0 . tcp . 18080",
            "198.51.100.7 . udp . 40000",
            "192.168.78.10 . udp . 4000 . 198.51.100.7 . 7000",
        ]
    )


async def test_open_upgrades_a_table_of_the_earlier_two_map_shape_keeping_its_mappings(
    gw: Netns,
) -> None:
    gw.run("nft", "-f", "-", input=OLD_SHAPE)
    backend = NftablesBackend("igd", "wan0", netns=gw.name)
    await backend.open()
    assert await backend.entries() == {KernelEntry.of(mapping(18079))}
    await backend.apply([], [FILTERED, PEER], now=NOW)
    assert await backend.entries() == {KernelEntry.of(m) for m in (mapping(18079), FILTERED, PEER)}
    await backend.close(flush=False)


OLD_SHAPE = """
add table ip igd
add map ip igd portmap { type inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; }
add map ip igd portmap_remote { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; }
add chain ip igd prerouting { type nat hook prerouting priority dstnat; policy accept; }
add rule ip igd prerouting iifname "wan0" meta l4proto { tcp, udp } dnat ip to ip saddr . meta l4proto . th dport map @portmap_remote
add rule ip igd prerouting iifname "wan0" meta l4proto { tcp, udp } dnat ip to meta l4proto . th dport map @portmap
add element ip igd portmap { tcp . 18079 : 192.168.78.10 . 8080 }
"""  # noqa: E501 (the earlier release's exact commands)


SECOND = "203.0.113.9"
ON_SECOND = [
    mapping(18080, address=SECOND),  # the same port as FILTERED, on another address
    mapping(18080, protocol=Protocol.UDP, address=SECOND, filters=FILTERED.filters),
    mapping(18082, remote="198.51.100.7", address=SECOND),
]


@pytest.mark.parametrize("fast_path", [True, False])
async def test_entries_on_further_addresses_read_back_and_count_apart(
    gw: Netns, fast_path: bool
) -> None:
    backend = NftablesBackend("igd", "wan0", netns=gw.name, fast_path=fast_path)
    await backend.open()
    every = [FILTERED, PLAIN, *ON_SECOND]
    await backend.apply([], every, now=NOW)
    assert await backend.entries() == {KernelEntry.of(m) for m in every}
    # One counter per mapping key: the same port on two addresses counts apart.
    assert set(await backend.counters()) == {m.key for m in every}
    again = NftablesBackend("igd", "wan0", netns=gw.name)
    await again.open()
    assert await again.reconcile(every, now=NOW) == ReconcileReport((), ())
    await again.close(flush=False)
    await backend.apply(ON_SECOND, [], now=NOW)
    assert await backend.entries() == {KernelEntry.of(FILTERED), KernelEntry.of(PLAIN)}
    await backend.close(flush=False)
