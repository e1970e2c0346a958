"""The nftables backend: mappings are elements of hash sets and maps in a table of our own.

Shape (docs/nftables.md shows the listing and explains the choices):

    table ip igd {
      map portmap, portmap_remote      (proto, port[, remote]) -> internal address . port
      set filtered, filtered_remote    mappings with FILTERs (RFC 6887 §13.3)
      set allowed, allowed_remote      the peers those FILTERs admit
      map filters_remote               FILTERs of remote-host entries, kept whole to list back
      map peers                        PEER flows (RFC 6887 §12) -> external port
      map portmap_addr[_remote], ...   the same for network.external_addresses, keyed by
                                       destination address . proto . port (docs/nftables.md)
      chain prerouting (nat, dstnat)   judge FILTERs, then DNAT: remote-specific map first
      chain admit, admit_remote        one hash lookup per FILTER shape in use; miss = drop
      chain postrouting (nat, srcnat - 10)  masquerade PEER flows to their external port
    }

Rules are fixed; only elements change, and each is a hash-set element: per-packet and
per-change cost stay O(1) however many mappings exist. Payload building and listing parsing
are pure (`nft_payload`, `nft_listing`, `netlink`'s encoders); only `NftablesBackend` talks
to the kernel: plain mappings (no FILTER, no PEER port) as raw netlink batches from the event loop
(`netlink.NetlinkSets`, ~5x faster), everything else through libnftables on one worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from typing import Any, TypeVar

from igd.model import Mapping, MappingKey
from igd.server.backends import BackendError, KernelEntry, ReconcileReport
from igd.server.backends.libnft import Nft
from igd.server.backends.netlink import (
    NetlinkSets,
    SetOp,
    counter_elements,
    is_plain,
    plain_elements,
    plain_ops,
)
from igd.server.backends.nft_listing import Listing, parse_counters, parse_listing
from igd.server.backends.nft_payload import (
    CONTAINERS,
    Guard,
    Shape,
    admit_commands,
    apply_commands,
    check_entry,
    check_ifname,
    check_table_name,
    close_commands,
    count_commands,
    destination_commands,
    element_timeout,
    filter_shapes,
    list_command,
    list_counters_commands,
    open_commands,
    reconcile_plan,
)
from igd.server.backends.watch import RulesetWatcher, Transactions, repair_losses

__all__ = ["NftablesBackend", "check_netns_name", "enter_netns"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_NETNS = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

CLONE_NEWNET = 0x40000000

MAX_FAST_ELEMENTS = 1024
"""Largest change (in elements) sent as one raw netlink batch; bigger ones (a client's
mappings deleted at once) go through libnftables, which splits batches itself."""


def check_netns_name(name: str) -> str:
    """Return `name` if it is a plain file name under /run/netns; ValueError otherwise."""
    if not _NETNS.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid network namespace name {name!r}")
    return name


# -- the executor -------------------------------------------------------------------------


def enter_netns(name: str) -> None:
    """Move the calling thread (network namespaces are per thread) into /run/netns/<name>."""
    path = f"/run/netns/{check_netns_name(name)}"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.setns.restype = ctypes.c_int
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"cannot open network namespace {path}: {exc.strerror}") from exc
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BackendError(f"setns({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


class NftablesBackend:
    """Mappings as elements of nftables sets and maps: plain ones over raw netlink from the
    event loop, the rest through libnftables on one worker thread."""

    def __init__(
        self,
        table: str,
        external_interface: str,
        *,
        netns: str | None = None,
        fast_path: bool = True,
        guard: Guard | None = None,
        hairpin: bool = True,
        counters: bool = True,
        addresses: Iterable[IPv4Address] = (),
    ) -> None:
        self.table = check_table_name(table)
        self.addresses = tuple(addresses)
        """network.external_addresses: each DNATs its own mappings (the `*_addr` maps)."""
        self.guard = guard
        self.hairpin = hairpin
        self.count_traffic = counters
        self.destinations: frozenset[IPv4Address] | None = None
        self.external_interface = check_ifname(external_interface)
        self.netns = None if netns is None else check_netns_name(netns)
        self.fast_path = fast_path
        # libnftables blocks, and a context must stay on one thread: one worker owns both.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nft-{table}")
        self._nft: Nft | None = None  # created and used only on the worker thread
        self._in_netns = False  # whether the worker thread entered self.netns
        # One transaction at a time, whichever path: a fast batch must never overtake (or be
        # overtaken by) a libnftables one, or a renewal could land before the add it renews.
        self._lock = asyncio.Lock()
        self._last_job: concurrent.futures.Future[Any] | None = None
        self._sets: NetlinkSets | None = None
        self._sets_tried = False
        self._closed = False
        # FILTER shapes (prefix length, port or any) the `admit` chains test: None = all 66
        # (not known yet). Grows with apply, is set exactly by reconcile; a superset only
        # costs lookups, a missing shape would drop the flows its filters admit.
        self._shapes: frozenset[Shape] | None = None
        # Whether the counting rules look for remote-host-specific entries: None = yes (not
        # known yet). Turned on before such an entry is added, set exactly by reconcile.
        self._count_remote: bool | None = None
        self._own_threads: set[int] = set()  # native ids of the threads that commit for us
        self.restores = 0
        """Times the table was restored after another program removed part of it."""

    async def open(self) -> None:
        """Create table, sets, chains and rules idempotently, keeping existing elements."""
        await self._call(functools.partial(self._run, self._open_commands()))
        log.info("nftables table ip %s ready on %s", self.table, self.external_interface)
        if self.fast_path:
            async with self._lock:
                await self._netlink()

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        """Remove then add as one kernel transaction; BackendError and no change on failure."""
        if self._count_remote is False and any(m.key.remote_host for m in added):
            # Before the entry: its flows are counted from their first packet.
            await self._call(functools.partial(self._set_count_remote, True))
        try:
            ops = self._fast_ops(removed, added, now) if self.fast_path else None
            commands = "" if ops else apply_commands(self.table, removed, added, now=now)
        except ValueError as exc:
            raise BackendError(f"invalid mapping: {exc}") from exc
        if ops:
            async with self._lock:
                sets = await self._netlink()
                if sets is not None:
                    await self._worker_idle()
                    await sets.transact(self.table, ops)
                    return
            commands = apply_commands(self.table, removed, added, now=now)
        if commands:
            shapes = filter_shapes(KernelEntry.of(m) for m in added)
            await self._call(functools.partial(self._run_with_shapes, commands, shapes))

    async def set_destinations(self, addresses: Iterable[IPv4Address]) -> None:
        """Make DNAT apply to packets addressed to exactly these addresses."""
        wanted = frozenset(addresses)
        if wanted == self.destinations:
            return
        await self._call(functools.partial(self._run, destination_commands(self.table, wanted)))
        self.destinations = wanted
        log.info(
            "DNAT destinations: %s", ", ".join(sorted(map(str, wanted))) or "none (no address)"
        )

    async def reconcile(
        self, wanted: Sequence[Mapping], *, now: float, audit: bool = True
    ) -> ReconcileReport:
        """Make the kernel hold exactly `wanted` (one listing, one transaction)."""
        if not audit and self.fast_path and not any(m.filters or m.peer_port for m in wanted):
            try:  # checks every field, before touching the kernel
                plain = plain_elements(wanted, now)
            except ValueError as exc:
                raise BackendError(f"invalid mapping: {exc}") from exc
            remote = any(m.key.remote_host for m in wanted)
            if await self._refill(plain.maps | counter_elements(plain.plain), remote):
                return ReconcileReport((), (), audited=False)
        for mapping in wanted:  # fail before touching the kernel
            try:
                check_entry(KernelEntry.of(mapping))
            except ValueError as exc:
                raise BackendError(f"invalid mapping: {exc}") from exc
        return await self._call(functools.partial(self._reconcile, list(wanted), now, audit))

    async def _refill(self, elements: dict[str, list[bytes]], remote: bool) -> bool:
        """Flush and refill the table in one raw netlink transaction (what `_reconcile` does
        unaudited through libnftables, whose parsing of 100,000 elements took 2-4 s at
        start), the elements encoded straight from the mappings (`plain_elements`); False
        if there is no netlink socket."""
        async with self._lock:
            sets = await self._netlink()
            if sets is None:
                return False
            await self._worker_idle()
            if self._shapes != frozenset():  # no FILTER among plain entries
                await self._submit(functools.partial(self._set_shapes, frozenset()))
            if remote or self._count_remote is not False:
                await self._submit(functools.partial(self._set_count_remote, remote))
            await sets.transact_elements(self.table, elements, flush=CONTAINERS)
        return True

    def _set_shapes(self, shapes: frozenset[Shape]) -> None:
        self._context().run(admit_commands(self.table, shapes))
        self._shapes = shapes

    def _set_count_remote(self, remote: bool) -> None:
        if self.count_traffic and remote != self._count_remote:
            self._context().run(count_commands(self.table, remote, self.addresses))
        self._count_remote = remote

    async def restore(
        self,
        wanted: Sequence[Mapping],
        *,
        now: float,
        forwarding: Callable[[], None] | None = None,
    ) -> None:
        """After another program removed (part of) the table: recreate it and put `wanted`
        back, quickly rather than atomically (the table is broken already). The table's
        shape and every mapping with FILTERs or a PEER port go in one libnftables
        transaction that also flushes every set; then the forwarding elements of the plain
        mappings in one raw netlink transaction (they are what makes mappings work:
        `forwarding()` is called once they are back), then their counter elements in
        another (the counts restart from 0). The elements are encoded straight from the
        mappings before the kernel is touched. The lock is held throughout, so a change
        made meanwhile (a grant, a deletion) is applied after the restore, never undone
        by it."""
        try:
            for mapping in wanted:
                if mapping.filters or mapping.peer_port:
                    check_entry(KernelEntry.of(mapping))
            plain = plain_elements(wanted, now) if self.fast_path else None
        except ValueError as exc:
            raise BackendError(f"invalid mapping: {exc}") from exc
        async with self._lock:
            await self._submit(functools.partial(self._run, self._open_commands()))
            sets = await self._netlink() if plain is not None else None
            if sets is None or plain is None:
                await self._submit(functools.partial(self._reconcile, list(wanted), now, False))
                if forwarding is not None:
                    forwarding()
                return
            remote = any(m.key.remote_host for m in wanted)
            await self._submit(functools.partial(self._reconcile, plain.rest, now, False, remote))
            await sets.transact_elements(self.table, plain.maps)
            if forwarding is not None:
                forwarding()
            await sets.transact_elements(self.table, counter_elements(plain.plain))

    async def entries(self) -> set[KernelEntry]:
        """What the table holds now, as entries (filters and PEER ports included)."""
        return await self._call(self._entries)

    async def counters(self) -> dict[MappingKey, tuple[int, int]]:
        """Packets and bytes per mapping, read from the kernel's counter sets."""
        return await self._call(self._counters)

    async def watch(self, restore: Callable[[str], Awaitable[None]]) -> None:
        """Until cancelled: after another program's transaction removed (part of) our table
        (a `nft flush ruleset`, a firewall reload, an element deleted by hand), await
        restore(what happened). Our own transactions are recognised and ignored."""
        watcher = await self._submit(self._open_watcher)
        if watcher is None:
            return
        # The fast path commits from the event loop's thread, libnftables from the worker.
        self._own_threads.add(threading.get_native_id())
        transactions = Transactions(self.table, self._own_threads)
        await repair_losses(
            watcher, transactions, restore, lambda: self._call(self._intact), self._counted
        )

    def _counted(self) -> None:
        self.restores += 1

    async def close(self, *, flush: bool) -> None:
        """Stop the worker; with flush, delete the table (every mapping) first."""
        if self._closed:
            return
        try:
            await self._call(functools.partial(self._shutdown, flush))
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)
            if self._sets is not None:
                self._sets.close()
                self._sets = None

    def _open_commands(self) -> str:
        return open_commands(
            self.table,
            self.external_interface,
            self.destinations,
            guard=self.guard,
            hairpin=self.hairpin,
            counters=self.count_traffic,
            admit_shapes=self._shapes,
            count_remote=self._count_remote,
            addresses=self.addresses,
        )

    def _fast_ops(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], now: float
    ) -> list[SetOp] | None:
        """The netlink batch for this change, or None when it needs libnftables."""
        gone = [KernelEntry.of(m) for m in removed]
        new = [(KernelEntry.of(m), m) for m in added]
        if len(gone) * 4 + len(new) * 2 > MAX_FAST_ELEMENTS:
            return None
        if not all(is_plain(e) for e in gone) or not all(is_plain(e) for e, _ in new):
            return None
        return plain_ops(gone, [(e, element_timeout(m, now)) for e, m in new])

    async def _netlink(self) -> NetlinkSets | None:
        """The netlink socket, opened in our namespace on first use; None if it cannot be."""
        if not self._sets_tried:
            self._sets_tried = True
            self._sets = await self._submit(self._open_netlink)
        return self._sets

    async def _call(self, job: Callable[[], _T]) -> _T:
        async with self._lock:
            return await self._submit(job)

    async def _submit(self, job: Callable[[], _T]) -> _T:
        if self._closed:
            raise BackendError("nftables backend is closed")
        future = self._executor.submit(job)
        self._last_job = future
        return await asyncio.wrap_future(future)

    async def _worker_idle(self) -> None:
        """Wait until the worker finished every job, even one whose caller was cancelled."""
        if self._closed:
            raise BackendError("nftables backend is closed")
        last = self._last_job
        if last is not None and not last.done():
            waiter = asyncio.wrap_future(last)
            await asyncio.wait([waiter])
            if not waiter.cancelled():
                waiter.exception()  # its caller has seen it (or was cancelled)

    # Everything below runs on the worker thread.

    def _enter(self) -> None:
        if not self._in_netns and self.netns is not None:
            enter_netns(self.netns)
        self._in_netns = True
        self._own_threads.add(threading.get_native_id())

    def _open_watcher(self) -> RulesetWatcher | None:
        self._enter()
        try:
            return RulesetWatcher()
        except OSError as exc:
            log.warning(
                "cannot watch the nftables ruleset (%s): a firewall reload that removes"
                " table ip %s goes unnoticed until the next start",
                exc.strerror or exc,
                self.table,
            )
            return None

    def _context(self) -> Nft:
        if self._nft is None:
            self._enter()
            self._nft = Nft()
        return self._nft

    def _open_netlink(self) -> NetlinkSets | None:
        # A socket acts in the namespace it was made in: make it on the worker thread.
        self._enter()
        try:
            return NetlinkSets()
        except OSError as exc:
            log.warning(
                "cannot open a netlink socket (%s): plain mappings go through libnftables",
                exc.strerror or exc,
            )
            return None

    def _run(self, commands: str) -> None:
        self._context().run(commands)

    def _run_with_shapes(self, commands: str, shapes: set[Shape]) -> None:
        # On the worker, so transactions see (and extend) the shapes one after another.
        known = self._shapes
        if known is None or shapes <= known:
            self._context().run(commands)
            return
        grown = known | shapes
        self._context().run(admit_commands(self.table, grown) + commands)
        self._shapes = grown

    def _intact(self) -> bool:
        try:
            self._context().run(f"list chain ip {self.table} prerouting")
        except BackendError:
            return False
        return True

    def _listing(self) -> Listing:
        return parse_listing(self._context().run_json(list_command(self.table)), self.table)

    def _counters(self) -> dict[MappingKey, tuple[int, int]]:
        counts: dict[MappingKey, tuple[int, int]] = {}
        for command in list_counters_commands(self.table):
            counts.update(parse_counters(self._context().run_json(command), self.table))
        return counts

    def _entries(self) -> set[KernelEntry]:
        return set(self._listing().entries)

    def _reconcile(
        self, wanted: list[Mapping], now: float, audit: bool, remote: bool | None = None
    ) -> ReconcileReport:
        """Make the kernel hold exactly `wanted`; `remote`: whether the whole table (of which
        `wanted` may be a part) holds remote-host-specific entries (None: whether `wanted`
        does)."""
        if remote is None:
            remote = any(m.key.remote_host for m in wanted)
        if audit:
            listing = self._listing()
            commands, report = reconcile_plan(
                self.table, set(listing.entries), wanted, now=now, held=listing.elements
            )
        else:
            # The plan flushes and refills whatever the kernel holds; only the report needs
            # the listing.
            commands, _ = reconcile_plan(self.table, set(), wanted, now=now, held=1)
            report = ReconcileReport((), (), audited=False)
        shapes = frozenset(filter_shapes(KernelEntry.of(m) for m in wanted))
        if shapes != self._shapes:
            commands = admit_commands(self.table, shapes) + commands
        if self.count_traffic and remote != self._count_remote:
            commands = count_commands(self.table, remote, self.addresses) + commands
        if commands:
            self._context().run(commands)
        self._shapes = shapes
        self._count_remote = remote
        return report

    def _shutdown(self, flush: bool) -> None:
        try:
            if flush:
                self._context().run(close_commands(self.table))
        finally:
            if self._nft is not None:
                self._nft.close()
                self._nft = None
