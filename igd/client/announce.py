"""Listening for the gateway's unsolicited announcements: NAT-PMP address announcements
(RFC 6886 §3.2.1) and PCP ANNOUNCE or Mapping Updates (RFC 6887 §14) on 224.0.0.1:5350, and
SSDP NOTIFY on 239.255.255.250:1900, whose BOOTID.UPNP.ORG tells of a UPnP device restart."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Generic, TypeVar

from igd.model import Mechanism
from igd.proto import natpmp, pcp, ssdp
from igd.proto.errors import DecodeError

log = logging.getLogger("igd.client")

GROUP = IPv4Address("224.0.0.1")
PORT = 5350
SSDP_GROUP = IPv4Address(ssdp.GROUP)
_Message = TypeVar("_Message")


@dataclass(frozen=True, slots=True)
class Announcement:
    """One announcement from the gateway."""

    mechanism: Mechanism
    epoch: int
    external_address: IPv4Address | None = None


def parse_announcement(data: bytes) -> Announcement | None:
    """Decode a NAT-PMP address announcement or a PCP response; None for anything else."""
    try:
        if data[:1] == bytes((natpmp.VERSION,)):
            response = natpmp.decode_response(data)
            if isinstance(response, natpmp.NatPmpExternalAddressResponse):
                return Announcement(Mechanism.NATPMP, response.epoch, response.address)
            return None
        if data[:1] == bytes((pcp.VERSION,)):
            return Announcement(Mechanism.PCP, pcp.decode_response(data).epoch)
    except DecodeError:
        return None
    return None


@dataclass(frozen=True, slots=True)
class SsdpNotify:
    """One SSDP NOTIFY (alive or byebye) that carries a BOOTID.UPNP.ORG."""

    nts: str
    usn: str
    boot_id: int
    location: str = ""


def parse_notify(data: bytes) -> SsdpNotify | None:
    """Decode an SSDP NOTIFY with a BOOTID (UDA 1.1 §1.2.2); None for anything else."""
    try:
        start, headers = ssdp.decode_message(data)
    except DecodeError:
        return None
    boot = headers.get("BOOTID.UPNP.ORG", "")
    # ASCII digits only: str.isdigit() also passes "²", which int() refuses.
    if start.split() != ["NOTIFY", "*", "HTTP/1.1"] or not (boot.isascii() and boot.isdigit()):
        return None
    nts = headers.get("NTS", "")
    if nts not in (ssdp.ALIVE, ssdp.BYEBYE):
        return None  # ssdp:update announces the *next* BOOTID: no restart yet
    return SsdpNotify(nts, headers.get("USN", ""), int(boot), headers.get("LOCATION", ""))


def _multicast_socket(group: IPv4Address, port: int, local: IPv4Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # RFC 6886 §3.2.1: bind the group address, not 0.0.0.0, so only the group's traffic
        # arrives (and other listeners on the port, an SSDP stack for one, keep theirs).
        sock.bind((str(group), port))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group.packed + local.packed)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _MulticastListener(asyncio.DatagramProtocol, Generic[_Message]):
    """Receives one multicast group's datagrams from one source host only (anything else
    could make us re-create mappings at will), parses them and reports what parsed."""

    group: IPv4Address
    port: int

    def __init__(
        self,
        source: IPv4Address,
        local: IPv4Address,
        callback: Callable[[_Message], None],
    ) -> None:
        self.source = source
        self.local = local
        self.callback = callback
        self._transport: asyncio.DatagramTransport | None = None

    def parse(self, data: bytes) -> _Message | None:
        raise NotImplementedError

    async def start(self) -> bool:
        """Bind the group's port (shared with other listeners); False if impossible."""
        try:
            sock = _multicast_socket(self.group, self.port, self.local)
        except OSError as exc:
            log.warning("cannot listen on %s:%d: %s", self.group, self.port, exc)
            return False
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if str(addr[0]) != str(self.source):
            return
        message = self.parse(data)
        if message is not None:
            self.callback(message)


class AnnouncementListener(_MulticastListener[Announcement]):
    """Receives NAT-PMP/PCP announcements from one gateway on 224.0.0.1:5350 (RFC 6886
    §3.2.1 and RFC 6887 §14.1.3 require checking the source address)."""

    group = GROUP
    port = PORT

    def parse(self, data: bytes) -> Announcement | None:
        return parse_announcement(data)


class SsdpNotifyListener(_MulticastListener[SsdpNotify]):
    """Receives SSDP NOTIFY from one UPnP device's host and reports its BOOTID."""

    group = SSDP_GROUP
    port = ssdp.PORT

    def parse(self, data: bytes) -> SsdpNotify | None:
        return parse_notify(data)
