"""The memory backend behaves like the kernel's maps, failures included."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.server.backends import Backend, BackendError, KernelEntry, ReconcileReport
from igd.server.backends.memory import MemoryBackend

LAN = IPv4Address("192.168.78.10")


def mapping(
    port: int, *, internal_port: int = 8080, remote: str | None = None, expires: float = 200.0
) -> Mapping:
    key = MappingKey(Protocol.TCP, port, IPv4Address(remote) if remote else None)
    return Mapping(key, LAN, internal_port, Owner(Mechanism.UPNP, LAN), 0.0, expires)


async def test_is_a_backend_and_applies_adds_and_removes() -> None:
    backend: Backend = MemoryBackend()
    await backend.open()
    a, b = mapping(1), mapping(2, remote="203.0.113.2")
    await backend.apply([], [a, b], now=0.0)
    assert await backend.entries() == {KernelEntry.of(a), KernelEntry.of(b)}
    await backend.apply([a], [], now=0.0)
    assert await backend.entries() == {KernelEntry.of(b)}


async def test_renewal_works_even_when_the_entry_is_missing() -> None:
    backend = MemoryBackend()
    old, new = mapping(1, expires=100.0), mapping(1, expires=500.0)
    await backend.apply([old], [new], now=50.0)
    assert await backend.entries() == {KernelEntry.of(new)}
    assert backend.timeouts[KernelEntry.of(new)] == 450 + 60


async def test_conflicting_add_fails_and_changes_nothing() -> None:
    backend = MemoryBackend()
    a = mapping(1)
    await backend.apply([], [a], now=0.0)
    with pytest.raises(BackendError):
        await backend.apply([], [mapping(2), mapping(1, internal_port=9)], now=0.0)
    assert await backend.entries() == {KernelEntry.of(a)}


async def test_fail_next_fails_once_and_changes_nothing() -> None:
    backend = MemoryBackend()
    backend.fail_next = BackendError("injected")
    with pytest.raises(BackendError, match="injected"):
        await backend.apply([], [mapping(1)], now=0.0)
    assert await backend.entries() == set()
    assert backend.transactions == 0
    await backend.apply([], [mapping(1)], now=0.0)
    assert backend.transactions == 1


async def test_reconcile_reports_orphans_and_missing() -> None:
    backend = MemoryBackend()
    keep, orphan, missing = mapping(1), mapping(2), mapping(3)
    await backend.apply([], [keep, orphan], now=0.0)
    report = await backend.reconcile([keep, missing], now=0.0)
    assert report == ReconcileReport(
        removed=(KernelEntry.of(orphan),), added=(KernelEntry.of(missing),)
    )
    assert await backend.entries() == {KernelEntry.of(keep), KernelEntry.of(missing)}


async def test_close_keeps_or_flushes() -> None:
    backend = MemoryBackend()
    await backend.apply([], [mapping(1)], now=0.0)
    await backend.close(flush=False)
    assert await backend.entries() == {KernelEntry.of(mapping(1))}
    await backend.close(flush=True)
    assert await backend.entries() == set()
