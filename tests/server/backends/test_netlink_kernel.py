"""The netlink fast path against the real kernel: it must write exactly what libnftables
writes (root, throwaway namespaces)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

import pytest

from igd.model import Mapping, Protocol
from igd.server.backends import BackendError, KernelEntry
from igd.server.backends import nftables as nftables_module
from igd.server.backends.netlink import (
    Element,
    NetlinkSets,
    SetOp,
    entry_data,
    entry_key,
)
from igd.server.backends.nftables import NftablesBackend, enter_netns
from tests.netns import Netns, netns_group
from tests.server.backends.nftlab import (
    GATEWAY_WAN,
    NOW,
    SERVER,
    WAN2,
    WAN3,
    Lab,
    lab_links,
    mapping,
    only,
    snapshot,
    timeouts,
)

pytestmark = pytest.mark.lab

PREFIX = "igdnl"
REMOTE = mapping(5000, protocol=Protocol.UDP, remote="203.0.113.3", internal_port=5001)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Netns, NftablesBackend, Netns, NftablesBackend]]:
    """The fast path in one namespace, the text path in another, tables freshly opened."""
    with netns_group(PREFIX, 2) as (fast_ns, text_ns):
        fast = NftablesBackend("igd", "wan0", netns=fast_ns.name)
        text = NftablesBackend("igd", "wan0", netns=text_ns.name, fast_path=False)
        await fast.open()
        await text.open()
        try:
            yield fast_ns, fast, text_ns, text
        finally:
            await fast.close(flush=False)
            await text.close(flush=False)


def count_batches(monkeypatch: pytest.MonkeyPatch, backend: NftablesBackend) -> list[int]:
    """Count the netlink batches the backend sends (one list item per batch)."""
    sets = backend._sets
    assert sets is not None, "the fast path did not open its socket"
    sent: list[int] = []
    real = sets.transact

    async def transact(table: str, ops: Any) -> None:
        sent.append(len(ops))
        await real(table, ops)

    monkeypatch.setattr(sets, "transact", transact)
    return sent


async def test_fast_path_writes_what_the_text_path_writes(
    pair: tuple[Netns, NftablesBackend, Netns, NftablesBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast_ns, fast, text_ns, text = pair
    batches = count_batches(monkeypatch, fast)
    wild, udp_wild = mapping(18080, lease=100.0), mapping(3478, protocol=Protocol.UDP)
    long_lease = mapping(1, lease=10.0**9)  # no kernel timeout at all
    steps: list[tuple[list[Mapping], list[Mapping]]] = [
        ([], [wild, udp_wild, REMOTE, long_lease]),
        ([wild, REMOTE], [replace(wild, expires=NOW + 7200.5), replace(REMOTE, expires=NOW + 9)]),
        ([udp_wild], []),
        ([replace(REMOTE, expires=NOW + 9)], []),
        ([long_lease], [replace(long_lease, internal_port=22)]),  # renewal that moves it
    ]
    for removed, added in steps:
        for backend in (fast, text):
            await backend.apply(removed, added, now=NOW)
        assert snapshot(fast_ns) == snapshot(text_ns)
        assert await fast.entries() == await text.entries()
    assert len(batches) == len(steps)
    assert timeouts(fast_ns) == {"tcp . 18080": 7261, "tcp . 1": None}


async def test_fast_path_writes_entries_on_further_addresses_as_the_text_path(
    pair: tuple[Netns, NftablesBackend, Netns, NftablesBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast_ns, fast, text_ns, text = pair
    batches = count_batches(monkeypatch, fast)
    second = mapping(18080, address="203.0.113.9", internal_port=9090)
    remote = mapping(5000, remote="198.51.100.7", address="203.0.113.9")
    steps: list[tuple[list[Mapping], list[Mapping]]] = [
        ([], [mapping(18080), second, remote]),
        ([second], [replace(second, expires=NOW + 7200.5)]),
        ([remote], []),
    ]
    for removed, added in steps:
        for backend in (fast, text):
            await backend.apply(removed, added, now=NOW)
        assert snapshot(fast_ns) == snapshot(text_ns)
        assert await fast.entries() == await text.entries()
    assert len(batches) == len(steps)


async def test_renewal_of_a_missing_or_expired_element_succeeds(
    pair: tuple[Netns, NftablesBackend, Netns, NftablesBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw, fast, _, _ = pair
    batches = count_batches(monkeypatch, fast)
    # Never in the kernel, renewed in the same call.
    await fast.apply([mapping(1, lease=10.0)], [mapping(1, lease=500.0)], now=NOW)
    assert timeouts(gw) == {"tcp . 1": 560}
    # Timed out by the kernel before the daemon renewed it.
    gw.run("nft", "add element ip igd portmap_remote"
           " { 203.0.113.3 . udp . 5000 timeout 1s : 192.168.78.10 . 5001 }")  # fmt: skip
    time.sleep(1.5)
    assert "203.0.113.3 . udp . 5000" not in timeouts(gw)
    await fast.apply([REMOTE], [replace(REMOTE, expires=NOW + 20)], now=NOW)
    assert timeouts(gw)["203.0.113.3 . udp . 5000"] == 80
    # Removing what is absent is no error either.
    await fast.apply([mapping(3)], [], now=NOW)
    assert await fast.entries() == {KernelEntry.of(mapping(1)), KernelEntry.of(REMOTE)}
    assert len(batches) == 3


async def test_refused_batch_changes_nothing_and_says_why(
    pair: tuple[Netns, NftablesBackend, Netns, NftablesBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw, fast, _, _ = pair
    batches = count_batches(monkeypatch, fast)
    held, gone = mapping(1), mapping(2)
    await fast.apply([], [held, gone, REMOTE], now=NOW)
    before = snapshot(gw)
    # The key of `held` forwarding elsewhere: EEXIST in the last message aborts the removal
    # and the other add of the same batch.
    clash = mapping(1, internal_port=9999)
    with pytest.raises(
        BackendError, match=r"add element portmap \{ tcp . 3 .* 9999 \}: File exists"
    ):
        await fast.apply([gone, REMOTE], [mapping(3), clash], now=NOW)
    assert snapshot(gw) == before
    with pytest.raises(BackendError, match="invalid"):
        await fast.apply([], [mapping(3), mapping(0)], now=NOW)
    assert snapshot(gw) == before
    assert len(batches) == 2
    # The socket is still in step with the kernel afterwards.
    await fast.apply([gone], [], now=NOW)
    assert await fast.entries() == {KernelEntry.of(held), KernelEntry.of(REMOTE)}


@contextmanager
def sets_in(ns: Netns) -> Iterator[NetlinkSets]:
    """A raw NetlinkSets made inside `ns` (on a thread of its own: setns is per thread)."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        sets = worker.submit(lambda: (enter_netns(ns.name), NetlinkSets())[1]).result()
    try:
        yield sets
    finally:
        sets.close()


async def test_raw_batches_fail_atomically_with_the_kernels_errno(
    pair: tuple[Netns, NftablesBackend, Netns, NftablesBackend],
) -> None:
    gw, fast, _, _ = pair
    held = KernelEntry.of(mapping(1))
    await fast.apply([], [mapping(1)], now=NOW)
    before = snapshot(gw)
    new = KernelEntry.of(mapping(2))
    add_new = SetOp(True, "portmap", (Element(entry_key(new), entry_data(new)),), text="add 2")
    with sets_in(gw) as sets:
        # NLM_F_EXCL on an existing element with other data.
        other = Element(entry_key(held), bytes(8))
        excl = SetOp(True, "portmap", (other,), exclusive=True, text="add 1 excl")
        with pytest.raises(BackendError, match="refused add 1 excl: File exists"):
            await sets.transact("igd", [add_new, excl])
        assert snapshot(gw) == before
        # Deleting a missing element.
        missing = SetOp(False, "portmap", (Element(entry_key(new)),), text="delete 2")
        delete_held = SetOp(False, "portmap", (Element(entry_key(held)),), text="delete 1")
        with pytest.raises(BackendError, match="refused delete 2: No such file or directory"):
            await sets.transact("igd", [delete_held, missing])
        assert snapshot(gw) == before
        # A set that does not exist.
        with pytest.raises(BackendError, match="No such file or directory"):
            await sets.transact("igd", [replace(add_new, container="nosuchmap")])
        # And the same socket still works.
        await sets.transact("igd", [add_new])
    assert await fast.entries() == {held, new}


