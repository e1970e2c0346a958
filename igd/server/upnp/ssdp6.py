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
from collections.abc import Sequence
from typing import Any

from igd.proto import ssdp
from igd.server.interfaces import InternalInterface6, bind_to_device
from igd.server.upnp.ssdp import MULTICAST_TTL, Lan, SsdpResponder, _Receiver

log = logging.getLogger("igd.upnp.ssdp")

GROUPS6 = (ssdp.GROUP6, ssdp.GROUP6_SITE)


class Ssdp6Responder(SsdpResponder):
    """Discovery for the gateway's root device on the LAN's IPv6 side."""

    group = (ssdp.GROUP6, ssdp.PORT)
    notify_host = ssdp.HOST6
    _bind_device = True

    async def start(self, *, bind_device: bool = True) -> None:
        """One socket on [::]:1900 per interface, in both SSDP groups on that interface."""
        self._bind_device = bind_device
        for interface in self.interfaces:
            await self._open(interface)

    async def readdress(self, lan6: Sequence[InternalInterface6]) -> None:
        """Follow a LAN renumbering: byebye for the old LOCATIONs, then alive for the new.

        Control points drop a device on its byebye (UDA 1.1 §1.2.3) and learn the new URL
        from the alive (§1.2.2) rather than keep calling an address that is gone.
        """
        if list(lan6) == list(self.interfaces):
            return
        self._announce(ssdp.BYEBYE)
        names = {i.name for i in lan6}
        for name in [n for n in self._transports if n not in names]:
            self._transports.pop(name).close()
        self.interfaces = list(lan6)
        for interface in self.interfaces:
            if interface.name not in self._transports:
                try:
                    await self._open(interface)
                except OSError as error:
                    log.warning("cannot listen for SSDP on %s: %s", interface.name, error)
        self._announce(ssdp.ALIVE)

    def received(self, data: bytes, source: tuple[Any, ...], interface: Lan) -> None:
        """A datagram is judged by what its interface serves now, not at the socket's start."""
        current = next((i for i in self.interfaces if i.name == interface.name), None)
        if current is not None:
            super().received(data, source, current)

    async def _open(self, interface: Lan) -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(interface, InternalInterface6)
        index = socket.if_nametoindex(interface.name)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self._bind_device:
                # Nothing that arrives on the WAN is answered (SSDP reflection).
                bind_to_device(sock, interface.name)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, MULTICAST_TTL)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            sock.bind(("::", self.port))
        except OSError:
            sock.close()
            raise
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
