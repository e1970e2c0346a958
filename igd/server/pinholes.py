"""PinholeService: the one door to IPv6 pinholes, for the PCP adapter and admin surfaces.

Every command changes the core (`igd.pinhole.Pinholes`), then commits the change to the
kernel and then to the lease store, and only then returns: a client told "open" holds a
pinhole that survives `kill -9`. A failed commit is taken back in all three. Commands run one
at a time (a lock), so a failing commit never meets an interleaved change. Opens and renewals
(PCP MAP, AddPinhole, UpdatePinhole: the hot path) are batched: the requests that arrive
while a commit is under way, or in the same turn of the event loop, are applied to the core
by one drainer and committed together in one nftables and one SQLite transaction (up to
MAX_BATCH, keys distinct); each is answered only after that commit. If the batch fails, it is
taken back whole and each request is retried alone, so only the failing ones are refused.
What happened is published on the event feed it is given (the mapping service's, so GENA,
metrics, the console and the audit log see pinholes beside mappings): `PinholeOpened`,
`PinholeRenewed`, `PinholeRefused`, `PinholeRemoved` with its cause (igd/events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Network
from typing import Protocol as TypingProtocol

from igd.events import (
    PinholeOpened,
    PinholeRefused,
    PinholeRemoved,
    PinholeRenewed,
    RemovalCause,
)
from igd.model import address_text
from igd.pinhole import (
    Pinhole,
    PinholeChange,
    PinholeDeny,
    PinholeKey,
    PinholeOwner,
    PinholePolicy,
    PinholeRequest,
    PinholeRules,
    Pinholes,
    Refusal,
)
from igd.server.backends import BackendError
from igd.server.backends.pinholes import PinholeEntry
from igd.server.feed import EventFeed
from igd.server.pinhole_store import PinholeStore
from igd.server.store import Clock

log = logging.getLogger("igd.pinholes")

EPOCH_KEY = "epoch_origin"
"""Pinhole store meta: wall-clock second the IPv6 PCP epoch counts from (RFC 6887 §8.5)."""
MAX_BATCH = 512
"""Open requests committed together in one kernel and one store transaction at most."""
RETRY_DELAY = 1.0
"""Seconds the expiry task waits after a failed removal before it tries again."""


class PinholeBackend(TypingProtocol):
    """What the service needs from a data plane (nftables, or memory in tests)."""

    async def replace(self, pinholes: Iterable[Pinhole], *, now: float) -> None: ...
    async def apply(
        self, removed: Iterable[Pinhole], added: Iterable[Pinhole], *, now: float
    ) -> None: ...
    async def entries(self) -> set[PinholeEntry]: ...
    async def packets(self, hole: Pinhole) -> int: ...
    async def close(self, *, flush: bool) -> None: ...
    def set_lan(self, lan: Sequence[IPv6Network]) -> None: ...
    async def watch(self, restore: Callable[[str], Awaitable[None]]) -> None: ...


class CommitError(RuntimeError):
    """The kernel or the lease store refused a change; nothing of it took effect."""


@dataclass(slots=True)
class _Queued:
    """One open request waiting for the drainer, and where its answer goes."""

    request: PinholeRequest
    now: float
    done: asyncio.Future[Pinhole | Refusal]


class PinholeService:
    """Open, renew, close and expire pinholes; each command returns once it is committed."""

    def __init__(
        self,
        rules: PinholeRules,
        backend: PinholeBackend,
        store: PinholeStore,
        *,
        policy: PinholePolicy | None = None,
        feed: EventFeed | None = None,
    ) -> None:
        self._holes = Pinholes(rules, policy)
        self.feed = feed if feed is not None else EventFeed()
        self.backend = backend
        self.store = store
        self._lock = asyncio.Lock()
        self._clock = Clock()
        self._wake = asyncio.Event()
        self._epoch_origin = time.monotonic()
        self._queue: deque[_Queued] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._batches = 0
        self.kernel_restores = 0
        """Times the kernel table was rebuilt after another program removed (part of) it."""

    @property
    def batches(self) -> int:
        """Kernel-and-store transactions attempted for open requests so far."""
        return self._batches

    # -- queries ----------------------------------------------------------------------------

    def pinholes(self) -> list[Pinhole]:
        """Every open pinhole."""
        return list(self._holes)

    def get(self, key: PinholeKey) -> Pinhole | None:
        """The pinhole at `key`, if any."""
        return self._holes.get(key)

    def count(self) -> int:
        return len(self._holes)

    def by_uid(self, uid: int) -> Pinhole | None:
        """The pinhole with this UPnP UniqueID, if any."""
        return self._holes.by_uid(uid)

    @property
    def rules(self) -> PinholeRules:
        """The network side in force (LAN prefixes, own addresses, bound)."""
        return self._holes.rules

    async def packets(self, hole: Pinhole) -> int:
        """Inbound packets the kernel counted through `hole` since it opened; BackendError."""
        return await self.backend.packets(hole)

    def epoch(self, *, now: float | None = None) -> int:
        """Seconds since the pinhole state began (RFC 6887 §8.5: reset when state is lost)."""
        now = time.monotonic() if now is None else now
        return max(0, int(now - self._epoch_origin)) & 0xFFFFFFFF

    # -- commands ---------------------------------------------------------------------------

    async def restore(self, *, now: float, clock: Clock | None = None) -> int:
        """Start-up: load the store, drop what expired or the rules refuse, make the kernel
        hold exactly the rest; the epoch continues only if pinholes were kept."""
        async with self._lock:
            self._clock = clock or Clock(mono=now)
            persisted = self.store.load(self._clock, now=now)
            dropped = self._holes.restore(persisted, now=now)
            for hole in dropped:
                if hole.expires > now:
                    log.info("restored pinhole %s no longer allowed: dropped", hole.key)
            kept = list(self._holes)
            if dropped:
                self.store.replace_all(kept, self._clock)
            await self.backend.replace(kept, now=now)
            origin = self.store.get_meta(EPOCH_KEY)
            if kept and origin is not None:
                self._epoch_origin = self._clock.to_mono(float(origin))
            else:
                self._epoch_origin = now
                self.store.set_meta(EPOCH_KEY, repr(self._clock.to_wall(now)))
            log.info(
                "restored %d of %d persisted pinholes (%d dropped); kernel table replaced",
                len(kept),
                len(persisted),
                len(dropped),
            )
            return len(kept)

    async def watch_kernel(self) -> None:
        """Until cancelled: rebuild the kernel table whenever another program removes (part
        of) it, as the IPv4 table is (docs/nftables.md, "Firewall reloads")."""
        await self.backend.watch(self._restore_kernel)

    async def _restore_kernel(self, reason: str) -> None:
        # A firewall reload or `nft flush ruleset` took the table: every pinhole stopped
        # admitting and, with firewall "own", the RFC 6092 default deny went with it. The
        # table in memory is the truth; under the lock, so an open in flight is not lost.
        started = time.perf_counter()
        self.kernel_restores += 1
        log.warning("nftables: ip6 %s; restoring table and pinholes", reason)
        async with self._lock:
            holes = list(self._holes)
            try:
                await self.backend.replace(holes, now=time.monotonic())
            except BackendError as error:
                log.error("could not restore the IPv6 pinhole table: %s", error)
                return
        log.warning(
            "IPv6 pinhole table restored with %d pinholes in %.0f ms (restore %d since start)",
            len(holes),
            (time.perf_counter() - started) * 1000,
            self.kernel_restores,
        )

    async def open(self, request: PinholeRequest, *, now: float) -> Pinhole | Refusal:
        """Open or renew a pinhole; CommitError if it could not be committed."""
        done: asyncio.Future[Pinhole | Refusal] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(request, now, done))
        if self._drainer is None or self._drainer.done():
            # A task of its own: requests of this loop turn queue behind it and join its batch.
            self._drainer = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        """Commit queued open requests in batches until none is left."""
        while self._queue:
            async with self._lock:
                batch: list[tuple[_Queued, PinholeChange]] = []
                keys: set[PinholeKey] = set()
                while self._queue and len(batch) < MAX_BATCH:
                    queued = self._queue[0]
                    if queued.request.key in keys:
                        break  # the same key twice: its second change goes in the next batch
                    self._queue.popleft()
                    if queued.done.done():
                        continue  # its caller is gone (cancelled): nothing to do
                    change = self._holes.open(queued.request, now=queued.now)
                    if isinstance(change, PinholeDeny):
                        self._refused(queued.request, change)
                        _settle(queued.done, change.refusal)
                        continue
                    keys.add(queued.request.key)
                    batch.append((queued, change))
                if not batch:
                    continue
                try:
                    await self._commit_batch(batch)
                except Exception as error:
                    # Whatever went wrong belongs to this batch: its callers hear of it, and
                    # the drainer lives on for the requests behind it.
                    log.exception("pinhole batch failed unexpectedly")
                    for queued, change in batch:
                        if not queued.done.done() or queued.done.cancelled():
                            self._holes.undo(change)
                        _settle(queued.done, CommitError(f"internal error: {error}"))

    async def _commit_batch(self, batch: list[tuple[_Queued, PinholeChange]]) -> None:
        removed = tuple(h for _, c in batch for h in c.removed)
        added = tuple(h for _, c in batch for h in c.added)
        self._batches += 1
        try:
            # Keys are distinct, so the batch is one change; a failure undoes it whole.
            await self._commit(PinholeChange(removed, added), now=batch[-1][0].now)
        except CommitError as error:
            if len(batch) > 1:
                # Retry each alone, so only the failing requests are refused.
                for queued, _ in batch:
                    await self._open_alone(queued)
            else:
                _settle(batch[0][0].done, error)
            return
        for queued, change in batch:
            self._opened(queued, change)

    async def _open_alone(self, queued: _Queued) -> None:
        change = self._holes.open(queued.request, now=queued.now)
        if isinstance(change, PinholeDeny):
            self._refused(queued.request, change)
            _settle(queued.done, change.refusal)
            return
        self._batches += 1
        try:
            await self._commit(change, now=queued.now)
        except CommitError as error:
            _settle(queued.done, error)
            return
        self._opened(queued, change)

    def _opened(self, queued: _Queued, change: PinholeChange) -> None:
        hole = change.added[0]
        now = queued.now
        log.info(
            "pinhole %s: %s %s port %d for %s, %d s, rule %r",
            "renewed" if change.removed else "opened",
            address_text(hole.key.internal_address), hole.key.protocol, hole.key.internal_port,
            address_text(hole.owner.client), hole.remaining(now), change.rule,
        )  # fmt: skip
        if change.removed:
            self.feed.publish(PinholeRenewed(hole, change.removed[0], change.rule))
        else:
            self.feed.publish(PinholeOpened(hole, change.rule, change.notes))
        self._wake.set()
        _settle(queued.done, hole)

    async def close(self, key: PinholeKey, owner: PinholeOwner, *, now: float) -> Refusal | None:
        """Close `owner`'s pinhole at `key` (closing none is fine); CommitError on failure."""
        async with self._lock:
            change = self._holes.close(key, owner)
            if isinstance(change, PinholeDeny):
                self._refused(PinholeRequest(key, owner, 0), change, deleting=True)
                return change.refusal
            if change:
                await self._commit(change, now=now)
                log.info("pinhole closed by %s: %s", owner.client, key)
                self._publish_removed(change, RemovalCause.CLIENT)
            return None

    async def remove(self, keys: Iterable[PinholeKey], *, cause: RemovalCause, now: float) -> int:
        """Remove these pinholes whoever holds them (admin, reload, address change)."""
        async with self._lock:
            change = self._holes.remove(keys)
            if change:
                await self._commit(change, now=now)
                for hole in change.removed:
                    log.info("pinhole removed (%s): %s (client %s)", cause, hole.key,
                             hole.owner.client)  # fmt: skip
                self._publish_removed(change, cause)
            return len(change.removed)

    async def set_policy(self, policy: PinholePolicy, *, now: float) -> int:
        """A reloaded policy: every request from now on, and the pinholes it no longer
        allows removed (cause policy-reload); how many."""
        self._holes.set_policy(policy)
        return await self._drop_refused(RemovalCause.POLICY_RELOAD, now=now)

    async def readdress(self, rules: PinholeRules, *, now: float) -> int:
        """New LAN prefixes or own addresses: the kernel table is rebuilt in one transaction
        for the new prefixes (RFC 6092 default deny follows them) without the pinholes whose
        internal address left them, which are removed (cause address-change); how many.
        CommitError if the kernel refused (nothing changed)."""
        async with self._lock:
            before = self._holes.rules
            self._holes.set_rules(rules)
            change = self._holes.remove(h.key for h in self._holes.refused(now=now))
            self.backend.set_lan(rules.internal_networks)
            try:
                await self.backend.replace(list(self._holes), now=now)
            except BackendError as error:
                self._holes.undo(change)
                self._holes.set_rules(before)
                self.backend.set_lan(before.internal_networks)
                log.error("IPv6 prefix change not applied to the kernel: %s", error)
                raise CommitError(str(error)) from error
            try:
                self.store.apply(change.removed, (), self._clock)
            except sqlite3.Error as error:
                # The kernel no longer admits them; at the next start the recheck drops the
                # stored rows, which the new prefixes refuse.
                log.error("pinholes removed by a prefix change not stored: %s", error)
            for hole in change.removed:
                log.info("pinhole removed (address change): %s (client %s)", hole.key,
                         hole.owner.client)  # fmt: skip
            self._publish_removed(change, RemovalCause.ADDRESS_CHANGE)
            return len(change.removed)

    async def _drop_refused(self, cause: RemovalCause, *, now: float) -> int:
        gone = [hole.key for hole in self._holes.refused(now=now)]
        return await self.remove(gone, cause=cause, now=now) if gone else 0

    async def expire(self, *, now: float) -> int:
        """Close every pinhole whose lease ended; how many."""
        async with self._lock:
            change = self._holes.expire(now=now)
            if change:
                await self._commit(change, now=now)
                for hole in change.removed:
                    log.info("pinhole expired: %s (client %s)", hole.key, hole.owner.client)
                self._publish_removed(change, RemovalCause.EXPIRED)
            return len(change.removed)

    def _refused(
        self, request: PinholeRequest, deny: PinholeDeny, *, deleting: bool = False
    ) -> None:
        what = "delete" if deleting else "request"
        log.info("pinhole %s refused: %s asked %s: %s (rule %r)", what, request.owner.client,
                 request.key, deny.detail or deny.refusal.value, deny.rule)  # fmt: skip
        self.feed.publish(PinholeRefused(request, deny.refusal, deny.rule, deny.detail))

    def _publish_removed(self, change: PinholeChange, cause: RemovalCause) -> None:
        for hole in change.removed:
            self.feed.publish(PinholeRemoved(hole, cause))

    async def run_expiry(self) -> None:
        """Sleep until the next deadline (re-armed by new pinholes) and expire; forever."""
        while True:
            deadline = self._holes.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if deadline is not None and time.monotonic() >= deadline:
                try:
                    await self.expire(now=time.monotonic())
                except CommitError as error:
                    log.error("could not close expired pinholes: %s", error)
                    await asyncio.sleep(RETRY_DELAY)

    async def stop(self, *, flush: bool) -> None:
        """Keep the pinholes (kernel and store) or remove them all."""
        await self.backend.close(flush=flush)
        if flush:
            self.store.replace_all([], self._clock)
        self.store.close()

    async def _commit(self, change: PinholeChange, *, now: float) -> None:
        try:
            await self.backend.apply(change.removed, change.added, now=now)
        except BackendError as error:
            self._holes.undo(change)
            log.error("pinhole change not applied to the kernel: %s", error)
            raise CommitError(str(error)) from error
        try:
            self.store.apply(change.removed, change.added, self._clock)
        except sqlite3.Error as error:
            self._holes.undo(change)
            try:
                await self.backend.apply(change.added, change.removed, now=now)
            except BackendError as undo_error:
                # The kernel keeps the change until its element timeouts end it; the next
                # restart's reconcile makes it follow the store.
                log.error("pinhole kernel undo failed too: %s", undo_error)
            log.error("pinhole change not stored: %s", error)
            raise CommitError(str(error)) from error


Answer = Pinhole | Refusal


def _settle(done: asyncio.Future[Answer], outcome: Answer | Exception) -> None:
    """Answer a queued request unless its caller has gone (cancelled)."""
    if done.done():
        return
    if isinstance(outcome, Exception):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)
