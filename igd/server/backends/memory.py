"""The memory backend: the kernel's maps as a dict, for unit tests and `--dry-run`.

It fails where the nftables backend fails, so code tested against it meets no surprise in the
kernel: adding a key that holds another forwarding (not removed in the same call) is refused,
and removing an entry that is absent is not an error (the kernel may have timed it out).
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address

from igd.model import Mapping, Protocol
from igd.server.backends import BackendError, KernelEntry, ReconcileReport
from igd.server.backends.nftables import element_timeout, entry_order

_Key = tuple[Protocol, int, IPv4Address | None]


def _key(entry: KernelEntry) -> _Key:
    return (entry.protocol, entry.external_port, entry.remote_host)


class MemoryBackend:
    """A Backend that keeps entries and their kernel timeouts in a dict."""

    def __init__(self) -> None:
        self._entries: dict[_Key, KernelEntry] = {}
        self.timeouts: dict[KernelEntry, int | None] = {}
        """Timeout each entry would carry in the kernel (seconds from its last write)."""
        self.fail_next: BackendError | None = None
        """Raised (once) by the next state-changing call, which then changes nothing."""
        self.opened = False
        self.closed = False
        self.transactions = 0
        """Number of successful state-changing calls (apply, reconcile)."""

    async def open(self) -> None:
        """Mark open; entries already held survive, as the kernel's do."""
        self._check_failure()
        self.opened, self.closed = True, False

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        """Remove then add atomically; BackendError and no change on a conflicting add."""
        self._check_failure()
        entries = dict(self._entries)
        timeouts = dict(self.timeouts)
        for mapping in removed:
            entry = KernelEntry.of(mapping)
            held = entries.get(_key(entry))
            if held is not None and held != entry:
                # The nftables backend re-adds before deleting, which the kernel refuses when
                # the key forwards elsewhere: the caller's view and the kernel disagree.
                raise BackendError(f"removed entry {entry} conflicts with held {held}")
            entries.pop(_key(entry), None)
            timeouts.pop(entry, None)
        for mapping in added:
            entry = KernelEntry.of(mapping)
            held = entries.get(_key(entry))
            if held is not None and held != entry:
                raise BackendError(f"added entry {entry} conflicts with held {held}")
            entries[_key(entry)] = entry
            timeouts[entry] = element_timeout(mapping, now)
        self._entries, self.timeouts = entries, timeouts
        self.transactions += 1

    async def reconcile(self, wanted: Sequence[Mapping], *, now: float) -> ReconcileReport:
        """Hold exactly `wanted`; report orphans removed and entries added."""
        self._check_failure()
        want = {KernelEntry.of(m): m for m in wanted}
        if len({_key(e) for e in want}) != len(want):
            raise BackendError("wanted mappings share a key")
        held = set(self._entries.values())
        report = ReconcileReport(
            removed=tuple(sorted(held - want.keys(), key=entry_order)),
            added=tuple(sorted(want.keys() - held, key=entry_order)),
        )
        self._entries = {_key(e): e for e in want}
        self.timeouts = {e: element_timeout(m, now) for e, m in want.items()}
        self.transactions += 1
        return report

    async def entries(self) -> set[KernelEntry]:
        """What the pretend data plane holds."""
        return set(self._entries.values())

    async def close(self, *, flush: bool) -> None:
        """Mark closed; with flush, forget every entry."""
        if flush:
            self._entries.clear()
            self.timeouts.clear()
        self.closed = True

    def _check_failure(self) -> None:
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure
