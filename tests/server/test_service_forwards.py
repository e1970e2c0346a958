"""Forwards through the service: reloads commit only the difference in one transaction, the
store follows, a restart takes them from the policy file, `until` removes them."""

import asyncio
import time
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path

from igd.events import MappingGranted, MappingRemoved, RemovalCause
from igd.gateway import Gateway
from igd.model import MappingKey, Protocol
from igd.policy import Policy
from igd.server.backends.memory import MemoryBackend
from igd.server.service import Service
from igd.server.store import Clock, LeaseStore

POLICY = """
[[forwards]]
name = "portal"
protocols = ["tcp"]
external_ports = "443"
internal_address = "192.168.1.100"
internal_port = 8443
remote_hosts = ["198.51.100.0/24"]

[[forwards]]
name = "ssh"
protocols = ["tcp"]
external_ports = "2222"
internal_address = "192.168.1.101"
internal_port = 22
"""
PORTAL = MappingKey(Protocol.TCP, 443)
SSH = MappingKey(Protocol.TCP, 2222)


async def started(tmp_path: Path, text: str = POLICY) -> tuple[Service, MemoryBackend]:
    backend = MemoryBackend()
    service = Service(Gateway(Policy.parse(text)), backend, LeaseStore(tmp_path / "leases"))
    service.restore([], recheck=None, now=service.now())
    await service.reconcile(now=service.now(), audit_limit=100)
    return service, backend


async def test_reload_swaps_a_changed_forward_in_one_transaction(tmp_path: Path) -> None:
    service, backend = await started(tmp_path)
    entries = {e.external_port: e for e in await backend.entries()}
    assert set(entries) == {443, 2222}
    before = backend.transactions
    changed = POLICY.replace("internal_port = 22\n", "internal_port = 2022\n")
    await service.reload(Policy.parse(changed))
    assert backend.transactions == before + 1
    after = {e.external_port: e for e in await backend.entries()}
    assert after[443] == entries[443]  # the unchanged forward's element is untouched
    assert after[2222].internal_port == 2022
    await service.reload(Policy.parse(changed))
    assert backend.transactions == before + 1  # nothing changed, nothing committed
    await service.reload(Policy.parse(changed.split('[[forwards]]\nname = "ssh"')[0]))
    assert [e.external_port for e in await backend.entries()] == [443]


async def test_forwards_come_from_the_policy_at_restart(tmp_path: Path) -> None:
    service, _ = await started(tmp_path)
    now = service.now()
    persisted = service.store.load(Clock(), now=now)
    assert {m.key for m in persisted} == {PORTAL, SSH}  # the store holds them as well
    renamed = POLICY.replace('name = "ssh"', 'name = "shell"').replace("2222", "2223")
    backend = MemoryBackend()
    again = Service(Gateway(Policy.parse(renamed)), backend, service.store)
    again.restore(persisted, recheck=None, now=now)
    assert sorted(m.description for m in again.mappings()) == ["portal", "shell"]
    stored = again.store.load(Clock(), now=now)
    assert sorted(m.external_port for m in stored) == [443, 2223]


async def test_until_removes_the_forward_when_reached(tmp_path: Path) -> None:
    soon = datetime.fromtimestamp(time.time() + 0.3, UTC).isoformat()
    service, backend = await started(tmp_path, POLICY + f'until = "{soon}"\n')
    removals = service.subscribe("test", kinds=(MappingRemoved,))
    expiry = asyncio.create_task(service.run_expiry())
    try:
        events, _ = await asyncio.wait_for(removals.next(), 5)
    finally:
        expiry.cancel()
    (event,) = events
    assert isinstance(event, MappingRemoved)
    assert event.cause is RemovalCause.EXPIRED
    assert event.mapping.description == "ssh"
    assert [e.external_port for e in await backend.entries()] == [443]


async def test_reload_reports_installed_forwards_on_the_feed(tmp_path: Path) -> None:
    service, _ = await started(tmp_path)
    feed = service.subscribe("test", kinds=(MappingGranted, MappingRemoved))
    await service.reload(
        Policy.parse(POLICY.replace("internal_port = 22\n", "internal_port = 23\n"))
    )
    events, _ = feed.take()
    assert [(type(e).__name__, e.mapping.internal_port) for e in events] == [
        ("MappingRemoved", 22),
        ("MappingGranted", 23),
    ]
    granted = events[1]
    assert isinstance(granted, MappingGranted) and granted.rule == "forward 'ssh'"


async def test_a_forward_kept_out_by_the_addresses_returns_when_they_change(
    tmp_path: Path,
) -> None:
    service, backend = await started(tmp_path)
    server = IPv4Address("192.168.1.101")
    await service.readdress(frozenset({server}))  # the ssh target is now the gateway's own
    assert [e.external_port for e in await backend.entries()] == [443]
    await service.readdress(frozenset({IPv4Address("192.168.1.1")}))
    assert sorted(e.external_port for e in await backend.entries()) == [443, 2222]


async def test_restart_under_another_policy_installs_the_forwards_once(tmp_path: Path) -> None:
    service, _ = await started(tmp_path)
    now = service.now()
    persisted = service.store.load(Clock(), now=now)
    again = Service(Gateway(Policy.parse(POLICY)), MemoryBackend(), service.store)
    dropped, refused = again.restore(persisted, recheck=again.gateway.policy, now=now)
    assert sorted(m.description for m in dropped) == ["portal", "ssh"]  # the stored copies
    assert refused.removed == ()
    assert sorted(m.description for m in again.mappings()) == ["portal", "ssh"]
    assert len(again.store.load(Clock(), now=now)) == 2
