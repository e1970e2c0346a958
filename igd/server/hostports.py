"""Ports the gateway itself serves on its external address, read from the kernel's socket
table (/proc/net/{tcp,udp,tcp6,udp6} of the daemon's network namespace).

A mapping of such a port would DNAT the WAN's packets for the router's own service (its SSH,
its VPN) to a LAN host, so the gateway never hands one out (`Gateway.host_ports`). Parsing is
pure (`parse_table`, `host_ports`); `HostPorts` reads the files, at most once per `max_age`
seconds, when a request asks: an idle daemon reads nothing, a busy one once a second.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
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

MAX_AGE = 1.0
"""Seconds a reading serves requests: a service started on the gateway is protected within
this time. A reading costs ~9 ms on a 6.x kernel whatever the namespace holds (reading
/proc/net/tcp and tcp6 walks the kernel's whole established-socket hash, ~4 ms each), so
at most ~1% of a core under constant load, and nothing while no request comes."""

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
    found = set()
    for name, text in tables.items():
        protocol = TABLES[name]
        for local, port in parse_table(text, protocol, byteorder=byteorder):
            if port and reaches(local, externals):
                found.add((protocol, port))
    return frozenset(found)


class HostPorts:
    """The gateway's own ports, re-read from /proc/net when older than `max_age` seconds."""

    def __init__(
        self,
        externals: Callable[[], Collection[IPv4Address]],
        *,
        max_age: float = MAX_AGE,
        root: Path = Path("/proc/net"),
    ) -> None:
        self.externals = externals
        self.max_age = max_age
        self.root = root
        self.ports: frozenset[tuple[Protocol, int]] = frozenset()
        self._read_at: float | None = None
        self._failed: set[str] = set()

    def current(self, *, now: float) -> frozenset[tuple[Protocol, int]]:
        """The ports, read again first if the last reading is older than `max_age`."""
        if self._read_at is None or now - self._read_at >= self.max_age:
            self.ports = host_ports(self._read(), self.externals())
            self._read_at = now
        return self.ports

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
