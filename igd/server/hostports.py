"""Ports the gateway itself serves on its external address, read from the kernel's socket
table of the daemon's network namespace: a NETLINK_SOCK_DIAG dump of listening TCP and
unconnected UDP sockets, or /proc/net/{tcp,udp,tcp6,udp6} where sock_diag is unavailable.

A mapping of such a port would DNAT the WAN's packets for the router's own service (its SSH,
its VPN) to a LAN host, so the gateway never hands one out (`Gateway.host_ports`). Parsing is
pure (`parse_diag`, `parse_table`, `host_ports`); `HostPorts` reads when a request asks and
the last reading is older than `max_age`: an idle daemon reads nothing.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Literal

from igd.model import Protocol

log = logging.getLogger("igd.hostports")

TABLES = {
    "tcp": Protocol.TCP,
    "tcp6": Protocol.TCP,
    "udp": Protocol.UDP,
    "udp6": Protocol.UDP,
}
"""The /proc/net files read, and the protocol of their sockets."""

TCP_LISTEN = "0A"
"""include/net/tcp_states.h: TCP_LISTEN, as /proc/net/tcp prints the state."""

MAX_AGE = 0.25
"""Seconds a sock_diag reading serves requests: a service started on the gateway is protected
within this time. One reading (four dumps) costs ~0.2 ms: the kernel walks only listening
TCP sockets and the UDP table, so ~0.1% of a core under constant load."""
PROC_MAX_AGE = 1.0
"""The same for the /proc fallback: a reading there costs ~9 ms on a 6.x kernel whatever the
namespace holds (/proc/net/tcp and tcp6 walk the whole established-socket hash, ~4 ms each),
so at most ~1% of a core under constant load."""

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED_STATE, TCP_CLOSE_STATE, TCP_LISTEN_STATE = 1, 7, 10
DUMPS = (
    (socket.AF_INET, Protocol.TCP, 1 << TCP_LISTEN_STATE),
    (socket.AF_INET6, Protocol.TCP, 1 << TCP_LISTEN_STATE),
    # An unconnected UDP socket is in TCP_CLOSE; a connected one (ESTABLISHED) takes packets
    # from its peer only.
    (socket.AF_INET, Protocol.UDP, 1 << TCP_CLOSE_STATE),
    (socket.AF_INET6, Protocol.UDP, 1 << TCP_CLOSE_STATE),
)
"""The sock_diag dumps one reading makes: (family, protocol, states)."""
_PROTO_NUMBER = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_DIAG_MSG = struct.Struct("!BBBBHH16s16s")  # inet_diag_msg up to its socket id's addresses

Address = IPv4Address | IPv6Address


def _address(text: str, byteorder: Literal["little", "big"]) -> Address:
    """/proc/net prints each 32-bit word of the address as a host-order number in hex."""
    words = [int(text[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(text), 8)]
    return ip_address(b"".join(words))


def parse_table(
    text: str, protocol: Protocol, *, byteorder: Literal["little", "big"] = sys.byteorder
) -> Iterator[tuple[Address, int]]:
    """(local address, port) of every socket in one /proc/net table that accepts packets
    from anyone: TCP in LISTEN, UDP unconnected (remote port 0). Malformed lines are skipped."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local, remote, state = fields[1], fields[2], fields[3]
        try:
            host, _, port = local.partition(":")
            remote_port = int(remote.partition(":")[2], 16)
            if protocol is Protocol.TCP and state != TCP_LISTEN:
                continue
            if protocol is Protocol.UDP and remote_port != 0:
                continue  # a connected UDP socket takes packets from its peer only
            yield _address(host, byteorder), int(port, 16)
        except ValueError:
            continue


