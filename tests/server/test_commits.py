"""Commits cannot split table, kernel and lease store: a stateful property test.

Each step runs a burst of concurrent requests (NAT-PMP-style grants, exact-port UPnP-style
grants, deletions, expiry with time passing) as asyncio tasks, while the kernel (a
MemoryBackend that yields between calls) and the lease store fail when the drawn plan says
so, undo included. After every burst: the kernel holds exactly the table's mappings, the
store holds them too once it takes writes again, and every request answered "granted" whose
mapping nothing removed in the burst still has it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from igd.gateway import Gateway, Granted
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Protocol
from igd.policy import Policy
from igd.server.backends import BackendError, KernelEntry
from igd.server.backends.memory import MemoryBackend
from igd.server.service import Service
from igd.server.store import Clock, LeaseStore

POLICY = '[defaults]\naction = "allow"\nmin_lease = 1\nmax_mappings_per_client = 100\n'
CLIENTS = [IPv4Address("192.168.1.10"), IPv4Address("192.168.1.11")]
PORTS = [5000, 5001, 5002]


class FlakyBackend(MemoryBackend):
    """A kernel that takes a few loop turns per call and refuses calls as planned."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: deque[bool] = deque()
        self.yields: deque[int] = deque()

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        for _ in range(self.yields.popleft() if self.yields else 0):
            await asyncio.sleep(0)
        if self.plan and self.plan.popleft():
            raise BackendError("planned kernel failure")
        await super().apply(removed, added, now=now)


class FlakyStore(LeaseStore):
    """A lease store that refuses writes as planned (a full disk, an I/O error)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.plan: deque[bool] = deque()

    def replace(
        self, keys: Iterable[MappingKey], mappings: Iterable[Mapping], clock: Clock
    ) -> None:
        if self.plan and self.plan.popleft():
            raise OSError("planned store failure")
        super().replace(keys, mappings, clock)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Op:
    kind: str  # "map", "exact", "delete", "expire"
    client: int = 0
    port: int = 0
    lifetime: int = 0
    advance: float = 0.0


ops = st.one_of(
    st.builds(
        Op,
        st.just("map"),
        st.integers(0, 1),
        st.sampled_from(PORTS),
        st.sampled_from([5, 300]),
    ),
    st.builds(
        Op,
        st.just("exact"),
        st.integers(0, 1),
        st.sampled_from(PORTS),
        st.sampled_from([5, 300]),
    ),
    st.builds(Op, st.just("delete"), st.integers(0, 1), st.sampled_from(PORTS)),
    st.builds(Op, st.just("expire"), advance=st.sampled_from([0.0, 3.0, 10.0])),
)


def request(op: Op) -> MapRequest:
    client = CLIENTS[op.client]
    exact = op.kind == "exact"
    return MapRequest(
        mechanism=Mechanism.UPNP if exact else Mechanism.NATPMP,
        client=client,
        protocol=Protocol.TCP,
        internal_address=client,
        internal_port=op.port,
        external_port=op.port,
        lifetime=op.lifetime,
        exact_port=exact,
    )


def row(mapping: Mapping) -> tuple[object, ...]:
    """What the store must agree on: everything but the clock conversion of the times."""
    return (
        mapping.key,
        mapping.internal_address,
        mapping.internal_port,
        mapping.owner,
        round(mapping.expires - mapping.created, 3),
    )


class CommitMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.backend = FlakyBackend()
        self.store = FlakyStore(Path(":memory:"))
        self.clock = FakeClock()
        self.service = Service(
            Gateway(Policy.parse(POLICY)), self.backend, self.store, clock=self.clock
        )
        self.committer = self.loop.create_task(self.service.run_committer())

    def teardown(self) -> None:
        self.committer.cancel()
        self.loop.run_until_complete(asyncio.gather(self.committer, return_exceptions=True))
        self.loop.close()
        self.store.close()

    @rule(
        burst=st.lists(ops, min_size=1, max_size=6),
        kernel_plan=st.lists(st.booleans(), max_size=8),
        store_plan=st.lists(st.booleans(), max_size=4),
        yields=st.lists(st.integers(0, 3), max_size=8),
    )
    def concurrent_burst(
        self, burst: list[Op], kernel_plan: list[bool], store_plan: list[bool], yields: list[int]
    ) -> None:
        self.backend.plan.extend(kernel_plan)
        self.store.plan.extend(store_plan)
        self.backend.yields.extend(yields)
        results = self.loop.run_until_complete(self._run(burst))
        # Failures stop: the committer must be idle, and stale store rows can be rewritten.
        self.backend.plan.clear()
        self.store.plan.clear()
        assert self.service.committer.idle
        assert self.service.committer.repair_store()
        # Deleted in the burst, or renewed (by any request in it) to a lease that has ended.
        gone = {(op.client, op.port) for op in burst if op.kind == "delete"}
        gone |= {
            (op.client, op.port)
            for op, result in zip(burst, results, strict=True)
            if isinstance(result, Granted) and result.mapping.expires <= self.clock.now
        }
        for op, result in zip(burst, results, strict=True):
            if not isinstance(result, Granted) or (op.client, op.port) in gone:
                continue
            # Answered "granted" and nothing in the burst removed it: the client holds it
            # (possibly renewed by a retransmission in the same burst).
            holder = self.service.holder(result.mapping.key)
            assert holder is not None, (op, result.mapping)
            assert (holder.owner.client, holder.internal_port) == (CLIENTS[op.client], op.port)

    async def _run(self, burst: list[Op]) -> list[object]:
        async def one(op: Op) -> object:
            if op.kind in ("map", "exact"):
                return await self.service.map(request(op))
            if op.kind == "delete":
                client = CLIENTS[op.client]
                doomed = self.service.at_internal(client, Protocol.TCP, op.port)
                try:
                    return await self.service.remove(doomed, why="test")
                except BackendError as error:
                    return error
            self.clock.now += op.advance
            return await self.service.expire()

        return list(await asyncio.gather(*(one(op) for op in burst)))

    @invariant()
    def table_kernel_and_store_agree(self) -> None:
        table = list(self.service.mappings())
        kernel = self.loop.run_until_complete(self.backend.entries())
        assert kernel == {KernelEntry.of(m) for m in table}
        stored = self.store.load(Clock(), now=-1e12)  # nothing counts as expired
        assert sorted(map(row, stored), key=repr) == sorted(map(row, table), key=repr)
        keys: set[MappingKey] = {m.key for m in table}
        assert len(keys) == len(table)


TestCommits = CommitMachine.TestCase
TestCommits.settings = settings(
    max_examples=150,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class GatedBackend(MemoryBackend):
    """Holds the next call until the test opens the gate, then fails it if told to."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.fail_at_gate = False

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            await gate.wait()
            if self.fail_at_gate:
                raise BackendError("kernel said no")
        await super().apply(removed, added, now=now)