async def test_changes_with_filters_or_peers_take_the_text_path(
    pair: tuple[Netns, NftablesBackend, Netns, NftablesBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast_ns, fast, text_ns, text = pair
    batches = count_batches(monkeypatch, fast)
    plain = mapping(18081)
    filtered = mapping(18080, filters=(only("203.0.113.0/24"),))
    peer = mapping(40000, protocol=Protocol.UDP, remote=WAN2, internal_port=4000, peer_port=7)
    for removed, added in [([], [plain, filtered]), ([], [peer]), ([plain, peer], [])]:
        for backend in (fast, text):
            await backend.apply(removed, added, now=NOW)
    assert batches == []
    assert snapshot(fast_ns) == snapshot(text_ns)
    assert await fast.entries() == {KernelEntry.of(filtered)}
    cleared = replace(filtered, filters=())
    await fast.apply([filtered], [cleared], now=NOW)  # text: the old entry has filters
    await fast.apply([cleared], [replace(cleared, internal_port=1)], now=NOW)  # fast
    assert batches == [4]  # re-add, delete, add the map element; its counter stays
    assert await fast.entries() == {KernelEntry.of(replace(cleared, internal_port=1))}


async def test_concurrent_applies_never_reorder(
    pair: tuple[Netns, NftablesBackend, Netns, NftablesBackend],
) -> None:
    _, fast, _, _ = pair
    filtered = mapping(18080, filters=(only("203.0.113.0/24"),))
    cleared = replace(filtered, filters=())
    # Started together: the text-path add must be in the kernel before the fast-path
    # renewal that replaces it, or the renewal's re-add would clash with it.
    await asyncio.gather(
        fast.apply([], [filtered], now=NOW),
        fast.apply([filtered], [cleared], now=NOW),
        fast.apply([cleared], [replace(cleared, internal_port=7)], now=NOW),
    )
    assert await fast.entries() == {KernelEntry.of(replace(cleared, internal_port=7))}


async def test_without_a_netlink_socket_plain_changes_use_libnftables(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse() -> NetlinkSets:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(nftables_module, "NetlinkSets", refuse)
    with netns_group(PREFIX, 1) as (gw,):
        backend = NftablesBackend("igd", "wan0", netns=gw.name)
        with caplog.at_level(logging.WARNING):
            await backend.open()
        assert "plain mappings go through libnftables" in caplog.text
        await backend.apply([], [mapping(1)], now=NOW)
        assert await backend.entries() == {KernelEntry.of(mapping(1))}
        await backend.close(flush=True)


async def test_wan_host_connects_through_a_fast_path_mapping() -> None:
    with netns_group(PREFIX, 3) as (wan, gw, lan):
        lab_links(wan, gw, lan)
        server = lan.popen(sys.executable, "-c", SERVER)
        backend = NftablesBackend("igd", "ext0", netns=gw.name)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            the_lab = Lab(wan, gw, lan)
            await backend.open()
            await backend.set_destinations([IPv4Address(GATEWAY_WAN)])
            assert backend._sets is not None
            plain, only3 = mapping(18080), mapping(18081, remote=WAN3, internal_port=8081)
            await backend.apply([], [plain, only3], now=NOW)
            assert the_lab.connect(WAN2, 18080) == "8080 203.0.113.2"
            assert the_lab.connect(WAN3, 18081) == "8081 203.0.113.3"
            assert the_lab.connect(WAN2, 18081) == "error ConnectionRefusedError"
            await backend.apply([plain], [replace(plain, internal_port=8081)], now=NOW)
            assert the_lab.connect(WAN2, 18080) == "8081 203.0.113.2"
            await backend.apply([replace(plain, internal_port=8081)], [], now=NOW)
            assert the_lab.connect(WAN2, 18080) == "error ConnectionRefusedError"
        finally:
            await backend.close(flush=True)
            server.kill()
            server.communicate(timeout=5)
