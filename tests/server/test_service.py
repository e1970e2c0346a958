"""The commit pipeline and expiry timer, with the memory backend and a controlled clock."""

import asyncio
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path

from igd.gateway import Change, Gateway, Granted, Refused
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Owner, Protocol
from igd.policy import Policy
from igd.server.backends import BackendError
from igd.server.backends.memory import MemoryBackend
from igd.server.service import Service, merge
from igd.server.store import Clock, LeaseStore

CLIENT = IPv4Address("192.168.1.10")
ALLOW = '[defaults]\naction = "allow"\nmin_lease = 1\n'


def mapping(port: int, expires: float) -> Mapping:
    return Mapping(
        MappingKey(Protocol.TCP, port), CLIENT, port, Owner(Mechanism.PCP, CLIENT), 0.0, expires
    )


def request(port: int, lifetime: int = 600) -> MapRequest:
    return MapRequest(Mechanism.NATPMP, CLIENT, Protocol.TCP, CLIENT, port, port, lifetime)


def test_merge_nets_out_changes_in_order() -> None:
    a1, a2, b = mapping(1, 10), mapping(1, 20), mapping(2, 10)
    net = merge([Change((), (a1,)), Change((a1,), (a2,)), Change((), (b,)), Change((b,), ())])
    assert net == Change((), (a2,))
    renewal = merge([Change((a1,), (a2,))])
    assert renewal == Change((a1,), (a2,))


class SlowBackend(MemoryBackend):
    """Takes a moment per transaction, as a kernel call on another thread does."""

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        await asyncio.sleep(0.001)
        await super().apply(removed, added, now=now)


async def test_concurrent_requests_share_transactions(tmp_path: Path) -> None:
    backend = SlowBackend()
    service = Service(Gateway(Policy.parse(ALLOW)), backend, LeaseStore(tmp_path / "l"))
    committer = asyncio.create_task(service.run_committer())
    results = await asyncio.gather(*(service.map(request(2000 + i)) for i in range(50)))
    committer.cancel()
    assert all(isinstance(r, Granted) for r in results)
    assert len(await backend.entries()) == 50
    assert backend.transactions < 50


class FailsMergedBatchesOnce(SlowBackend):
    """Refuses the first transaction that carries more than one new mapping."""

    def __init__(self) -> None:
        super().__init__()
        self.refused_batches = 0

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        if len(added) > 1 and not self.refused_batches:
            self.refused_batches += 1
            raise BackendError("one bad element in the batch")
        await super().apply(removed, added, now=now)


async def test_failed_batch_is_retried_change_by_change(tmp_path: Path) -> None:
    backend = FailsMergedBatchesOnce()
    service = Service(Gateway(Policy.parse(ALLOW)), backend, LeaseStore(tmp_path / "l"))
    committer = asyncio.create_task(service.run_committer())
    # The first goes straight in; the next two wait, are merged, fail together, and are
    # then retried one by one.
    results = await asyncio.gather(*(service.map(request(3000 + i)) for i in range(3)))
    committer.cancel()
    assert [type(r) for r in results] == [Granted, Granted, Granted]
    assert backend.refused_batches == 1
    assert len(await backend.entries()) == 3


async def test_a_failing_change_alone_is_refused_and_rolled_back(tmp_path: Path) -> None:
    backend = MemoryBackend()
    service = Service(Gateway(Policy.parse(ALLOW)), backend, LeaseStore(tmp_path / "l"))
    backend.fail_next = BackendError("kernel said no")
    lone = await service.map(request(3002))
    assert isinstance(lone, Refused) and len(service.gateway.table) == 0
    assert await backend.entries() == set()


async def test_expiry_removes_from_kernel_and_store(tmp_path: Path) -> None:
    backend = MemoryBackend()
    store = LeaseStore(tmp_path / "l")
    service = Service(Gateway(Policy.parse(ALLOW)), backend, store)
    tasks = [
        asyncio.create_task(service.run_committer()),
        asyncio.create_task(service.run_expiry()),
    ]
    await service.map(request(4001, lifetime=500))
    await service.map(request(4000, lifetime=1))  # an earlier deadline re-arms the timer
    for _ in range(300):
        await asyncio.sleep(0.01)
        if len(service.gateway.table) == 1:
            break
    for task in tasks:
        task.cancel()
    assert [m.external_port for m in service.gateway.table] == [4001]
    assert {e.external_port for e in await backend.entries()} == {4001}
    assert [m.external_port for m in store.load(Clock(), now=service.now())] == [4001]