async def agree(service: Service, backend: MemoryBackend) -> None:
    assert await backend.entries() == {KernelEntry.of(m) for m in service.mappings()}


async def test_a_retransmission_during_a_failing_commit_is_not_lost(tmp_path: Path) -> None:
    backend = GatedBackend()
    service = Service(Gateway(Policy.parse(POLICY)), backend, LeaseStore(tmp_path / "l"))
    committer = asyncio.create_task(service.run_committer())
    gate = backend.gate = asyncio.Event()
    backend.fail_at_gate = True
    ask = request(Op("map", 0, 5000, 300))
    first = asyncio.create_task(service.map(ask))
    await asyncio.sleep(0)  # its commit is under way, held at the gate
    again = asyncio.create_task(service.map(ask))  # renews the uncommitted grant
    await asyncio.sleep(0)
    gate.set()  # the first commit fails
    results = await asyncio.gather(first, again)
    committer.cancel()
    assert [type(r).__name__ for r in results] == ["Refused", "Granted"]
    assert isinstance(results[1], Granted)
    assert service.holder(results[1].mapping.key) == results[1].mapping
    await agree(service, backend)


async def test_a_failed_removal_does_not_clobber_the_port_someone_took(tmp_path: Path) -> None:
    backend = GatedBackend()
    service = Service(Gateway(Policy.parse(POLICY)), backend, LeaseStore(tmp_path / "l"))
    committer = asyncio.create_task(service.run_committer())
    held = await service.map(request(Op("exact", 0, 5000, 300)))
    assert isinstance(held, Granted)
    gate = backend.gate = asyncio.Event()
    backend.fail_at_gate = True
    removal = asyncio.create_task(service.remove([held.mapping], why="test"))
    await asyncio.sleep(0)  # the removal's commit is held at the gate
    taker = asyncio.create_task(service.map(request(Op("exact", 1, 5000, 300))))
    await asyncio.sleep(0)  # the freed port is granted to the other client, queued
    gate.set()
    removed, taken = await asyncio.gather(removal, taker, return_exceptions=True)
    committer.cancel()
    assert isinstance(removed, BackendError) and isinstance(taken, Granted)
    assert service.holder(taken.mapping.key) == taken.mapping
    await agree(service, backend)
