"""The memory backend: the kernel's sets as dicts, for unit tests and `--dry-run`.

It fails where the nftables backend fails, so code tested against it meets no surprise in the
kernel: an invalid entry is refused, adding a key that holds another forwarding (or a PEER flow
that leaves with another port) not removed in the same call is refused, and removing an entry
that is absent is not an error (the kernel may have timed it out). `forward` and `outbound`
answer what the kernel's rules would do with a new flow, so tests can check FILTER and PEER
behaviour without a kernel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from ipaddress import IPv4Address

from igd.model import Mapping, MappingKey, Protocol
from igd.server.backends import BackendError, KernelEntry, ReconcileReport
from igd.server.backends.nft_payload import check_entry, element_timeout, entry_order

_Key = tuple[Protocol, int, IPv4Address | None, IPv4Address | None]
_Flow = tuple[IPv4Address, Protocol, int, IPv4Address | None, int]
"""A PEER flow: internal address, protocol, internal port, remote host, remote port."""


def _key(entry: KernelEntry) -> _Key:
    return (entry.protocol, entry.external_port, entry.remote_host, entry.external_address)


def _flow(entry: KernelEntry) -> _Flow:
    return (
        entry.internal_address,
        entry.protocol,
        entry.internal_port,
        entry.remote_host,
        entry.peer_port,
    )


def _valid(entry: KernelEntry) -> KernelEntry:
    try:
        return check_entry(entry)
    except ValueError as exc:
        raise BackendError(f"invalid mapping: {exc}") from exc


def admits(entry: KernelEntry, source: IPv4Address, source_port: int) -> bool:
    """Whether a new flow from source:source_port may use the entry (RFC 6887 §13.3)."""
    if not entry.filters:
        return True
    return any(source in f.network and f.port in (0, source_port) for f in entry.filters)


class MemoryBackend:
    """A Backend that keeps entries and their kernel timeouts in dicts."""

    def __init__(self) -> None:
        self._entries: dict[_Key, KernelEntry] = {}
        self._peers: dict[_Flow, KernelEntry] = {}
        self.timeouts: dict[KernelEntry, int | None] = {}
        """Timeout each entry would carry in the kernel (seconds from its last write)."""
        self.fail_next: BackendError | None = None
        """Raised (once) by the next state-changing call, which then changes nothing."""
        self.opened = False
        self.closed = False
        self.transactions = 0
        """Number of successful state-changing calls (apply, reconcile)."""
        self.destinations: frozenset[IPv4Address] = frozenset()
        """The addresses DNAT would apply to (empty: none yet)."""

    async def open(self) -> None:
        """Mark open; entries already held survive, as the kernel's do."""
        self._check_failure()
        self.opened, self.closed = True, False

    async def set_destinations(self, addresses: Iterable[IPv4Address]) -> None:
        """Record the addresses DNAT would apply to."""
        self.destinations = frozenset(addresses)

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        """Remove then add atomically; BackendError and no change on a conflicting add."""
        self._check_failure()
        gone = [_valid(KernelEntry.of(m)) for m in removed]
        new = [(_valid(KernelEntry.of(m)), m) for m in added]
        entries, peers, timeouts = dict(self._entries), dict(self._peers), dict(self.timeouts)
        for entry in gone:
            held = entries.get(_key(entry))
            if held is not None and held != entry:
                # The nftables backend re-adds before deleting, which the kernel refuses when
                # the key forwards elsewhere: the caller's view and the kernel disagree.
                raise BackendError(f"removed entry {entry} conflicts with held {held}")
            entries.pop(_key(entry), None)
            if peers.get(_flow(entry)) == entry:
                del peers[_flow(entry)]
            timeouts.pop(entry, None)
        for entry, mapping in new:
            held = entries.get(_key(entry))
            if held is not None and held != entry:
                raise BackendError(f"added entry {entry} conflicts with held {held}")
            if entry.peer_port:
                # The kernel's `peers` map holds one external port per flow.
                other = peers.get(_flow(entry))
                if other is not None and other != entry:
                    raise BackendError(f"added PEER entry {entry} conflicts with held {other}")
                peers[_flow(entry)] = entry
            entries[_key(entry)] = entry
            timeouts[entry] = element_timeout(mapping, now)
        self._entries, self._peers, self.timeouts = entries, peers, timeouts
        self.transactions += 1

    async def reconcile(
        self, wanted: Sequence[Mapping], *, now: float, audit: bool = True
    ) -> ReconcileReport:
        """Hold exactly `wanted`; report orphans removed and entries added."""
        self._check_failure()
        want = {_valid(KernelEntry.of(m)): m for m in wanted}
        if len({_key(e) for e in want}) != len(want):
            raise BackendError("wanted mappings share a key")
        peers = {_flow(e): e for e in want if e.peer_port}
        if len(peers) != sum(1 for e in want if e.peer_port):
            raise BackendError("wanted PEER mappings share a flow")
        held = set(self._entries.values())
        report = ReconcileReport(
            removed=tuple(sorted(held - want.keys(), key=entry_order)),
            added=tuple(sorted(want.keys() - held, key=entry_order)),
        )
        if not audit:
            report = ReconcileReport((), (), audited=False)
        self._entries = {_key(e): e for e in want}
        self._peers = peers
        self.timeouts = {e: element_timeout(m, now) for e, m in want.items()}
        self.transactions += 1
        return report

    async def restore(
        self,
        wanted: Sequence[Mapping],
        *,
        now: float,
        forwarding: Callable[[], None] | None = None,
    ) -> None:
        """Hold exactly `wanted` again (what reconcile does, without the report)."""
        await self.reconcile(wanted, now=now, audit=False)
        if forwarding is not None:
            forwarding()

    async def entries(self) -> set[KernelEntry]:
        """What the pretend data plane holds."""
        return set(self._entries.values())

    async def counters(self) -> dict[MappingKey, tuple[int, int]]:
        """No packets pass a pretend data plane: zero for every entry."""
        return {
            MappingKey(e.protocol, e.external_port, e.remote_host, e.external_address): (0, 0)
            for e in self._entries.values()
        }

    async def watch(self, restore: Callable[[str], Awaitable[None]]) -> None:
        """Nothing else can change a pretend data plane: wait until cancelled."""
        await asyncio.Event().wait()

    async def close(self, *, flush: bool) -> None:
        """Mark closed; with flush, forget every entry."""
        if flush:
            self._entries.clear()
            self._peers.clear()
            self.timeouts.clear()
        self.closed = True

    def forward(
        self,
        protocol: Protocol,
        external_port: int,
        source: IPv4Address,
        source_port: int,
        address: IPv4Address | None = None,
    ) -> tuple[IPv4Address, int] | None:
        """Where a new inbound flow to external_port goes: the internal endpoint, or None when
        no entry maps it or the entry's filters refuse the source (the kernel drops it)."""
        # A remote-host-specific entry takes its host's flows, filters and all; only flows
        # it does not take reach the wildcard entry.
        entry = self._entries.get((protocol, external_port, source, address))
        if entry is None:
            entry = self._entries.get((protocol, external_port, None, address))
        if entry is None or not admits(entry, source, source_port):
            return None
        return entry.internal_address, entry.internal_port

    def outbound(
        self,
        protocol: Protocol,
        internal_address: IPv4Address,
        internal_port: int,
        remote: IPv4Address,
        remote_port: int,
    ) -> int | None:
        """The external port a new outbound flow leaves with under a PEER entry, or None when
        no PEER entry covers it (the admin's own masquerade, if any, then applies)."""
        entry = self._peers.get((internal_address, protocol, internal_port, remote, remote_port))
        return None if entry is None else entry.external_port

    def _check_failure(self) -> None:
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure
