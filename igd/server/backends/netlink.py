"""The fast path: plain mappings as nf_tables set elements, sent as raw netlink batches.

libnftables costs ~130 µs a change (it re-reads the table's definitions over netlink, then
parses text) plus a thread hop, since it blocks. A mapping without FILTERs or PEER port is one
element of `portmap` or `portmap_remote`, whose layout never changes: we encode it ourselves
and send one NFNL batch on a non-blocking NETLINK_NETFILTER socket from the event loop.

Wire format (linux/netfilter/nfnetlink.h, nf_tables.h): a batch is NFNL_MSG_BATCH_BEGIN, then
NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM messages, then NFNL_MSG_BATCH_END; the kernel runs it
as one transaction inside sendmsg() (an error in any message aborts all of it) and queues one
ACK or error per message that asked for one. Each field of a concatenated key or data is
padded to 4 octets: inet_proto 1 octet, inet_service 2 octets network order, ipv4_addr 4.

Encoding and reply parsing are pure; only `NetlinkSets` touches a socket.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address

from igd.model import Mapping
from igd.server.backends import BackendError, KernelEntry, nft_payload
from igd.server.backends.nft_payload import (
    ADDR_MAP,
    ADDR_REMOTE_MAP,
    CONTAINERS,
    COUNTED,
    COUNTED_ADDR,
    COUNTED_ADDR_REMOTE,
    COUNTED_REMOTE,
    COUNTERS,
    REMOTE_MAP,
    WILDCARD_MAP,
    check_entry,
    check_table_name,
    elements,
)

NETLINK_NETFILTER = 12
NETLINK_CAP_ACK = 10  # <linux/netlink.h>: errors carry only the request's header
NETLINK_EXT_ACK = 11  # ... and the kernel's explanation, when it gives one
SOL_NETLINK = 270

NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200  # in an error reply: extended-ACK attributes follow
NLMSGERR_ATTR_MSG = 1

NFNL_MSG_BATCH_BEGIN = 0x10  # NLMSG_MIN_TYPE
NFNL_MSG_BATCH_END = 0x11
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_UNSPEC = 0
NFPROTO_IPV4 = 2
NLA_F_NESTED = 0x8000


class NftMsg(IntEnum):
    """nf_tables message types (enum nf_tables_msg_types) we send."""

    NEWSETELEM = 12
    GETSETELEM = 13
    DELSETELEM = 14


class SetElemListAttr(IntEnum):
    """enum nft_set_elem_list_attributes."""

    TABLE = 1
    SET = 2
    ELEMENTS = 3


NFTA_LIST_ELEM = 1


class SetElemAttr(IntEnum):
    """enum nft_set_elem_attributes (the ones we use)."""

    KEY = 1
    DATA = 2
    TIMEOUT = 4


NFTA_DATA_VALUE = 1

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id (host order)
_NLATTR = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")

MAX_ELEMENTS_PER_MESSAGE = 256
"""An attribute's length is 16 bits: the elements of one set are split into messages of at
most this many (under 100 octets each, so well below 64 KiB)."""

MAX_BATCH = 128 * 1024
"""Largest batch we send (the socket's default send buffer is ~208 KiB); bigger changes
take the libnftables path, which splits them itself."""

MAX_REFILL_BATCH = 64 * 1024 * 1024
"""Largest batch `transact(..., large=True)` sends: a start-up refill of every mapping in one
transaction (50,000 mappings take about 3.5 MB), with the send buffer raised to fit it, as
nft does for its own large batches."""

SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; not in Python's socket module
SO_RCVBUFFORCE = 33

ACK_TIMEOUT = 5.0
"""Seconds to wait for the kernel's replies; they are queued during sendmsg, so this only
guards against a lost reply."""


@dataclass(frozen=True, slots=True)
class Element:
    """One element in kernel layout: key, data (None in a delete) and timeout in ms."""

    key: bytes
    data: bytes | None = None
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SetOp:
    """One message: add (NEWSETELEM) or delete (DELSETELEM) elements of one set; a delete
    with no elements flushes the set (the kernel's reading of a list without elements)."""

    add: bool
    container: str
    elements: tuple[Element, ...]
    exclusive: bool = False
    """NLM_F_EXCL: fail with EEXIST if an element exists at all, even with the same data."""
    text: str = ""
    """The change in nft syntax, for error messages."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The kernel's answer to one message: errno 0 is an ACK."""

    seq: int
    errno: int
    message: str = ""


# -- encoding -------------------------------------------------------------------------------


def is_plain(entry: KernelEntry) -> bool:
    """Whether the entry is one element of `portmap` or `portmap_remote` and nothing else."""
    return not entry.filters and entry.peer_port == 0


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big") + b"\0\0"


def entry_key(entry: KernelEntry) -> bytes:
    """The key: [remote ipv4_addr .] [external ipv4_addr .] inet_proto . inet_service, each
    padded to 4 octets."""
    key = bytes((entry.protocol.number, 0, 0, 0)) + _port(entry.external_port)
    if entry.external_address is not None:
        key = entry.external_address.packed + key
    return key if entry.remote_host is None else entry.remote_host.packed + key


def entry_data(entry: KernelEntry) -> bytes:
    """The data: ipv4_addr . inet_service."""
    return entry.internal_address.packed + _port(entry.internal_port)


def container(entry: KernelEntry) -> str:
    """The map that holds a plain entry."""
    if entry.external_address is not None:
        return ADDR_MAP if entry.remote_host is None else ADDR_REMOTE_MAP
    return WILDCARD_MAP if entry.remote_host is None else REMOTE_MAP


def counter_set(entry: KernelEntry) -> str:
    """The set that counts an entry's traffic (its key is the map's key, without data)."""
    if entry.external_address is not None:
        return COUNTED_ADDR if entry.remote_host is None else COUNTED_ADDR_REMOTE
    return COUNTED if entry.remote_host is None else COUNTED_REMOTE


_Item = tuple[str, KernelEntry, int | None]
"""One element to write: its set, the entry it belongs to, its timeout in seconds."""


def plain_ops(
    removed: Iterable[KernelEntry], added: Iterable[tuple[KernelEntry, int | None]]
) -> list[SetOp]:
    """The messages of `nft_payload.replace_elements` for plain entries, in the same order:
    re-add what is removed (so deleting an element the kernel already timed out succeeds),
    delete it, add the new entries; timeouts in seconds, None = none. A renewal (key removed
    and added) keeps its counter element, as there."""
    new = [(_checked(e), t) for e, t in added]
    kept = {(e.protocol, e.external_port, e.remote_host, e.external_address) for e, _ in new}
    gone: list[_Item] = []
    for entry in map(_checked, removed):
        gone.append((container(entry), entry, None))
        at = (entry.protocol, entry.external_port, entry.remote_host, entry.external_address)
        if at not in kept:
            gone.append((counter_set(entry), entry, None))
    fresh: list[_Item] = []
    for entry, timeout in new:
        fresh += [(container(entry), entry, timeout), (counter_set(entry), entry, None)]
    return [*_ops(True, gone), *_ops(False, gone), *_ops(True, fresh)]


def _checked(entry: KernelEntry) -> KernelEntry:
    check_entry(entry)
    if not is_plain(entry):
        raise ValueError(f"not a plain entry: {entry}")
    return entry


def _ops(add: bool, items: Sequence[_Item]) -> list[SetOp]:
    groups: dict[str, list[tuple[KernelEntry, int | None]]] = {n: [] for n in CONTAINERS}
    for name, entry, timeout in items:
        groups[name].append((entry, timeout))
    ops = []
    for name, group in groups.items():
        counter = name in COUNTERS
        for start in range(0, len(group), MAX_ELEMENTS_PER_MESSAGE):
            chunk = group[start : start + MAX_ELEMENTS_PER_MESSAGE]
            found = tuple(
                Element(
                    entry_key(e),
                    entry_data(e) if add and not counter else None,
                    None if t is None or not add else t * 1000,
                )
                for e, t in chunk
            )
            ops.append(SetOp(add, name, found, text=_describe(add, name, chunk)))
    return ops


def _describe(add: bool, name: str, chunk: list[tuple[KernelEntry, int | None]]) -> str:
    texts = []
    for entry, timeout in chunk[:3]:
        el = next(e for e in elements(entry) if e.container == name)
        text = el.key
        if add and el.data is not None:
            text += "" if timeout is None else f" timeout {timeout}s"
            text += f" : {el.data}"
        texts.append(text)
    more = f", ... ({len(chunk)} elements)" if len(chunk) > 3 else ""
    return f"{'add' if add else 'delete'} element {name} {{ {', '.join(texts)}{more} }}"


def _attr(kind: int, payload: bytes) -> bytes:
    size = _NLATTR.size + len(payload)
    if size > 0xFFFF:
        raise ValueError("netlink attribute longer than 64 KiB")
    return _NLATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def _nest(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    # struct nfgenmsg: family, version (NFNETLINK_V0), res_id (big-endian)
    payload = bytes((family, 0)) + res_id.to_bytes(2, "big") + body
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


def encode_element(element: Element) -> bytes:
    """One NFTA_LIST_ELEM: key, timeout (big-endian u64 ms), data."""
    parts = [_nest(SetElemAttr.KEY, _attr(NFTA_DATA_VALUE, element.key))]
    if element.timeout_ms is not None:
        parts.append(_attr(SetElemAttr.TIMEOUT, element.timeout_ms.to_bytes(8, "big")))
    if element.data is not None:
        parts.append(_nest(SetElemAttr.DATA, _attr(NFTA_DATA_VALUE, element.data)))
    return _nest(NFTA_LIST_ELEM, *parts)


def encode_op(table: str, op: SetOp, seq: int) -> bytes:
    """One NEWSETELEM / DELSETELEM message for `op` in table `ip <table>`."""
    body = _attr(SetElemListAttr.TABLE, table.encode() + b"\0") + _attr(
        SetElemListAttr.SET, op.container.encode() + b"\0"
    )
    if op.elements or op.add:
        body += _nest(SetElemListAttr.ELEMENTS, *(encode_element(e) for e in op.elements))
    flags = NLM_F_REQUEST | NLM_F_ACK
    if op.add:
        flags |= NLM_F_CREATE | (NLM_F_EXCL if op.exclusive else 0)
    kind = NftMsg.NEWSETELEM if op.add else NftMsg.DELSETELEM
    return _message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, NFPROTO_IPV4, 0, body)


def encode_batch(table: str, ops: Sequence[SetOp], seq: int) -> bytes:
    """BATCH_BEGIN (sequence `seq`), one message per op (seq + 1, ...), BATCH_END."""
    check_table_name(table)

    def frame(kind: int, at: int) -> bytes:
        return _message(kind, NLM_F_REQUEST, at, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")

    parts = [frame(NFNL_MSG_BATCH_BEGIN, seq)]
    parts += [encode_op(table, op, seq + 1 + i) for i, op in enumerate(ops)]
    parts.append(frame(NFNL_MSG_BATCH_END, seq + 1 + len(ops)))
    return b"".join(parts)


# -- restoring: elements encoded straight from the mapping table ---------------------------

REFILL_MESSAGE = 60 * 1024
"""Octets of encoded elements per message when restoring (an attribute's length is 16 bits;
an element is at most 60 octets): ~1,000 elements a message, so 50 ACKs for 50,000."""


@dataclass(frozen=True, slots=True)
class PlainElements:
    """The forwarding elements of every plain mapping as encoded NFTA_LIST_ELEMs, grouped
    by map: what a repair writes back first, built without intermediate objects (one
    struct.pack each, ~10x faster than `plain_ops` and `encode_element`)."""

    maps: dict[str, list[bytes]]
    """Forwarding elements (key, timeout, data): what makes the mappings work."""
    plain: list[Mapping]
    """The mappings encoded (their counter elements: `counter_elements`)."""
    rest: list[Mapping]
    """Mappings with FILTERs or a PEER port: not plain, written through libnftables."""

    @property
    def count(self) -> int:
        """Plain mappings held."""
        return sum(map(len, self.maps.values()))


def _element_struct(addresses: int, timeout: bool, data: bool) -> struct.Struct:
    """One NFTA_LIST_ELEM of a plain mapping as one struct: the attribute headers (host
    order, passed as bytes), key [remote .] [external .] proto . port, then the timeout and
    data if any (network order)."""
    layout = f">12s{'I' * addresses}B3xH2x"
    if timeout:
        layout += "4sQ"
    if data:
        layout += "8sIH2x"
    return struct.Struct(layout)


def _element_heads(addresses: int, timeout: bool, data: bool) -> bytes:
    key = 8 + 4 * addresses  # each field padded to 4 octets
    size = 4 + 8 + key + (12 if timeout else 0) + (16 if data else 0)
    return (
        _NLATTR.pack(size, NFTA_LIST_ELEM | NLA_F_NESTED)
        + _NLATTR.pack(8 + key, SetElemAttr.KEY | NLA_F_NESTED)
        + _NLATTR.pack(4 + key, NFTA_DATA_VALUE)
    )


_SHAPES = [(n, t, d) for n in (0, 1, 2) for t, d in ((False, False), (False, True), (True, True))]
_ELEMENT = {shape: (_element_struct(*shape), _element_heads(*shape)) for shape in _SHAPES}
_TIMEOUT = _NLATTR.pack(12, SetElemAttr.TIMEOUT)
_DATA_VALUE = _NLATTR.pack(16, SetElemAttr.DATA | NLA_F_NESTED) + _NLATTR.pack(12, NFTA_DATA_VALUE)
_SETS = {
    (False, False): (WILDCARD_MAP, COUNTED),
    (True, False): (REMOTE_MAP, COUNTED_REMOTE),
    (False, True): (ADDR_MAP, COUNTED_ADDR),
    (True, True): (ADDR_REMOTE_MAP, COUNTED_ADDR_REMOTE),
}
"""The map and the counter set of a plain key, by (remote host?, external address?)."""


def plain_elements(mappings: Iterable[Mapping], now: float) -> PlainElements:
    """Encode every plain mapping's map element (byte for byte what `encode_element` makes
    of `plain_ops`' elements); ValueError for a field the kernel would refuse."""
    maps: dict[str, list[bytes]] = {name: [] for name, _ in _SETS.values()}
    plain: list[Mapping] = []
    rest: list[Mapping] = []
    grace, longest = nft_payload.KERNEL_GRACE, nft_payload.MAX_ELEMENT_TIMEOUT
    try:
        for mapping in mappings:
            if mapping.filters or mapping.peer_port:
                rest.append(mapping)
                continue
            plain.append(mapping)
            key = mapping.key
            prefix = [_address(a) for a in (key.remote_host, key.external_address) if a is not None]
            name, _ = _SETS[key.remote_host is not None, key.external_address is not None]
            proto, port = key.protocol.number, _checked_port(key.external_port)
            internal = _address(mapping.internal_address), _checked_port(mapping.internal_port)
            data = (_DATA_VALUE, *internal)
            # element_timeout, inline: remaining lease plus grace; none if too long.
            remaining = mapping.expires - now
            timeout = None
            if remaining == remaining and remaining != math.inf:  # not NaN, not infinite
                seconds = math.ceil(max(0.0, remaining)) + grace
                timeout = None if seconds > longest else seconds
            if timeout is None:
                layout, heads = _ELEMENT[len(prefix), False, True]
                maps[name].append(layout.pack(heads, *prefix, proto, port, *data))
            else:
                layout, heads = _ELEMENT[len(prefix), True, True]
                ms = timeout * 1000
                maps[name].append(layout.pack(heads, *prefix, proto, port, _TIMEOUT, ms, *data))
    except (struct.error, OverflowError, AttributeError, TypeError) as exc:
        raise ValueError(f"invalid mapping: {exc}") from exc
    return PlainElements(maps, plain, rest)


def counter_elements(plain: Iterable[Mapping]) -> dict[str, list[bytes]]:
    """Encode the counter-set element (key only) of each plain mapping, which
    `plain_elements` has checked."""
    counters: dict[str, list[bytes]] = {name: [] for _, name in _SETS.values()}
    for mapping in plain:
        key = mapping.key
        prefix = [int(a) for a in (key.remote_host, key.external_address) if a is not None]
        _, counted = _SETS[key.remote_host is not None, key.external_address is not None]
        layout, heads = _ELEMENT[len(prefix), False, False]
        counters[counted].append(
            layout.pack(heads, *prefix, key.protocol.number, key.external_port)
        )
    return counters


def _address(address: object) -> int:
    if not isinstance(address, IPv4Address):
        raise ValueError(f"invalid IPv4 address {address!r}")
    return int(address)


def _checked_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port!r}")
    return port


def element_messages(
    table: str, groups: dict[str, list[bytes]], seq: int, *, flush: Sequence[str] = ()
) -> list[tuple[bytes, str]]:
    """NEWSETELEM messages (seq, seq + 1, ...) adding pre-encoded elements, after a flush of
    each set in `flush`; each with its description for errors."""
    check_table_name(table)
    head = _attr(SetElemListAttr.TABLE, table.encode() + b"\0")
    out: list[tuple[bytes, str]] = []

    def add(kind: int, flags: int, name: str, body: bytes, text: str) -> None:
        body = head + _attr(SetElemListAttr.SET, name.encode() + b"\0") + body
        kind |= NFNL_SUBSYS_NFTABLES << 8
        out.append((_message(kind, flags, seq + len(out), NFPROTO_IPV4, 0, body), text))

    for name in flush:
        add(NftMsg.DELSETELEM, NLM_F_REQUEST | NLM_F_ACK, name, b"", f"flush set {name}")
    for name, encoded in groups.items():
        at = 0
        while at < len(encoded):
            size, end = 0, at
            while end < len(encoded) and size + len(encoded[end]) <= REFILL_MESSAGE:
                size += len(encoded[end])
                end += 1
            nest = _NLATTR.pack(4 + size, SetElemListAttr.ELEMENTS | NLA_F_NESTED)
            text = f"add element {name} {{ ... ({end - at} elements) }}"
            flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
            add(NftMsg.NEWSETELEM, flags, name, nest + b"".join(encoded[at:end]), text)
            at = end
    return out


def encode_get(table: str, name: str, key: bytes, seq: int) -> bytes:
    """A GETSETELEM request for one key (not batched): the kernel answers with the element
    and an ACK, or with ENOENT (no such element, set or table)."""
    body = _attr(SetElemListAttr.TABLE, check_table_name(table).encode() + b"\0")
    body += _attr(SetElemListAttr.SET, name.encode() + b"\0")
    body += _nest(SetElemListAttr.ELEMENTS, encode_element(Element(key)))
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NftMsg.GETSETELEM
    return _message(kind, NLM_F_REQUEST | NLM_F_ACK, seq, NFPROTO_IPV4, 0, body)


# -- replies --------------------------------------------------------------------------------


def parse_replies(data: bytes) -> Iterator[Reply]:
    """The NLMSG_ERROR messages (errors and ACKs) in one datagram; other types are skipped."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise BackendError("truncated netlink reply from the kernel")
        body = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if kind != NLMSG_ERROR or len(body) < _ERRNO.size:
            continue
        (error,) = _ERRNO.unpack_from(body)
        yield Reply(seq, -error, _ext_ack_message(body, flags) if error else "")


def _ext_ack_message(body: bytes, flags: int) -> str:
    """NLMSGERR_ATTR_MSG, if the kernel explained the error (after the capped request header)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    offset = _ERRNO.size + _NLMSGHDR.size
    while offset + _NLATTR.size <= len(body):
        size, kind = _NLATTR.unpack_from(body, offset)
        if size < _NLATTR.size:
            break
        if kind & 0x3FFF == NLMSGERR_ATTR_MSG:
            text = body[offset + _NLATTR.size : offset + size].rstrip(b"\0")
            return text.decode(errors="replace")
        offset += (size + 3) & ~3
    return ""


def describe_failure(reply: Reply, op: SetOp | str | None) -> str:
    """The BackendError text for a refused batch: what failed (an op or its text), and why
    in words."""
    why = os.strerror(reply.errno) if reply.errno else "unknown error"
    if reply.message:
        why += f" ({reply.message})"
    what = "the transaction" if op is None else op if isinstance(op, str) else op.text
    return f"nftables refused {what}: {why}; nothing was changed"


# -- the socket -----------------------------------------------------------------------------


class NetlinkSets:
    """A NETLINK_NETFILTER socket that sends set-element batches from the event loop.

    Create it in the network namespace it must act in (a socket stays in the namespace it
    was made in); use it from one event loop, one batch at a time."""

    def __init__(self) -> None:
        """Open the socket; OSError if netlink is unavailable here."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.bind((0, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._seq = 0
        self._stale = False  # replies of an abandoned batch may still be queued

    async def transact(self, table: str, ops: Sequence[SetOp], *, large: bool = False) -> None:
        """Run `ops` as one transaction; BackendError (and no change) if the kernel refuses.
        `large`: up to MAX_REFILL_BATCH octets, the send buffer raised to fit."""
        if not ops:
            return
        seq = self._next_seq(len(ops) + 2)
        batch = encode_batch(table, ops, seq)
        await self._run(batch, seq, [op.text for op in ops], large=large)

    async def transact_elements(
        self, table: str, groups: dict[str, list[bytes]], *, flush: Sequence[str] = ()
    ) -> None:
        """Add pre-encoded elements (`plain_elements`), after flushing the sets in `flush`,
        as one transaction of up to MAX_REFILL_BATCH octets; BackendError and no change if
        the kernel refuses."""
        most = len(flush) + sum(map(len, groups.values())) + 2  # at most one message each
        seq = self._next_seq(most)
        messages = element_messages(table, groups, seq + 1, flush=flush)
        if not messages:
            return

        def frame(kind: int, at: int) -> bytes:
            return _message(kind, NLM_F_REQUEST, at, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")

        batch = b"".join(
            [
                frame(NFNL_MSG_BATCH_BEGIN, seq),
                *(m for m, _ in messages),
                frame(NFNL_MSG_BATCH_END, seq + 1 + len(messages)),
            ]
        )
        await self._run(batch, seq, [text for _, text in messages], large=True)

    async def _run(self, batch: bytes, seq: int, texts: Sequence[str], *, large: bool) -> None:
        """Send one batch (BEGIN at `seq`, a message per text, END) and read its replies."""
        if len(batch) > (MAX_REFILL_BATCH if large else MAX_BATCH):
            raise BackendError(f"netlink batch of {len(batch)} octets is too large")
        if len(batch) > MAX_BATCH:
            self._fit(len(batch), len(texts))
        if self._stale:
            self._drain()
        try:
            sent = self._sock.send(batch)
        except OSError as exc:
            raise BackendError(f"cannot send to nftables: {exc.strerror}") from exc
        if sent != len(batch):
            raise BackendError("nftables batch sent only in part")
        # The kernel has run (and committed or aborted) the batch inside send(): reading the
        # replies only tells us which.
        self._stale = True  # until every reply is read (cancellation, timeout, early error)
        try:
            async with asyncio.timeout(ACK_TIMEOUT):
                failure = await self._await_replies(seq, texts)
        except TimeoutError:
            raise BackendError("no answer from nftables; the change may have been made") from None
        except OSError as exc:
            raise BackendError(f"cannot read nftables' answer: {exc.strerror}") from exc
        if failure is not None:
            raise BackendError(failure)

    def close(self) -> None:
        """Close the socket; idempotent."""
        self._sock.close()

    def _fit(self, size: int, messages: int) -> None:
        """Let one sendmsg carry `size` octets, and the receive queue hold an ACK for each of
        `messages` (the kernel counts about 1 KiB of buffer per queued ACK)."""
        for name, forced, wanted in (
            ("send", SO_SNDBUFFORCE, size + 64 * 1024),
            ("receive", SO_RCVBUFFORCE, (messages + 16) * 2048),
        ):
            plain = socket.SO_SNDBUF if name == "send" else socket.SO_RCVBUF
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, forced, wanted)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, plain, wanted)

    def _next_seq(self, count: int) -> int:
        if self._seq + count >= 0xFFFF_FFFF:
            self._seq = 0
        seq = self._seq + 1
        self._seq += count
        return seq

    async def _await_replies(self, seq: int, ops: Sequence[str]) -> str | None:
        """Collect one reply per op (each asked for an ACK); the first error wins."""
        waiting = set(range(seq + 1, seq + 1 + len(ops)))
        failure: str | None = None
        loop = asyncio.get_running_loop()
        while waiting:
            data = await loop.sock_recv(self._sock, 65536)
            for reply in parse_replies(data):
                if reply.seq in (seq, seq + 1 + len(ops)) and reply.errno:
                    # Refused as a whole (the commit failed, or the batch was malformed).
                    return describe_failure(reply, None)
                if reply.seq not in waiting:
                    continue  # left over from an abandoned batch
                waiting.discard(reply.seq)
                if reply.errno and failure is None:
                    failure = describe_failure(reply, ops[reply.seq - seq - 1])
        self._stale = False
        return failure

    def _drain(self) -> None:
        while True:
            try:
                self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # overrun while nobody read: keep draining
                    continue
                raise BackendError(f"cannot read from nftables: {exc.strerror}") from exc
