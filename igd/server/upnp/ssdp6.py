"""SSDP over IPv6 (UDA 1.1 §1.1): the same responder on ff02::c and ff05::c of each LAN
interface, answering with LOCATION URLs on the LAN's IPv6 address (in brackets).

Everything the IPv4 responder enforces holds here too (ssdp.py): sockets bound to their
device, searchers only from the LAN prefixes or on-link, per-source search rate, pending
answers bounded, answer bytes budgeted per source and in total.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct

from igd.proto import ssdp
from igd.server.interfaces import InternalInterface6, bind_to_device
from igd.server.upnp.ssdp import MULTICAST_TTL, SsdpResponder, _Receiver

log = logging.getLogger("igd.upnp.ssdp")

GROUPS6 = (ssdp.GROUP6, ssdp.GROUP6_SITE)


class Ssdp6Responder(SsdpResponder):
    """Discovery for the gateway's root device on the LAN's IPv6 side."""

    group = (ssdp.GROUP6, ssdp.PORT)
    notify_host = ssdp.HOST6

    async def start(self, *, bind_device: bool = True) -> None:
        """One socket on [::]:1900 per interface, in both SSDP groups on that interface."""
        loop = asyncio.get_running_loop()
        for interface in self.interfaces:
            assert isinstance(interface, InternalInterface6)
            index = socket.if_nametoindex(interface.name)
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if bind_device:
                # Nothing that arrives on the WAN is answered (SSDP reflection).
                bind_to_device(sock, interface.name)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, MULTICAST_TTL)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            sock.bind(("::", self.port))
            for group in GROUPS6:
                membership = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", index)
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, membership)
                except OSError as error:
                    log.warning("cannot join %s on %s (%s)", group, interface.name, error)
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Receiver, self, interface), sock=sock
            )
            self.attach(interface, transport)
            log.info("SSDP listening on %s ([%s])", interface.name, interface.address)
