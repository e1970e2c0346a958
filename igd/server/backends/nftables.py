"""The nftables backend: mappings are elements of two maps in a table of our own.

Shape (docs/nftables.md explains the choices):

    table ip igd {
      map portmap { type inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; }
      map portmap_remote { type ipv4_addr . inet_proto . inet_service
                           : ipv4_addr . inet_service; flags timeout; }
      chain prerouting { type nat hook prerouting priority dstnat; policy accept;
        iifname "wan0" meta l4proto { tcp, udp }
            dnat ip to ip saddr . meta l4proto . th dport map @portmap_remote
        iifname "wan0" meta l4proto { tcp, udp } dnat ip to meta l4proto . th dport map @portmap
      }
    }

A lookup miss ends only its own rule, so remote-host-specific mappings are consulted first and
the wildcard map second. Two rules in all: per-packet and per-change cost stay O(1) however
many mappings exist. Payload building is pure (functions below); only `NftablesBackend` talks
to the kernel, from one worker thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from typing import Any, TypeVar

from igd.model import Mapping, Protocol
from igd.server.backends import BackendError, KernelEntry, ReconcileReport
from igd.server.backends.libnft import Nft, NftError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

WILDCARD_MAP = "portmap"
REMOTE_MAP = "portmap_remote"
CHAIN = "prerouting"

KERNEL_GRACE = 60
"""Seconds a kernel element outlives its lease: the daemon deletes on expiry itself; the kernel
timeout is only the safety net for a daemon that died."""

MAX_ELEMENT_TIMEOUT = 2_147_483
"""Longest element timeout we send: 2**31 ms, about 24.8 days. nft 1.0.6 refuses 10**8 s, and
older kernels handled element timeouts as 32-bit milliseconds; we stay below both. A longer
lease gets no kernel timeout rather than a shorter one: expiring before the daemon's lease
would break a live mapping."""

# Linux ifnames (dev_valid_name) are at most 15 bytes without '/', ':' or whitespace. We accept
# a stricter alphabet so the name, quoted in nft syntax, can never close its quotes or carry a
# wildcard ('*') or a comment ('#').
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
# nft 1.0.6 does not accept quoted table names, so the name must be a bare identifier.
_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_NETNS = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

CLONE_NEWNET = 0x40000000


# -- pure payload building ------------------------------------------------------------------


def check_ifname(name: str) -> str:
    """Return `name` if it is a safe Linux interface name; ValueError otherwise."""
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r}")
    return name


def check_table_name(name: str) -> str:
    """Return `name` if nft accepts it as a bare table identifier; ValueError otherwise."""
    if not _TABLE.fullmatch(name):
        raise ValueError(f"invalid nftables table name {name!r}")
    return name


def check_netns_name(name: str) -> str:
    """Return `name` if it is a plain file name under /run/netns; ValueError otherwise."""
    if not _NETNS.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid network namespace name {name!r}")
    return name


def check_entry(entry: KernelEntry) -> KernelEntry:
    """Return `entry` if every field has the type and range nft syntax needs; ValueError else."""
    if not isinstance(entry.protocol, Protocol):
        raise ValueError(f"invalid protocol {entry.protocol!r}")
    for port in (entry.external_port, entry.internal_port):
        if type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"invalid port {port!r}")
    if not isinstance(entry.internal_address, IPv4Address):
        raise ValueError(f"invalid internal address {entry.internal_address!r}")
    if entry.remote_host is not None and not isinstance(entry.remote_host, IPv4Address):
        raise ValueError(f"invalid remote host {entry.remote_host!r}")
    return entry


def element_timeout(mapping: Mapping, now: float) -> int | None:
    """Kernel timeout for a mapping: remaining lease plus grace, rounded up; None = none."""
    remaining = mapping.expires - now
    if math.isnan(remaining) or remaining == math.inf:
        return None
    seconds = math.ceil(max(0.0, remaining)) + KERNEL_GRACE
    return None if seconds > MAX_ELEMENT_TIMEOUT else seconds


def map_name(entry: KernelEntry) -> str:
    """The map holding this entry: remote-host-specific or wildcard."""
    return WILDCARD_MAP if entry.remote_host is None else REMOTE_MAP


def _key(entry: KernelEntry) -> str:
    check_entry(entry)
    service = f"{entry.protocol.value} . {entry.external_port}"
    return service if entry.remote_host is None else f"{entry.remote_host} . {service}"


def _element(entry: KernelEntry, timeout: int | None) -> str:
    after = "" if timeout is None else f" timeout {timeout}s"
    return f"{_key(entry)}{after} : {entry.internal_address} . {entry.internal_port}"


def _by_map(verb: str, table: str, items: Iterable[tuple[KernelEntry, str]]) -> list[str]:
    """One command per map (wildcard first): nft parses one long element list about three
    times faster than as many single-element commands."""
    groups: dict[str, list[str]] = {WILDCARD_MAP: [], REMOTE_MAP: []}
    for entry, text in items:
        groups[map_name(entry)].append(text)
    return [
        f"{verb} element ip {table} {name} {{ {', '.join(texts)} }}"
        for name, texts in groups.items()
        if texts
    ]


def add_elements(table: str, items: Iterable[tuple[KernelEntry, int | None]]) -> list[str]:
    """`add element` commands for (entry, timeout) pairs; adding an identical element is a
    no-op, adding a key that forwards elsewhere fails (EEXIST)."""
    return _by_map("add", table, ((e, _element(e, t)) for e, t in items))


def delete_elements(table: str, entries: Iterable[KernelEntry]) -> list[str]:
    """`delete element` commands for the entries' keys; a missing key fails (ENOENT)."""
    return _by_map("delete", table, ((e, _key(e)) for e in entries))


