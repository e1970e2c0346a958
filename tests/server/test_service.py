"""The commit pipeline and expiry timer, with the memory backend and a controlled clock."""

import asyncio
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


async def test_concurrent_requests_share_transactions(tmp_path: Path) -> None:
    backend = MemoryBackend()
    service = Service(Gateway(Policy.parse(ALLOW)), backend, LeaseStore(tmp_path / "l"))
    committer = asyncio.create_task(service.run_committer())
    results = await asyncio.gather(*(service.map(request(2000 + i)) for i in range(50)))
    committer.cancel()
    assert all(isinstance(r, Granted) for r in results)
    assert len(await backend.entries()) == 50
    assert backend.transactions < 50


async def test_failed_batch_refuses_only_the_failing_request(tmp_path: Path) -> None:
    backend = MemoryBackend()
    service = Service(Gateway(Policy.parse(ALLOW)), backend, LeaseStore(tmp_path / "l"))
    backend.fail_next = BackendError("one bad element")
    committer = asyncio.create_task(service.run_committer())
    results = await asyncio.gather(service.map(request(3000)), service.map(request(3001)))
    committer.cancel()
    # The merged transaction failed once; each was then retried alone and both went in.
    assert [type(r) for r in results] == [Granted, Granted]
    assert len(await backend.entries()) == 2
    backend.fail_next = BackendError("again")
    committer = asyncio.create_task(service.run_committer())
    lone = await service.map(request(3002))
    committer.cancel()
    assert isinstance(lone, Refused) and len(service.gateway.table) == 2


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
