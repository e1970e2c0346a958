"""The nftables backend: mappings are elements of hash sets and maps in a table of our own.

Shape (docs/nftables.md shows the listing and explains the choices):

    table ip igd {
      map portmap, portmap_remote      (proto, port[, remote]) -> internal address . port
      set filtered, filtered_remote    mappings with FILTERs (RFC 6887 §13.3)
      set allowed, allowed_remote      the peers those FILTERs admit
      map filters_remote               FILTERs of remote-host entries, kept whole to list back
      map peers                        PEER flows (RFC 6887 §12) -> external port
      chain prerouting (nat, dstnat)   judge FILTERs, then DNAT: remote-specific map first
      chain admit, admit_remote        one hash lookup per prefix length; miss = drop
      chain postrouting (nat, srcnat - 10)  masquerade PEER flows to their external port
    }

Rules are fixed; only elements change, and each is a hash-set element: per-packet and
per-change cost stay O(1) however many mappings exist. Payload building and listing parsing
are pure (`nft_payload`, `nft_listing`); only `NftablesBackend` talks to the kernel, from one
worker thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from igd.model import Mapping
from igd.server.backends import BackendError, KernelEntry, ReconcileReport
from igd.server.backends.libnft import Nft
from igd.server.backends.nft_listing import Listing, parse_entries, parse_listing
from igd.server.backends.nft_payload import (
    apply_commands,
    check_entry,
    check_ifname,
    check_table_name,
    close_commands,
    list_command,
    open_commands,
    reconcile_plan,
)

# parse_entries stays importable from here: lab tools read the kernel's table with it.
__all__ = ["NftablesBackend", "check_netns_name", "enter_netns", "parse_entries"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_NETNS = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

CLONE_NEWNET = 0x40000000


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
    """Mappings as elements of nftables sets and maps, applied from one worker thread."""

    def __init__(self, table: str, external_interface: str, *, netns: str | None = None) -> None:
        self.table = check_table_name(table)
        self.external_interface = check_ifname(external_interface)
        self.netns = None if netns is None else check_netns_name(netns)
        # libnftables blocks, and a context must stay on one thread: one worker owns both.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nft-{table}")
        self._nft: Nft | None = None  # created and used only on the worker thread
        self._closed = False

    async def open(self) -> None:
        """Create table, sets, chains and rules idempotently, keeping existing elements."""
        await self._call(functools.partial(self._run, self._open_commands()))
        log.info("nftables table ip %s ready on %s", self.table, self.external_interface)

    async def apply(
        self, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
    ) -> None:
        """Remove then add as one kernel transaction; BackendError and no change on failure."""
        try:
            commands = apply_commands(self.table, removed, added, now=now)
        except ValueError as exc:
            raise BackendError(f"invalid mapping: {exc}") from exc
        if commands:
            await self._call(functools.partial(self._run, commands))

    async def reconcile(
        self, wanted: Sequence[Mapping], *, now: float, audit: bool = True
    ) -> ReconcileReport:
        """Make the kernel hold exactly `wanted` (one listing, one transaction)."""
        for mapping in wanted:  # fail before touching the kernel
            try:
                check_entry(KernelEntry.of(mapping))
            except ValueError as exc:
                raise BackendError(f"invalid mapping: {exc}") from exc
        return await self._call(functools.partial(self._reconcile, list(wanted), now, audit))

    async def entries(self) -> set[KernelEntry]:
        """What the table holds now, as entries (filters and PEER ports included)."""
        return await self._call(self._entries)

    async def close(self, *, flush: bool) -> None:
        """Stop the worker; with flush, delete the table (every mapping) first."""
        if self._closed:
            return
        try:
            await self._call(functools.partial(self._shutdown, flush))
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)

    def _open_commands(self) -> str:
        return open_commands(self.table, self.external_interface)

    async def _call(self, job: Callable[[], _T]) -> _T:
        if self._closed:
            raise BackendError("nftables backend is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    # Everything below runs on the worker thread.

    def _context(self) -> Nft:
        if self._nft is None:
            if self.netns is not None:
                enter_netns(self.netns)
            self._nft = Nft()
        return self._nft

    def _run(self, commands: str) -> None:
        self._context().run(commands)

    def _listing(self) -> Listing:
        return parse_listing(self._context().run_json(list_command(self.table)), self.table)

    def _entries(self) -> set[KernelEntry]:
        return set(self._listing().entries)

    def _reconcile(self, wanted: list[Mapping], now: float, audit: bool) -> ReconcileReport:
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
        if commands:
            self._context().run(commands)
        return report

    def _shutdown(self, flush: bool) -> None:
        try:
            if flush:
                self._context().run(close_commands(self.table))
        finally:
            if self._nft is not None:
                self._nft.close()
                self._nft = None
