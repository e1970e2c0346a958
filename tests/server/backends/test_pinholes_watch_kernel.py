"""The IPv6 pinhole table survives another program's changes (root, a throwaway namespace)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from igd.model import Mechanism, Protocol
from igd.pinhole import (
    Pinhole,
    PinholeFilter,
    PinholeKey,
    PinholeOwner,
    PinholeRequest,
    PinholeRules,
)
from igd.server.backends.pinholes import NftPinholeBackend, entries_of
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import PinholeService
from tests.netns import Netns, netns

pytestmark = pytest.mark.lab

LAN = IPv6Network("2001:db8:0:77::/64")
HOST = IPv6Address("2001:db8:0:77::a")
OWNER = PinholeOwner(Mechanism.PCP, HOST, b"n" * 12)


@dataclass
class Gateway:
    ns: Netns
    backend: NftPinholeBackend
    service: PinholeService
    holes: list[Pinhole]


async def opened(service: PinholeService, port: int, *filters: PinholeFilter) -> Pinhole:
    request = PinholeRequest(PinholeKey(HOST, Protocol.TCP, port), OWNER, 600, filters=filters)
    hole = await service.open(request, now=time.monotonic())
    assert isinstance(hole, Pinhole)
    return hole


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    with netns("igdw6") as ns:
        backend = NftPinholeBackend("igd6", "wan0", [LAN], netns=ns.name)
        service = PinholeService(PinholeRules((LAN,)), backend, PinholeStore(Path(":memory:")))
        await service.restore(now=time.monotonic())
        task = asyncio.create_task(service.watch_kernel())
        await asyncio.sleep(0.2)  # subscribed
        filtered = PinholeFilter(IPv6Network("2001:db8:0:1::/64"), 0)
        holes = [await opened(service, 8080), await opened(service, 9000, filtered)]
        try:
            yield Gateway(ns, backend, service, holes)
        finally:
            task.cancel()
            await service.stop(flush=True)


async def repaired(gw: Gateway, restores: int) -> bool:
    """Whether the kernel holds every pinhole and the default deny again (bounded wait)."""
    wanted = {entry for hole in gw.holes for entry in entries_of(hole)}
    for _ in range(60):
        if gw.service.kernel_restores >= restores:
            listing = gw.ns.run("nft", "list", "table", "ip6", "igd6", check=False)
            if listing.returncode == 0 and "@lan drop" in listing.stdout:
                if await gw.backend.entries() == wanted:
                    return True
        await asyncio.sleep(0.05)
    return False


async def test_own_changes_are_not_restored(gateway: Gateway) -> None:
    await opened(gateway.service, 8081)
    closed = await gateway.service.close(gateway.holes[0].key, OWNER, now=time.monotonic())
    assert closed is None
    gateway.ns.run("nft", "add", "table", "ip", "igd6")  # the same name in another family
    gateway.ns.run("nft", "delete", "table", "ip", "igd6")
    await asyncio.sleep(0.5)
    assert gateway.service.kernel_restores == 0 and gateway.backend.restores == 0


async def test_flush_ruleset_restores_the_table_and_every_pinhole(gateway: Gateway) -> None:
    gateway.ns.run("nft", "flush", "ruleset")
    assert await repaired(gateway, 1)
    assert gateway.service.kernel_restores == 1


async def test_deleting_the_table_restores_it(gateway: Gateway) -> None:
    gateway.ns.run("nft", "delete", "table", "ip6", "igd6")
    assert await repaired(gateway, 1)


async def test_deleting_one_pinhole_element_restores_it(gateway: Gateway) -> None:
    gateway.ns.run(
        "nft", "delete", "element", "ip6", "igd6", "pinholes", f"{{ {HOST} . tcp . 8080 }}"
    )
    assert await repaired(gateway, 1)
    # And a later open still commits (the lock was released, the table is usable).
    gateway.holes.append(await opened(gateway.service, 8082))
    assert await repaired(gateway, 1)
    assert gateway.service.kernel_restores == 1
