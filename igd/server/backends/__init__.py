"""Backends execute the mapping table's changes: nftables in the kernel, or memory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol as TypingProtocol

from igd.model import Mapping, MappingKey, Protocol, RemoteFilter


class BackendError(RuntimeError):
    """The backend could not apply a change; nothing of that change took effect."""


@dataclass(frozen=True, slots=True)
class KernelEntry:
    """What the data plane holds for one mapping: the forwarding, without lease bookkeeping."""

    protocol: Protocol
    external_port: int
    remote_host: IPv4Address | None
    internal_address: IPv4Address
    internal_port: int
    filters: tuple[RemoteFilter, ...] = ()
    """Remote peers allowed in (sorted); empty admits everyone."""
    peer_port: int = 0
    """Non-zero for a PCP PEER entry: outbound traffic from the internal endpoint to
    remote_host:peer_port leaves with external_port (SNAT)."""
    external_address: IPv4Address | None = None
    """One of network.external_addresses, whose packets alone it takes; None: the default
    address (and its aliases, the `destinations` set)."""

    @classmethod
    def of(cls, mapping: Mapping) -> KernelEntry:
        """The entry a mapping needs."""
        return cls(
            mapping.protocol,
            mapping.external_port,
            mapping.key.remote_host,
            mapping.internal_address,
            mapping.internal_port,
            tuple(sorted(mapping.filters)),
            mapping.peer_port,
            mapping.external_address,
        )


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What reconciling the kernel with the lease store changed."""

    removed: tuple[KernelEntry, ...]
    """Orphans: entries in the kernel that no mapping wants."""
    added: tuple[KernelEntry, ...]
    """Entries mappings want that the kernel lacked."""
    audited: bool = True
    """False when the kernel was not read first (a large table is replaced without listing
    it): the two tuples are then empty, not a claim that nothing changed."""


class Backend(TypingProtocol):
    """The interface every backend implements; all methods are safe to await on the loop."""

    async def open(self) -> None:
        """Create what the backend owns (the nftables table and maps); idempotent."""

    async def set_destinations(self, addresses: Iterable[IPv4Address]) -> None:
        """Translate only packets addressed to these (the external interface's addresses
        and configured extras); called at start and whenever they change."""

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        """Remove then add, as one atomic transaction; raise BackendError and change nothing
        on failure. A renewal is the old mapping in `removed` and the new one in `added`."""

    async def reconcile(
        self, wanted: Sequence[Mapping], *, now: float, audit: bool = True
    ) -> ReconcileReport:
        """Make the kernel hold exactly `wanted`: remove orphans, add what is missing. Without
        `audit` the kernel is not read first (reading 50,000 elements costs seconds) and the
        report says nothing about what differed."""

    async def restore(
        self,
        wanted: Sequence[Mapping],
        *,
        now: float,
        forwarding: Callable[[], None] | None = None,
    ) -> None:
        """After a loss reported by `watch`: recreate what the backend owns and hold exactly
        `wanted`, as fast as possible (not necessarily in one transaction); `forwarding()`
        is called as soon as every mapping forwards again (counters may follow)."""

    async def entries(self) -> set[KernelEntry]:
        """What the data plane holds now."""

    async def counters(self) -> dict[MappingKey, tuple[int, int]]:
        """Packets and bytes (both directions) of the flows each mapping admitted, since the
        mapping was made or the daemon started; mappings without traffic may be absent."""

    async def watch(self, restore: Callable[[str], Awaitable[None]]) -> None:
        """Until cancelled: await restore(what happened) whenever another program removed
        part of what the backend holds (the caller then opens and reconciles again)."""

    async def close(self, *, flush: bool) -> None:
        """Release resources; with flush, remove every entry and the table itself."""
