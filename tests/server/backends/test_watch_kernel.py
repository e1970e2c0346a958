"""The ruleset watcher against the real kernel (root, a throwaway namespace)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from igd.server.backends import nft_payload
from igd.server.backends.nftables import NftablesBackend
from tests.netns import Netns, netns
from tests.server.backends.nftlab import NOW, mapping, only

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
