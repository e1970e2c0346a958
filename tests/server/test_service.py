"""The commit pipeline and expiry timer, with the memory backend and a controlled clock."""

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from igd.decision import Reason
from igd.events import (
    CommitFailed,
    ExternalAddressChanged,
    MappingGranted,
    MappingRemoved,
    MappingRenewed,
    RemovalCause,
    RequestRefused,
)
from igd.gateway import Gateway, Granted, Refused
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Owner, Protocol
from igd.policy import Policy
from igd.server.backends import BackendError
from igd.server.backends.memory import MemoryBackend
from igd.server.service import Service
from igd.server.store import Clock, LeaseStore

CLIENT = IPv4Address("192.168.1.10")
OTHER = IPv4Address("192.168.1.11")
ALLOW = '[defaults]\naction = "allow"\nmin_lease = 1\n'


def mapping(port: int, expires: float) -> Mapping:
    return Mapping(
        MappingKey(Protocol.TCP, port), CLIENT, port, Owner(Mechanism.PCP, CLIENT), 0.0, expires
    )


def request(port: int, lifetime: int = 600) -> MapRequest:
    return MapRequest(Mechanism.NATPMP, CLIENT, Protocol.TCP, CLIENT, port, port, lifetime)


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


async def test_requests_of_one_loop_turn_share_a_transaction(tmp_path: Path) -> None:
    # A kernel that answers inside send() (netlink) never suspends a commit: without the
    # turn rule every concurrent request would still pay a transaction of its own.
    backend = MemoryBackend()
    service = Service(Gateway(Policy.parse(ALLOW)), backend, LeaseStore(tmp_path / "l"))
    committer = asyncio.create_task(service.run_committer())
    results = await asyncio.gather(*(service.map(request(2000 + i)) for i in range(50)))
    committer.cancel()
    assert all(isinstance(r, Granted) for r in results)
    assert len(await backend.entries()) == 50
    assert backend.transactions == 1  # the turn's first leads, the other 49 join it
    assert service.committer.batches == 1
    # One task's requests one after another each go alone: nobody else can join them.
    for i in range(3):
        assert isinstance(await service.map(request(3000 + i)), Granted)
    assert backend.transactions == 4


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
    # The three are merged, fail together, and are then retried one by one.
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


async def test_every_outcome_is_published_as_an_event(tmp_path: Path) -> None:
    backend = MemoryBackend()
    service = Service(Gateway(Policy.parse(ALLOW)), backend, LeaseStore(tmp_path / "l"))
    feed = service.subscribe("test")
    granted = await service.map(request(5000))
    renewed = await service.map(request(5000, lifetime=900))
    assert isinstance(granted, Granted) and isinstance(renewed, Granted)
    events, lost = feed.take()
    assert lost == 0
    assert events == [
        MappingGranted(granted.mapping, request(5000), "defaults", ()),
        MappingRenewed(renewed.mapping, granted.mapping, request(5000, lifetime=900), "defaults"),
    ]
    backend.fail_next = BackendError("kernel said no")
    failed = await service.map(request(5001))
    assert isinstance(failed, Refused) and failed.deny.reason is Reason.BACKEND_FAILURE
    commit_failed, refused = feed.take()[0]
    assert isinstance(commit_failed, CommitFailed) and commit_failed.error == "kernel said no"
    assert refused == RequestRefused(
        request(5001), Reason.BACKEND_FAILURE, "gateway", "kernel said no"
    )
    await service.remove(service.mappings_of(CLIENT), why="test")
    assert feed.take()[0] == [MappingRemoved(renewed.mapping, RemovalCause.CLIENT)]


async def test_removals_carry_their_cause(tmp_path: Path) -> None:
    clock = [100.0]
    service = Service(
        Gateway(Policy.parse(ALLOW)),
        MemoryBackend(),
        LeaseStore(tmp_path / "l"),
        clock=lambda: clock[0],
    )
    for port in (6000, 6001, 6002, 6003):
        await service.map(request(port, lifetime=10 if port == 6000 else 600))
    other = replace(request(6004), mechanism=Mechanism.PCP, client=OTHER, internal_address=OTHER)
    await service.map(other)
    feed = service.subscribe("test", kinds=(MappingRemoved,))
    clock[0] += 20
    assert await service.expire()
    stricter = Policy.parse(
        ALLOW + '[[rules]]\nname = "no 6001"\naction = "deny"\ninternal_ports = "6001"\n'
    )
    await service.reload(stricter)
    deleted = await service.delete(MappingKey(Protocol.TCP, 6002))
    assert deleted is not None and await service.delete(MappingKey(Protocol.TCP, 6002)) is None
    flushed = await service.flush(client=OTHER)
    assert [m.owner.client for m in flushed.removed] == [OTHER]
    causes = [(e.mapping.external_port, e.cause) for e in feed.take()[0]]  # type: ignore[union-attr]
    assert causes == [
        (6000, RemovalCause.EXPIRED),
        (6001, RemovalCause.POLICY_RELOAD),
        (6002, RemovalCause.ADMIN),
        (6004, RemovalCause.ADMIN),
    ]
    assert [m.external_port for m in service.mappings()] == [6003]
    await service.flush()
    assert service.count() == 0


async def test_an_address_change_starts_an_epoch_and_is_published(tmp_path: Path) -> None:
    service = Service(Gateway(Policy.parse(ALLOW)), MemoryBackend(), LeaseStore(tmp_path / "l"))
    feed = service.subscribe("test")
    service.epoch_start -= 1000
    new = IPv4Address("203.0.113.9")
    service.address_changed(None, new)
    assert service.epoch() < 5
    assert feed.take() == ([ExternalAddressChanged(None, new)], 0)


async def test_a_failed_removal_keeps_the_mapping_everywhere(tmp_path: Path) -> None:
    backend = MemoryBackend()
    store = LeaseStore(tmp_path / "l")
    service = Service(Gateway(Policy.parse(ALLOW)), backend, store)
    await service.map(request(7000))
    backend.fail_next = BackendError("kernel said no")
    with pytest.raises(BackendError):
        await service.remove(service.mappings_of(CLIENT), why="test")
    assert [m.external_port for m in service.mappings()] == [7000]
    assert {e.external_port for e in await backend.entries()} == {7000}
    assert [m.external_port for m in store.load(Clock(), now=service.now())] == [7000]
