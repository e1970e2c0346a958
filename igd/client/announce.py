"""Listening for the gateway's unsolicited announcements on 224.0.0.1:5350: NAT-PMP address
announcements (RFC 6886 §3.2.1) and PCP ANNOUNCE or Mapping Updates (RFC 6887 §14)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from igd.model import Mechanism
from igd.proto import natpmp, pcp
from igd.proto.errors import DecodeError

log = logging.getLogger("igd.client")

GROUP = IPv4Address("224.0.0.1")
PORT = 5350


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


class AnnouncementListener(asyncio.DatagramProtocol):
    """Receives announcements from one gateway (others are ignored: RFC 6886 §3.2.1 and
    RFC 6887 §14.1.3 require checking the source address)."""

    def __init__(
        self,
        gateway: IPv4Address,
        local: IPv4Address,
        callback: Callable[[Announcement], None],
    ) -> None:
        self.gateway = gateway
        self.local = local
        self.callback = callback
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> bool:
        """Bind 224.0.0.1:5350 (shared with other listeners); False if impossible."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # RFC 6886 §3.2.1: bind the group address, not 0.0.0.0, so only announcements arrive.
            sock.bind((str(GROUP), PORT))
            membership = GROUP.packed + self.local.packed
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("cannot listen for gateway announcements on %s:%d: %s", GROUP, PORT, exc)
            return False
        self._transport = transport
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if str(addr[0]) != str(self.gateway):
            return
        announcement = parse_announcement(data)
        if announcement is not None:
            self.callback(announcement)