def diag_request(family: int, protocol: Protocol, states: int, seq: int = 1) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (nlmsghdr + inet_diag_req_v2, no filter)."""
    request = struct.pack("=BBBBI", family, _PROTO_NUMBER[protocol], 0, 0, states) + bytes(48)
    header = _HEADER.pack(
        _HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST_DUMP, seq, 0
    )
    return header + request


def parse_diag(data: bytes) -> tuple[list[tuple[Address, int]], bool]:
    """(local address, port) of each inet_diag_msg in one netlink read, and whether the dump
    is done; ValueError for an error message or a truncated one."""
    found: list[tuple[Address, int]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise ValueError("truncated netlink message")
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", data, offset + _HEADER.size)
            raise ValueError(f"sock_diag error {-errno}")
        if kind == SOCK_DIAG_BY_FAMILY and length >= _HEADER.size + _DIAG_MSG.size:
            family, _, _, _, sport, _, src, _ = _DIAG_MSG.unpack_from(data, offset + _HEADER.size)
            raw = src[:4] if family == socket.AF_INET else src
            found.append((ip_address(raw), sport))
        offset += (length + 3) & ~3
    return found, False


def read_diag() -> list[tuple[Protocol, Address, int]]:
    """Every listening TCP and unconnected UDP socket of this namespace, from sock_diag;
    OSError or ValueError when the kernel will not say."""
    found: list[tuple[Protocol, Address, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        for seq, (family, protocol, states) in enumerate(DUMPS, start=1):
            sock.send(diag_request(family, protocol, states, seq))
            done = False
            while not done:
                sockets, done = parse_diag(sock.recv(1 << 16))
                found += [(protocol, address, port) for address, port in sockets]
    return found


def reaches(local: Address, externals: Collection[IPv4Address]) -> bool:
    """Whether a socket bound to `local` receives what the WAN sends to an external address:
    bound to it, to its IPv4-mapped form, or to the wildcard (`::` may be dual-stack; the
    table does not say whether IPV6_V6ONLY is set, so it counts)."""
    if local.is_unspecified:
        return True
    if isinstance(local, IPv6Address):
        mapped = local.ipv4_mapped
        return mapped is not None and (mapped.is_unspecified or mapped in externals)
    return local in externals


def host_ports(
    tables: Mapping[str, str],
    externals: Collection[IPv4Address],
    *,
    byteorder: Literal["little", "big"] = sys.byteorder,
) -> frozenset[tuple[Protocol, int]]:
    """The (protocol, port) pairs some socket serves on an external address, from the text
    of the /proc/net tables (name -> content)."""
    sockets = (
        (TABLES[name], local, port)
        for name, text in tables.items()
        for local, port in parse_table(text, TABLES[name], byteorder=byteorder)
    )
    return reachable(sockets, externals)


def reachable(
    sockets: Iterable[tuple[Protocol, Address, int]], externals: Collection[IPv4Address]
) -> frozenset[tuple[Protocol, int]]:
    """The (protocol, port) pairs of those sockets that the WAN reaches."""
    return frozenset((p, port) for p, local, port in sockets if port and reaches(local, externals))


class HostPorts:
    """The gateway's own ports, read again when older than `max_age` seconds: from sock_diag,
    or from /proc/net (`root`) when sock_diag fails or `diag` is False."""

    def __init__(
        self,
        externals: Callable[[], Collection[IPv4Address]],
        *,
        max_age: float | None = None,
        root: Path = Path("/proc/net"),
        diag: bool = True,
    ) -> None:
        self.externals = externals
        self.diag = diag
        self.max_age = max_age if max_age is not None else MAX_AGE if diag else PROC_MAX_AGE
        self.root = root
        self.ports: frozenset[tuple[Protocol, int]] = frozenset()
        self._read_at: float | None = None
        self._failed: set[str] = set()

    def current(self, *, now: float) -> frozenset[tuple[Protocol, int]]:
        """The ports, read again first if the last reading is older than `max_age`."""
        if self._read_at is None or now - self._read_at >= self.max_age:
            self.ports = self._reading()
            self._read_at = now
        return self.ports

    def _reading(self) -> frozenset[tuple[Protocol, int]]:
        if self.diag:
            try:
                return reachable(read_diag(), self.externals())
            except (OSError, ValueError) as error:
                log.warning("sock_diag failed (%s): reading /proc/net instead", error)
                self.diag = False
                self.max_age = max(self.max_age, PROC_MAX_AGE)
        return host_ports(self._read(), self.externals())

    def _read(self) -> dict[str, str]:
        tables = {}
        for name in TABLES:
            try:
                tables[name] = (self.root / name).read_text(encoding="ascii", errors="replace")
            except OSError as error:
                # No IPv6 in this kernel: tcp6/udp6 are absent. Say so once per table.
                if name not in self._failed:
                    self._failed.add(name)
                    log.warning("cannot read %s: %s", self.root / name, error.strerror)
        return tables
