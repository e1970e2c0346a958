"""Concurrent pinhole requests share one kernel and one store transaction, and a failed
batch refuses only the requests whose own commit fails (memory backend, SQLite store)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from igd.model import Mechanism, Protocol
from igd.pinhole import Pinhole, PinholeKey, PinholeOwner, PinholeRequest, PinholeRules, Refusal
from igd.policy import Policy
from igd.server.backends.pinholes import MemoryPinholeBackend, entries_of
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import CommitError, PinholeService

LAN = IPv6Network("2001:db8:0:77::/64")
A = IPv6Address("2001:db8:0:77::a")
POLICY = Policy.parse(
    '[defaults]\naction = "deny"\nmin_lease = 1\n\n'
    '[[rules]]\nname = "no telnet"\naction = "deny"\ninternal_ports = "23"\n\n'
    '[[rules]]\nname = "LAN"\naction = "allow"\nclients = ["2001:db8:0:77::/64"]\n'
)


def ask(port: int, lifetime: int = 600) -> PinholeRequest:
    owner = PinholeOwner(Mechanism.UPNP, A)
    return PinholeRequest(PinholeKey(A, Protocol.TCP, port), owner, lifetime)


async def make(tmp_path: Path) -> tuple[PinholeService, MemoryPinholeBackend, PinholeStore]:
    backend = MemoryPinholeBackend()
    store = PinholeStore(tmp_path / "leases")
    service = PinholeService(PinholeRules((LAN,)), backend, store, policy=POLICY)
    await service.restore(now=0.0)
    return service, backend, store


async def test_requests_of_one_loop_turn_share_one_transaction(tmp_path: Path) -> None:
    service, backend, store = await make(tmp_path)
    answers = await asyncio.gather(*(service.open(ask(p), now=1.0) for p in range(1000, 1010)))
    assert all(isinstance(a, Pinhole) for a in answers), answers[-1]
    assert service.batches == 1
    assert len(backend.held) == 10
    assert len(store.load(service._clock, now=2.0)) == 10


async def test_a_refused_request_does_not_hold_up_its_batch(tmp_path: Path) -> None:
    service, backend, _ = await make(tmp_path)
    answers = await asyncio.gather(*(service.open(ask(p), now=1.0) for p in (22, 23, 24)))
    assert answers[1] is Refusal.NOT_ALLOWED
    assert isinstance(answers[0], Pinhole) and isinstance(answers[2], Pinhole)
    assert {e for h in (answers[0], answers[2]) for e in entries_of(h)} == set(backend.held)


async def test_the_same_pinhole_twice_in_one_turn_ends_renewed(tmp_path: Path) -> None:
    service, backend, store = await make(tmp_path)
    first, second = await asyncio.gather(
        service.open(ask(5000, 600), now=1.0), service.open(ask(5000, 900), now=1.0)
    )
    assert isinstance(first, Pinhole) and isinstance(second, Pinhole)
    assert first.uid == second.uid and second.expires == 901.0
    assert list(backend.held.values()) == [901.0]
    assert [h.expires for h in store.load(service._clock, now=2.0)] == [901.0]


async def test_a_failed_batch_refuses_only_the_request_whose_own_commit_fails(
    tmp_path: Path,
) -> None:
    service, backend, store = await make(tmp_path)
    backend.fail_next = 2  # the batch, then the first request retried alone
    answers = await asyncio.gather(
        *(service.open(ask(p), now=1.0) for p in (7000, 7001, 7002)), return_exceptions=True
    )
    assert isinstance(answers[0], CommitError)
    assert all(isinstance(a, Pinhole) for a in answers[1:])
    opened = {e for a in answers[1:] if isinstance(a, Pinhole) for e in entries_of(a)}
    assert set(backend.held) == opened
    assert sorted(h.key.internal_port for h in service.pinholes()) == [7001, 7002]
    assert sorted(h.key.internal_port for h in store.load(service._clock, now=2.0)) == [7001, 7002]


async def test_a_lone_request_fails_cleanly(tmp_path: Path) -> None:
    service, backend, store = await make(tmp_path)
    backend.fail_next = 1
    with pytest.raises(CommitError):
        await service.open(ask(8000), now=1.0)
    assert service.pinholes() == [] and backend.held == {}
    assert store.load(service._clock, now=2.0) == []


async def test_an_unexpected_backend_error_refuses_its_batch_and_later_requests_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, backend, _ = await make(tmp_path)
    apply = backend.apply

    async def broken(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(backend, "apply", apply)
        raise RuntimeError("bug")

    monkeypatch.setattr(backend, "apply", broken)
    answers = await asyncio.gather(
        *(service.open(ask(p), now=1.0) for p in (9000, 9001)), return_exceptions=True
    )
    assert all(isinstance(a, CommitError) for a in answers)
    assert service.pinholes() == [] and backend.held == {}
    assert isinstance(await service.open(ask(9002), now=2.0), Pinhole)


async def test_a_request_whose_caller_left_before_its_batch_opens_nothing(
    tmp_path: Path,
) -> None:
    service, backend, store = await make(tmp_path)
    gone = asyncio.create_task(service.open(ask(6000), now=1.0))
    await asyncio.sleep(0)  # queued, the drainer not run yet
    gone.cancel()
    kept = await service.open(ask(6001), now=1.0)
    assert gone.cancelled() and isinstance(kept, Pinhole)
    assert [h.key.internal_port for h in service.pinholes()] == [6001]
    assert set(backend.held) == set(entries_of(kept))
    assert [h.key.internal_port for h in store.load(service._clock, now=2.0)] == [6001]
