"""The commit pipeline: brings the kernel and the lease store to what the table holds, in the
order changes were made, and puts the table back where a commit fails.

Rules:
- The gateway changes the table at once; each change is then committed here before anyone
  hears of it. While a key has changes being committed, `_inflight` remembers what the
  kernel holds for it (the last committed value), however many changes are queued on it.
- A commit brings each key it covers from what the kernel holds to what the table holds
  *now* (not to what the change itself wrote): a later change to the same key is then never
  undone by an earlier one, and a failed earlier change never leaves the kernel holding a
  value the table has dropped.
- A failed commit puts back, key by key, what the kernel still holds, but only where the
  table still holds what the failing change left there; a key a later change has taken is
  that change's to commit (`Gateway.rollback`). So table and kernel agree on every key as
  soon as no change to it is in flight.
- The kernel goes first, then the store. A store failure undoes the kernel side; should the
  undo fail too, the kernel keeps the change, the table follows the kernel, and the store
  rows of those keys are rewritten from the table by the next commit or by `repair_store`.
- The first change made while nothing is being committed leads: its task lets the rest of
  the event loop's turn run, then brings every change queued by then (up to MAX_BATCH) into
  one kernel transaction and one store transaction. Changes made while a commit is under
  way wait for the committer task, which takes them the same way. If a transaction fails,
  each of its changes is retried alone so only the failing requests are refused.
- A commit usually completes without suspending (the kernel answers a netlink batch inside
  send(), SQLite writes synchronously): without the leader's one yield, every request
  would pay a transaction of its own under load, or the first of each turn would go alone.
  A lone client pays one loop turn (microseconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from igd.decision import Reason
from igd.events import CommitFailed, Event, RequestRefused
from igd.gateway import Change, Gateway, change_after
from igd.model import Mapping, MappingKey, MapRequest
from igd.server.backends import Backend, BackendError
from igd.server.feed import EventFeed
from igd.server.store import Clock, LeaseStore

log = logging.getLogger("igd.service")

# One kernel transaction carries at most this many queued changes.
MAX_BATCH = 512


@dataclass(slots=True)
class _Held:
    """What the kernel (and the store) hold at a key while changes to it are in flight."""

    mapping: Mapping | None
    changes: int


@dataclass(slots=True)
class Pending:
    """One change waiting to be committed, and what to publish once it is (or is not)."""

    change: Change
    keys: tuple[MappingKey, ...]
    """The keys the change touched."""
    done: asyncio.Future[None]
    events: tuple[Event, ...] = ()
    """Published once the change is committed."""
    request: MapRequest | None = None
    """The request behind the change, published as refused if the commit fails."""


class Committer:
    """Commits the gateway's changes to the backend and the store, strictly in order."""

    def __init__(
        self,
        gateway: Gateway,
        backend: Backend,
        store: LeaseStore,
        feed: EventFeed,
        clock: Callable[[], float],
        restored: Callable[[Mapping], None],
    ) -> None:
        self.gateway = gateway
        self.backend = backend
        self.store = store
        self.feed = feed
        self.now = clock
        self.restored = restored
        """Told of each mapping a failed commit put back into the table (its lease timer)."""
        self.timed: Callable[[str, float], None] | None = None
        """Told how long each kernel ("kernel") and lease-store ("store") write took."""
        self.stale_store: set[MappingKey] = set()
        """Keys whose store rows may differ from the kernel (a store write failed and the
        kernel could not be undone); rewritten by the next commit or `repair_store`."""
        self._inflight: dict[MappingKey, _Held] = {}
        self._waiting: deque[Pending] = deque()
        self._busy = False
        self._batches = 0
        self._leading = False
        """A change's task is letting the rest of the loop turn queue behind it (`_lead`)."""
        self._wake = asyncio.Event()

    @property
    def idle(self) -> bool:
        """Whether no change is being committed or waiting to be."""
        return not self._busy and not self._waiting

    @property
    def batches(self) -> int:
        """Kernel-and-store transactions attempted so far (each one or more changes)."""
        return self._batches

    def in_flight(self, key: MappingKey) -> bool:
        """Whether a change to this key is being committed or waiting to be."""
        return key in self._inflight

    async def commit(
        self, change: Change, events: tuple[Event, ...] = (), request: MapRequest | None = None
    ) -> None:
        """Commit a change the gateway just made; BackendError once it has been rolled back.

        Must be called before anything else changes the table: the keys' committed values
        are taken from the change itself when nothing else is in flight on them.
        """
        keys = self._enter(change)
        done = asyncio.get_running_loop().create_future()
        pending = Pending(change, keys, done, events, request)
        self._waiting.append(pending)
        if self._busy or self._leading:
            if not self._leading:
                self._wake.set()  # the committer takes it once the commit under way is done
        else:
            await self._lead()
        await pending.done

    async def _lead(self) -> None:
        """Let the rest of this loop turn queue its changes, then commit them all at once."""
        self._leading = True
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._wake.set()  # the queued changes are the committer's now
            raise
        finally:
            self._leading = False
        try:
            if not self._busy and self._waiting:  # the committer may have taken them
                await self._commit_next()
        finally:
            if self._waiting:
                self._wake.set()  # what queued meanwhile, or beyond MAX_BATCH

    async def run(self, store_retry: float) -> None:
        """Commit what queued up while another commit was under way, in order, up to
        MAX_BATCH waiting changes at a time; retry stale store rows every store_retry s."""
        while True:
            timeout = store_retry if self.stale_store else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                if self.idle:
                    self.repair_store()
                continue
            self._wake.clear()
            while self._waiting and not self._busy:
                await self._commit_next()

    async def _commit_next(self) -> None:
        """Commit the next MAX_BATCH waiting changes (or fewer) in one transaction."""
        count = min(MAX_BATCH, len(self._waiting))
        batch = [self._waiting.popleft() for _ in range(count)]
        self._busy = True
        try:
            await self._apply_batch(batch)
        finally:
            self._busy = False

    def repair_store(self) -> bool:
        """Rewrite the stale store rows from what the kernel holds; whether that worked."""
        if not self.stale_store:
            return True
        keys = list(self.stale_store)
        try:
            self.store.replace(keys, self._kernel_values(keys), Clock(mono=self.now()))
        except Exception as error:
            log.error("lease store still refuses %d rows: %s", len(keys), error)
            return False
        self.stale_store.difference_update(keys)
        log.info("lease store caught up with %d rows", len(keys))
        return True

    # -- internals ---------------------------------------------------------------------------

    def _enter(self, change: Change) -> tuple[MappingKey, ...]:
        before = {m.key: m for m in change.removed}
        keys = tuple(change_after(change))
        for key in keys:
            held = self._inflight.get(key)
            if held is None:
                self._inflight[key] = _Held(before.get(key), 1)
            else:
                held.changes += 1
        return keys

    def _leave(self, pending: Pending) -> None:
        for key in pending.keys:
            held = self._inflight[key]
            held.changes -= 1
            if not held.changes:
                del self._inflight[key]

    async def _apply_batch(self, batch: list[Pending]) -> None:
        self._batches += 1
        if len(batch) == 1:
            keys = batch[0].keys
        else:
            keys = tuple(dict.fromkeys(k for p in batch for k in p.keys))
        try:
            await self._sync(keys)
        except BackendError as error:
            if len(batch) == 1:
                self._fail(batch[0], error)
                return
            # Retry each alone, so only the failing requests are refused.
            for pending in batch:
                try:
                    await self._sync(pending.keys)
                except BackendError as single:
                    self._fail(pending, single)
                else:
                    self._succeed(pending)
        else:
            for pending in batch:
                self._succeed(pending)

    async def _sync(self, keys: tuple[MappingKey, ...]) -> None:
        """Bring the kernel and the store from what they hold at these keys to the table."""
        table = self.gateway.table
        removed: list[Mapping] = []
        added: list[Mapping] = []
        after: dict[MappingKey, Mapping | None] = {}
        for key in keys:
            held = self._inflight[key].mapping
            current = after[key] = table.get(key)
            if current != held:
                if held is not None:
                    removed.append(held)
                if current is not None:
                    added.append(current)
        # The table may move on while the kernel works: only `after` is committed here.
        now = self.now()
        if removed or added:
            started = time.perf_counter()
            try:
                await self.backend.apply(removed, added, now=now)
            except BackendError:
                raise
            except Exception as error:
                # Whatever went wrong belongs to this change alone: the committer must
                # outlive it, or every later request would wait forever.
                log.exception("backend failed unexpectedly")
                raise BackendError(f"backend: {error}") from error
            if self.timed is not None:
                self.timed("kernel", time.perf_counter() - started)
        # The store rows of the keys that changed, and of any the store refused before.
        rows = [m.key for m in removed]
        values = list(added)
        if self.stale_store:
            stale = list(self.stale_store)
            rows += stale + [m.key for m in added]
            kept = (after[k] if k in after else self._kernel_value(k) for k in stale)
            values += [m for m in kept if m is not None]
        if rows or values:
            started = time.perf_counter()
            try:
                self.store.replace(rows, values, Clock(mono=now))
            except Exception as error:
                await self._undo(keys, removed, added, after, now, error)
                raise BackendError(f"lease store: {error}") from error
            self.stale_store.difference_update(rows)
            if self.timed is not None:
                self.timed("store", time.perf_counter() - started)
        for key in keys:
            self._inflight[key].mapping = after[key]

    async def _undo(
        self,
        keys: tuple[MappingKey, ...],
        removed: list[Mapping],
        added: list[Mapping],
        after: dict[MappingKey, Mapping | None],
        now: float,
        error: Exception,
    ) -> None:
        """The store refused what the kernel took: take it back out of the kernel."""
        if not (removed or added):
            return
        try:
            await self.backend.apply(added, removed, now=now)
        except Exception as undo_error:
            # The kernel keeps the change: so does the table (the rollback puts back what
            # the kernel holds), and the store rows follow once the store takes writes.
            log.error(
                "lease store refused a change (%s) and the kernel could not be undone (%s);"
                " the store will be rewritten",
                error,
                undo_error,
            )
            for key in keys:
                self._inflight[key].mapping = after[key]
            self.stale_store.update(m.key for m in (*removed, *added))

    def _succeed(self, pending: Pending) -> None:
        self._leave(pending)
        for event in pending.events:
            self.feed.publish(event)
        if not pending.done.done():
            pending.done.set_result(None)

    def _fail(self, pending: Pending, error: BackendError) -> None:
        change = pending.change
        before = {k: self._inflight[k].mapping for k in pending.keys}
        for mapping in self.gateway.rollback(change, before):
            self.restored(mapping)
        self._leave(pending)
        log.warning("commit of %d removals, %d additions failed: %s", len(change.removed),
                    len(change.added), error)  # fmt: skip
        self.feed.publish(CommitFailed(change.removed, change.added, str(error)))
        if pending.request is not None:
            self.feed.publish(
                RequestRefused(pending.request, Reason.BACKEND_FAILURE, "gateway", str(error))
            )
        if not pending.done.done():
            pending.done.set_exception(error)

    def _kernel_value(self, key: MappingKey) -> Mapping | None:
        held = self._inflight.get(key)
        return held.mapping if held is not None else self.gateway.table.get(key)

    def _kernel_values(self, keys: Iterable[MappingKey]) -> list[Mapping]:
        return [m for m in map(self._kernel_value, keys) if m is not None]
