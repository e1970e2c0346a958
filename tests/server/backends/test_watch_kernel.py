"""The ruleset watcher against the real kernel (root, a throwaway namespace)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from igd.model import Protocol
from igd.server.backends import KernelEntry, nft_payload
from igd.server.backends.nftables import NftablesBackend
from tests.netns import Netns, netns
from tests.server.backends.nftlab import NOW, WAN2, mapping, only

pytestmark = pytest.mark.lab


@pytest.fixture
async def watched() -> AsyncIterator[tuple[Netns, NftablesBackend, list[str]]]:
    with netns("igdwt") as ns:
        backend = NftablesBackend("igd", "wan0", netns=ns.name)
        await backend.open()
        seen: list[str] = []

        async def restore(reason: str) -> None:
            seen.append(reason)

        task = asyncio.create_task(backend.watch(restore))
        await asyncio.sleep(0.2)  # subscribed
        try:
            yield ns, backend, seen
        finally:
            task.cancel()
            await backend.close(flush=True)


async def test_own_changes_and_kernel_expiry_are_not_losses(
    watched: tuple[Netns, NftablesBackend, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ns, backend, seen = watched
    monkeypatch.setattr(nft_payload, "KERNEL_GRACE", 1)
    short = mapping(1, lease=0.0)  # kernel timeout: 1 s
    await backend.apply([], [mapping(2), short], now=NOW)  # fast path, from the loop
    await backend.apply([], [mapping(3, filters=(only("203.0.113.0/24"),))], now=NOW)
    await backend.open()  # libnftables, from the worker: flushes and rewrites our chains
    await asyncio.sleep(2.5)  # `short` expires in the kernel meanwhile
    assert "tcp . 1 " not in ns.run("nft", "list", "map", "ip", "igd", "portmap").stdout
    assert seen == []
    assert backend.restores == 0


async def test_another_program_deleting_the_table_or_an_element_is_reported_once(
    watched: tuple[Netns, NftablesBackend, list[str]],
) -> None:
    ns, backend, seen = watched
    await backend.apply([], [mapping(2)], now=NOW)
    ns.run("nft", "delete", "element", "ip", "igd", "portmap", "{ tcp . 2 }")
    ns.run("nft", "add", "table", "ip", "other")  # not ours: ignored
    ns.run("nft", "flush", "ruleset")
    for _ in range(50):
        if len(seen) >= 2:
            break
        await asyncio.sleep(0.05)
    assert seen[0].startswith("element deleted by nft (pid ")
    assert seen[1].startswith("the table deleted by nft")
    await asyncio.sleep(0.2)
    assert len(seen) == 2 and backend.restores == 2


async def test_restore_puts_every_mapping_back_once_however_many() -> None:
    filtered = mapping(1, filters=(only("203.0.113.0/24"),))
    peer = mapping(2, protocol=Protocol.UDP, remote=WAN2, internal_port=4000, peer_port=7)
    plain = [mapping(port) for port in range(10, 10_010)]
    wanted = [filtered, peer, *plain]
    with netns("igdwr") as ns:
        backend = NftablesBackend("igd", "wan0", netns=ns.name)
        await backend.open()
        await backend.reconcile(wanted, now=NOW)
        done = asyncio.Event()

        async def restore(reason: str) -> None:
            await backend.restore(wanted, now=NOW)
            done.set()

        task = asyncio.create_task(backend.watch(restore))
        try:
            await asyncio.sleep(0.2)
            ns.run("nft", "flush", "ruleset")
            await asyncio.wait_for(done.wait(), 30)
            # 20,000 elements written back notify 20,000 times, enough to overflow the
            # watcher's buffer: that is our own doing, not another loss.
            await asyncio.sleep(1.0)
            assert backend.restores == 1
            assert await backend.entries() == {KernelEntry.of(m) for m in wanted}
            # FILTERs are judged again: the admit chain was rewritten for the one shape in
            # use (a /24 of any port), one lookup.
            admit = ns.run("nft", "list", "chain", "ip", "igd", "admit").stdout
            assert admit.count("@allowed") == 1 and "th sport & 0 " in admit
        finally:
            task.cancel()
            await backend.close(flush=True)
