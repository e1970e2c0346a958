"""The kernel's neighbour table (ARP and NDP) over rtnetlink: which link-layer address each
LAN address answers from, to tell that two addresses belong to one host.

One RTM_GETNEIGH dump per question (a LAN's table is small); no dependency beyond `socket`.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NDA_DST = 1
NDA_LLADDR = 2
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
_HEADER = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BBHiHBB")
MAX_DUMP_BYTES = 4 * 1024 * 1024
"""A dump larger than this is cut short (a LAN of ~30,000 neighbours)."""

Link = tuple[int, bytes]
"""(interface index, link-layer address)."""


def parse_dump(data: bytes) -> tuple[dict[IPv4Address | IPv6Address, Link], bool]:
    """Neighbour entries with a known link-layer address in one recv's messages; and whether
    the dump ended (NLMSG_DONE or an error)."""
    found: dict[IPv4Address | IPv6Address, Link] = {}
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            return found, True
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return found, True
        if kind == RTM_NEWNEIGH and length >= _HEADER.size + _NDMSG.size:
            _, _, _, ifindex, state, _, _ = _NDMSG.unpack_from(data, offset + _HEADER.size)
            destination, lladdr = _attributes(
                data[offset + _HEADER.size + _NDMSG.size : offset + length]
            )
            if destination is not None and lladdr and not state & (NUD_INCOMPLETE | NUD_FAILED):
                found[destination] = (ifindex, lladdr)
        offset += (length + 3) & ~3
    return found, False


def _attributes(data: bytes) -> tuple[IPv4Address | IPv6Address | None, bytes]:
    destination: IPv4Address | IPv6Address | None = None
    lladdr = b""
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        value = data[offset + 4 : offset + length]
        if kind == NDA_DST and len(value) in (4, 16):
            destination = ip_address(value)
        elif kind == NDA_LLADDR:
            lladdr = value
        offset += (length + 3) & ~3
    return destination, lladdr


def neighbours() -> dict[IPv4Address | IPv6Address, Link]:
    """Every IPv4 and IPv6 neighbour of this network namespace with a link-layer address."""
    found: dict[IPv4Address | IPv6Address, Link] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(1.0)
        body = _NDMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0)
        header = _HEADER.pack(_HEADER.size + len(body), RTM_GETNEIGH,
                              NLM_F_REQUEST | NLM_F_DUMP, 1, 0)  # fmt: skip
        sock.send(header + body)
        received = 0
        while received < MAX_DUMP_BYTES:
            data = sock.recv(65536)
            received += len(data)
            batch, done = parse_dump(data)
            found.update(batch)
            if done or not data:
                break
    return found


def same_host(a: IPv4Address | IPv6Address, b: IPv4Address | IPv6Address) -> bool:
    """Whether `a` and `b` answer from one link-layer address on one interface (or are equal).

    Every address of a LAN host (global, ULA, temporary, link-local, IPv4) sits behind its
    one MAC; an address the gateway has no live entry for is nobody's but its own.
    """
    if a == b:
        return True
    try:
        table = neighbours()
    except OSError:
        return False
    first, second = table.get(a), table.get(b)
    return first is not None and first == second
