"""The NAT-PMP/PCP receiver's fairness: per-client queues served in turn, bounded per client."""

from __future__ import annotations

import asyncio
import tempfile
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from igd.gateway import Gateway
from igd.policy import Policy
from igd.server import pxp
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import InternalInterface
from igd.server.pxp import MAX_IN_FLIGHT_PER_CLIENT, PxpServer, RateLimiter
from igd.server.service import Service
from igd.server.store import LeaseStore

LAN = InternalInterface("br-lan", IPv4Address("192.168.77.1"), (IPv4Network("192.168.77.0/24"),))
FLOODER, GOOD = "192.168.77.20", "192.168.77.21"


class Recorder:
    """A NAT-PMP handler that notes whom it answers, in order."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def handle(self, data: bytes, client: IPv4Address) -> bytes | None:
        self.order.append(str(client))
        await asyncio.sleep(0)
        return None


async def serve(requests: list[str]) -> list[str]:
    handler = Recorder()
    with tempfile.TemporaryDirectory() as state:
        store = LeaseStore(Path(state) / "leases.sqlite")
        service = Service(Gateway(Policy.parse("")), MemoryBackend(), store)
        server = PxpServer([LAN], handler, None, RateLimiter(1e9, 10**9), service)  # type: ignore[arg-type]
        for client in requests:
            server.received(b"\x00\x00", (client, 5351), LAN)
        while server._tasks:
            await asyncio.gather(*list(server._tasks))
        server.close()
        store.close()
    return handler.order


async def test_a_client_asking_once_is_answered_after_one_round(monkeypatch: Any) -> None:
    monkeypatch.setattr(pxp, "MAX_ACTIVE", 1)
    order = await serve([FLOODER] * 12 + [GOOD])
    # In arrival order GOOD would come 13th; taking clients in turn it comes within a round.
    assert order.index(GOOD) <= 2
    assert order.count(FLOODER) == 12


async def test_a_client_holds_at_most_its_bound_of_waiting_requests(monkeypatch: Any) -> None:
    monkeypatch.setattr(pxp, "MAX_ACTIVE", 1)
    order = await serve([FLOODER] * (MAX_IN_FLIGHT_PER_CLIENT + 10) + [GOOD])
    assert order.count(FLOODER) == MAX_IN_FLIGHT_PER_CLIENT  # the rest dropped on arrival
    assert GOOD in order


@pytest.mark.parametrize("busy", [pxp.MAX_IN_FLIGHT, 2 * pxp.MAX_IN_FLIGHT - 1])
async def test_a_new_client_gets_a_slot_when_the_bound_is_reached(
    monkeypatch: Any, busy: int
) -> None:
    monkeypatch.setattr(pxp, "MAX_ACTIVE", 1)
    sources = [f"192.168.77.{100 + i % 100}" for i in range(busy)]
    monkeypatch.setattr(pxp, "MAX_IN_FLIGHT_PER_CLIENT", busy)
    order = await serve([*sources, GOOD, GOOD])
    assert order.count(GOOD) == 1  # its first request is taken, its second is over the bound