def replace_elements(
    table: str, removed: Iterable[KernelEntry], added: Iterable[tuple[KernelEntry, int | None]]
) -> str:
    """One transaction: delete `removed`, then add `added` (entry, timeout); "" if empty.

    Keys are unique within `removed` and within `added` (the mapping table's key space)."""
    check_table_name(table)
    gone = list(removed)
    lines = [
        # Add first: a no-op when the element is there, and it makes the delete succeed when
        # the kernel already timed the element out (or never had it). Without it, a renewal
        # of an expired element would abort the whole transaction with ENOENT.
        *add_elements(table, ((e, None) for e in gone)),
        *delete_elements(table, gone),
        *add_elements(table, added),
    ]
    return "".join(line + "\n" for line in lines)


def apply_commands(
    table: str, removed: Sequence[Mapping], added: Sequence[Mapping], *, now: float
) -> str:
    """The transaction for `Backend.apply`."""
    return replace_elements(
        table,
        (KernelEntry.of(m) for m in removed),
        ((KernelEntry.of(m), element_timeout(m, now)) for m in added),
    )


def open_commands(table: str, external_interface: str) -> str:
    """Create table, maps and chain idempotently; rewrite the two rules, keep the elements."""
    t, ifname = check_table_name(table), check_ifname(external_interface)
    match = f'iifname "{ifname}" meta l4proto {{ tcp, udp }}'
    return (
        f"add table ip {t}\n"
        f"add map ip {t} {WILDCARD_MAP} {{ type inet_proto . inet_service"
        " : ipv4_addr . inet_service; flags timeout; }\n"
        f"add map ip {t} {REMOTE_MAP} {{ type ipv4_addr . inet_proto . inet_service"
        " : ipv4_addr . inet_service; flags timeout; }\n"
        f"add chain ip {t} {CHAIN} {{ type nat hook prerouting priority dstnat; policy accept; }}\n"
        # Flushing a chain drops its rules, never map elements: mappings survive a restart,
        # and a changed external interface name replaces the old rules in the same commit.
        f"flush chain ip {t} {CHAIN}\n"
        f"add rule ip {t} {CHAIN} {match}"
        f" dnat ip to ip saddr . meta l4proto . th dport map @{REMOTE_MAP}\n"
        f"add rule ip {t} {CHAIN} {match} dnat ip to meta l4proto . th dport map @{WILDCARD_MAP}\n"
    )


def close_commands(table: str) -> str:
    """Delete the table; the `add` first makes this succeed when it is already gone."""
    t = check_table_name(table)
    return f"add table ip {t}\ndelete table ip {t}\n"


def list_command(table: str) -> str:
    """Listing of the table (one JSON document; nft 1.0.6 fails on two `list map` at once)."""
    return f"list table ip {check_table_name(table)}"


def entry_order(entry: KernelEntry) -> tuple[str, int, int, int, int]:
    """Sort key for entries (KernelEntry's own order fails comparing None with an address)."""
    remote = -1 if entry.remote_host is None else int(entry.remote_host)
    return (
        entry.protocol.value,
        entry.external_port,
        remote,
        int(entry.internal_address),
        entry.internal_port,
    )


def reconcile_plan(
    table: str, kernel: set[KernelEntry], wanted: Sequence[Mapping], *, now: float
) -> tuple[str, ReconcileReport]:
    """Transaction making the kernel hold exactly `wanted`, and what it removes and adds."""
    want = {KernelEntry.of(m): m for m in wanted}
    orphans = sorted(kernel - want.keys(), key=entry_order)
    missing = sorted(want.keys() - kernel, key=entry_order)
    matching = sorted(kernel & want.keys(), key=entry_order)
    # Matching entries are deleted and re-added too: that is how a timeout is refreshed
    # on kernels before 6.12, and the daemon's leases may have changed while it was down.
    commands = replace_elements(
        table,
        orphans + matching,
        ((e, element_timeout(want[e], now)) for e in sorted(want, key=entry_order)),
    )
    return commands, ReconcileReport(removed=tuple(orphans), added=tuple(missing))


def _protocol(value: Any) -> Protocol:
    if isinstance(value, int):
        return Protocol.from_number(value)
    return Protocol(value)


def _port(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if type(value) is not int:
        raise ValueError(f"unexpected port {value!r}")
    return value


def _parse_element(name: str, item: Any) -> KernelEntry:
    key, value = item
    if isinstance(key, dict) and "elem" in key:  # elements with a timeout wrap their key
        key = key["elem"]["val"]
    fields = key["concat"]
    target = value["concat"]
    remote = IPv4Address(fields[0]) if name == REMOTE_MAP else None
    proto, port = fields[-2:]
    return KernelEntry(
        _protocol(proto), _port(port), remote, IPv4Address(target[0]), _port(target[1])
    )


def parse_entries(doc: dict[str, Any], table: str) -> set[KernelEntry]:
    """The entries of both maps in a JSON listing of our table."""
    found: set[KernelEntry] = set()
    for obj in doc.get("nftables", []):
        m = obj.get("map") if isinstance(obj, dict) else None
        if not m or m.get("table") != table or m.get("name") not in (WILDCARD_MAP, REMOTE_MAP):
            continue
        for item in m.get("elem", []):
            try:
                found.add(_parse_element(m["name"], item))
            except (KeyError, TypeError, ValueError) as exc:
                raise NftError(f"unexpected element in map {m['name']}: {item!r}") from exc
    return found


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
    """Mappings as nftables map elements, applied from one dedicated worker thread."""

    def __init__(self, table: str, external_interface: str, *, netns: str | None = None) -> None:
        self.table = check_table_name(table)
        self.external_interface = check_ifname(external_interface)
        self.netns = None if netns is None else check_netns_name(netns)
        # libnftables blocks, and a context must stay on one thread: one worker owns both.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nft-{table}")
        self._nft: Nft | None = None  # created and used only on the worker thread
        self._closed = False

    async def open(self) -> None:
        """Create table, maps and rules idempotently, keeping existing elements."""
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

    async def reconcile(self, wanted: Sequence[Mapping], *, now: float) -> ReconcileReport:
        """Make the kernel hold exactly `wanted` (one listing, one transaction)."""
        for mapping in wanted:  # fail before touching the kernel
            try:
                check_entry(KernelEntry.of(mapping))
            except ValueError as exc:
                raise BackendError(f"invalid mapping: {exc}") from exc
        return await self._call(functools.partial(self._reconcile, list(wanted), now))

    async def entries(self) -> set[KernelEntry]:
        """What both maps hold now."""
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

    def _entries(self) -> set[KernelEntry]:
        return parse_entries(self._context().run_json(list_command(self.table)), self.table)

    def _reconcile(self, wanted: list[Mapping], now: float) -> ReconcileReport:
        commands, report = reconcile_plan(self.table, self._entries(), wanted, now=now)
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
