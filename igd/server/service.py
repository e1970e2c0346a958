"""Runs the gateway core against real effects: commits each change to the backend and the
lease store before anyone hears of it, and expires leases on one timer.

Changes are committed strictly in order. A change made while nothing else is being
committed goes straight in; changes that arrive meanwhile wait for the committer task,
which merges them into one kernel transaction and one store transaction; if that fails,
each is retried on its own so only the failing requests are refused (and rolled back in
the table).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from igd.decision import Deny, Reason
from igd.gateway import Change, Gateway, Granted, MapResult, Refused
from igd.model import Mapping, MappingKey, MapRequest
from igd.policy import Policy
from igd.server.backends import Backend, BackendError
from igd.server.store import Clock, LeaseStore

log = logging.getLogger("igd.service")

# One kernel transaction carries at most this many queued changes.
MAX_BATCH = 512
EPOCH_KEY = "epoch_start"


@dataclass(slots=True)
class _Pending:
    change: Change
    done: asyncio.Future[None]


class Service:
    """The gateway core plus its commit pipeline, expiry timer and epoch."""

    def __init__(
        self,
        gateway: Gateway,
        backend: Backend,
        store: LeaseStore,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.backend = backend
        self.store = store
        self.now = clock
        self._waiting: deque[_Pending] = deque()
        self._busy = False
        self._wake = asyncio.Event()
        self._rearm = asyncio.Event()
        self._armed: float | None = None
        self.epoch_start = time.time()
        self.listeners: list[Callable[[Change], None]] = []
        """Called with every change once it is committed (eventing, announcements)."""
        self.before_map: Callable[[float], None] | None = None
        """Called with `now` before each request reaches the core (fresh host ports)."""

    # -- operations the adapters call -------------------------------------------------------

    async def map(self, request: MapRequest) -> MapResult:
        """Grant or renew a mapping; return only once the kernel and store hold it."""
        now = self.now()
        if self.before_map is not None:
            self.before_map(now)
        result = self.gateway.map(request, now=now)
        if isinstance(result, Refused):
            return result
        try:
            await self.commit(result.change)
        except BackendError as error:
            self.gateway.rollback(result.change)
            return Refused(Deny(Reason.BACKEND_FAILURE, "gateway", str(error)))
        self._watch_deadline(result.mapping.expires)
        return result

    async def remove(self, mappings: Iterable[Mapping], *, why: str) -> Change:
        """Remove mappings from the table, the kernel and the store."""
        change = self.gateway.remove(mappings, why=why)
        if change:
            try:
                await self.commit(change)
            except BackendError:
                self.gateway.rollback(change)
                raise
        return change

    async def reload(self, policy: Policy) -> Change:
        """Switch policy; mappings it refuses are removed."""
        change = self.gateway.reload(policy, now=self.now())
        if change:
            await self._commit_or_log(change, "policy reload")
        return change

    def epoch(self) -> int:
        """Seconds since the mapping state began (NAT-PMP SSSoE, PCP epoch), 32 bits."""
        return int(time.time() - self.epoch_start) & 0xFFFFFFFF

    def reset_epoch(self) -> None:
        """Start a new epoch (state lost or external address changed) and persist it."""
        self.epoch_start = time.time()
        self.store.set_meta(EPOCH_KEY, repr(self.epoch_start))

    def restore_epoch(self, *, kept_mappings: bool) -> None:
        """Continue the persisted epoch when mappings survived, else begin a new one."""
        saved = self.store.get_meta(EPOCH_KEY)
        if kept_mappings and saved is not None:
            self.epoch_start = float(saved)
        else:
            self.reset_epoch()

    # -- background tasks --------------------------------------------------------------------

    async def run_committer(self) -> None:
        """Commit what queued up while another commit was under way, in order, merging up to
        MAX_BATCH waiting changes into one transaction."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting and not self._busy:
                batch = [self._waiting.popleft() for _ in range(min(MAX_BATCH, len(self._waiting)))]
                self._busy = True
                try:
                    await self._apply_batch(batch)
                finally:
                    self._busy = False

    async def _apply_batch(self, batch: list[_Pending]) -> None:
        try:
            await self._apply(merge(p.change for p in batch))
        except BackendError as error:
            if len(batch) == 1:
                _settle(batch[0], error)
                return
            # Retry each alone, so only the failing requests are refused.
            for pending in batch:
                try:
                    await self._apply(pending.change)
                except BackendError as single:
                    _settle(pending, single)
                else:
                    _settle(pending, None)
        else:
            for pending in batch:
                _settle(pending, None)

    async def run_expiry(self) -> None:
        """Remove mappings as their leases end, sleeping until the next deadline."""
        while True:
            self._armed = self.gateway.table.next_deadline()
            timeout = None if self._armed is None else max(0.0, self._armed - self.now())
            try:
                await asyncio.wait_for(self._rearm.wait(), timeout)
            except TimeoutError:
                pass
            self._rearm.clear()
            change = self.gateway.expire(now=self.now())
            if change:
                await self._commit_or_log(change, "expiry")

    # -- internals -----------------------------------------------------------------------------

    async def commit(self, change: Change) -> None:
        """Put a change into the kernel and the store; return once both hold it.

        With nothing else under way it is applied at once by the caller; otherwise it waits
        for the committer, so changes always reach the kernel in the order they were made.
        """
        if not self._busy and not self._waiting:
            self._busy = True
            try:
                await self._apply(change)
            finally:
                self._busy = False
                if self._waiting:
                    self._wake.set()
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(change, done))
        self._wake.set()
        await done

    async def _apply(self, change: Change) -> None:
        now = self.now()
        try:
            await self.backend.apply(change.removed, change.added, now=now)
        except BackendError:
            raise
        except Exception as error:
            # Whatever went wrong belongs to this change alone: the committer must outlive
            # it, or every later request would wait forever.
            log.exception("backend failed unexpectedly")
            raise BackendError(f"backend: {error}") from error
        try:
            self.store.apply(change.removed, change.added, Clock(mono=now))
        except Exception as error:
            # The kernel took the change but the store did not: undo the kernel side so the
            # two never disagree about what was granted.
            await self.backend.apply(change.added, change.removed, now=now)
            raise BackendError(f"lease store: {error}") from error
        for listener in self.listeners:
            try:
                listener(change)
            except Exception:
                log.exception("change listener failed")

    async def _commit_or_log(self, change: Change, what: str) -> None:
        try:
            await self.commit(change)
        except BackendError as error:
            # Removals that the kernel refused stay out of the table: their kernel entries
            # carry timeouts, and the next start's reconcile removes any leftover.
            log.error("%s: could not remove %d mappings: %s", what, len(change.removed), error)

    def _watch_deadline(self, expires: float) -> None:
        if self._armed is None or expires < self._armed:
            self._rearm.set()


def merge(changes: Iterable[Change]) -> Change:
    """The net effect of several changes applied in order."""
    before: dict[MappingKey, Mapping | None] = {}
    after: dict[MappingKey, Mapping | None] = {}
    for change in changes:
        for mapping in change.removed:
            before.setdefault(mapping.key, mapping)
            after[mapping.key] = None
        for mapping in change.added:
            before.setdefault(mapping.key, None)
            after[mapping.key] = mapping
    removed = tuple(m for k, m in before.items() if m is not None and after[k] != m)
    added = tuple(m for k, m in after.items() if m is not None and before[k] != m)
    return Change(removed, added)


def _settle(pending: _Pending, error: BackendError | None) -> None:
    if pending.done.done():
        return
    if error is None:
        pending.done.set_result(None)
    else:
        pending.done.set_exception(error)


__all__ = ["Granted", "Refused", "Service", "merge"]
