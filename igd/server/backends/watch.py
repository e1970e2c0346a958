"""Watching the ruleset: notice when another program removes (part of) our table.

`nft flush ruleset`, an OpenWrt fw4 reload or a firewalld reload delete every table, ours
included, and nothing would notice until the next start. nf_tables multicasts every committed
change to the netlink group NFNLGRP_NFTABLES (what `nft monitor` reads): one message per
object changed, then NFT_MSG_NEWGEN naming the process (thread) that committed. A deleted
table is one DELTABLE message however many mappings it held. We collect the deletions that
touch our table and, at the NEWGEN that closes their transaction, report them unless one of
our own threads committed it.

Parsing is pure (`parse_events`, `Transactions`); only `RulesetWatcher` touches a socket.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from igd.server.backends.netlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4

NFPROTO_IPV6 = 10

NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in Python's socket module

NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
DELETIONS = {
    2: "table",  # NFT_MSG_DELTABLE
    5: "chain",  # NFT_MSG_DELCHAIN
    8: "rule",  # NFT_MSG_DELRULE
    11: "set",  # NFT_MSG_DELSET
    14: "element",  # NFT_MSG_DELSETELEM
    26: "table",  # NFT_MSG_DESTROYTABLE (6.3+), and the other DESTROY kinds
    27: "chain",
    28: "rule",
    29: "set",
    30: "element",
}
"""Message types that remove something, and what; the table name is attribute 1 in each."""

RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bytes the kernel may queue for us: a flush of a large ruleset is a burst of messages. If
it overflows anyway (ENOBUFS) we cannot tell what happened and report a loss."""

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class Event:
    """One notification: a deletion in a table (kind, family, table) or the end of a
    transaction (kind "commit", with the committing thread's id and name)."""

    kind: str
    family: int = 0
    table: str = ""
    pid: int = 0
    process: str = ""


def _attributes(body: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _NLATTR.size <= len(body):
        size, kind = _NLATTR.unpack_from(body, offset)
        if size < _NLATTR.size or offset + size > len(body):
            break
        found.setdefault(kind & 0x3FFF, body[offset + _NLATTR.size : offset + size])
        offset += (size + 3) & ~3
    return found


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def parse_events(data: bytes) -> Iterator[Event]:
    """The deletions and commits in one datagram from NFNLGRP_NFTABLES; others skipped."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return  # truncated: nothing more to read in this datagram
        body = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        message = kind & 0xFF
        # Each element our grants add is one NEWSETELEM notification: skip those unread.
        if kind >> 8 != NFNL_SUBSYS_NFTABLES or len(body) < 4:
            continue
        if message != NFT_MSG_NEWGEN and message not in DELETIONS:
            continue
        family, attrs = body[0], _attributes(body[4:])
        if message == NFT_MSG_NEWGEN:
            pid = attrs.get(NFTA_GEN_PROC_PID, b"")
            yield Event(
                "commit",
                pid=int.from_bytes(pid, "big") if len(pid) == 4 else 0,
                process=_text(attrs.get(NFTA_GEN_PROC_NAME, b"")),
            )
        elif message in DELETIONS and 1 in attrs:
            yield Event(DELETIONS[message], family, _text(attrs[1]))


@dataclass(slots=True)
class Transactions:
    """Collects the deletions of our table until their commit; pure."""

    table: str
    own: set[int] = field(default_factory=set)
    """Thread ids whose commits are ours (the nft worker, the event loop's netlink socket)."""
    pending: list[Event] = field(default_factory=list)
    family: int = NFPROTO_IPV4
    """The table's family: `ip` for mappings, `ip6` for pinholes (same name, other table)."""

    def feed(self, event: Event) -> str | None:
        """Take one event; at a foreign commit that removed something of ours, say what."""
        if event.kind != "commit":
            if event.family == self.family and event.table == self.table:
                self.pending.append(event)
            return None
        touched, self.pending = self.pending, []
        if not touched or event.pid in self.own:
            return None
        kinds = sorted({e.kind for e in touched})
        what = "the table" if "table" in kinds else ", ".join(kinds)
        who = f"{event.process or 'unknown'} (pid {event.pid})"
        return f"{what} deleted by {who}"


class RulesetWatcher:
    """A NETLINK_NETFILTER socket subscribed to NFNLGRP_NFTABLES; make it in the namespace
    to watch, read it from one event loop."""

    def __init__(self) -> None:
        """Open and subscribe; OSError if netlink is unavailable here."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    async def next_change(self, transactions: Transactions) -> str:
        """Wait for a foreign transaction that removed something of our table; describe it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self._sock, 1 << 16)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # Events were lost: assume the worst, the caller checks and repairs.
                transactions.pending.clear()
                return "nftables notifications overflowed (a large change by another program)"
            for event in parse_events(data):
                found = transactions.feed(event)
                if found is not None:
                    return found

    def drain(self, transactions: Transactions) -> tuple[str | None, bool]:
        """Read what is queued without waiting: a foreign change found in it (or None), and
        whether notifications were lost meanwhile. Our own restore notifies once per
        element, enough to overflow the buffer: the caller then checks the table instead
        of restoring it again."""
        found: str | None = None
        overflowed = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return found, overflowed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                overflowed = True
                transactions.pending.clear()
                continue
            for event in parse_events(data):
                change = transactions.feed(event)
                found = found or change

    def close(self) -> None:
        """Close the socket; idempotent."""
        self._sock.close()


async def repair_losses(
    watcher: RulesetWatcher,
    transactions: Transactions,
    restore: Callable[[str], Awaitable[None]],
    intact: Callable[[], Awaitable[bool]],
    counted: Callable[[], None],
) -> None:
    """Until cancelled: await restore(what happened) after each transaction of another
    program that removed (part of) the table, counting each with `counted`; closes the
    watcher at the end. Both backends (ip and ip6) watch through this loop."""
    try:
        while True:
            reason: str | None = await watcher.next_change(transactions)
            while reason is not None:
                counted()
                await restore(reason)
                # Changes by others during the restore are still queued (and restored
                # again); if our own notifications overflowed the buffer, those may be
                # lost: then check that the table is there at least.
                reason, overflowed = watcher.drain(transactions)
                if reason is None and overflowed and not await intact():
                    reason = "the table is missing (notifications were lost)"
    finally:
        watcher.close()
