"""UDP 5351 on the internal interfaces: one socket per interface, shared by NAT-PMP and PCP,
dispatched on the version octet (0 NAT-PMP, 2 PCP, anything else unsupported)."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections import OrderedDict
from collections.abc import Sequence
from ipaddress import IPv4Address

from igd.events import DatagramDropped, DropReason, ExternalAddressChanged
from igd.proto import natpmp, pcp
from igd.proto.pcp import PcpResult
from igd.server.interfaces import InternalInterface, bind_to_device
from igd.server.natpmp import NatPmpHandler
from igd.server.pcp import PcpHandler
from igd.server.service import Service

log = logging.getLogger("igd.pxp")

SERVER_PORT = 5351
ANNOUNCE_GROUP = ("224.0.0.1", 5350)
# RFC 6886 §3.2.1 and RFC 6887 §14.1.3: up to 10 copies, first gap 250 ms, doubling.
ANNOUNCE_COPIES = 10
ANNOUNCE_FIRST_GAP = 0.25
MAPPING_UPDATE_GAPS = (0.25, 0.5)
# Bounds on what one client, and all clients, can keep the daemon busy with.
MAX_IN_FLIGHT_PER_CLIENT = 16
MAX_IN_FLIGHT = 1024
MAX_TRACKED_CLIENTS = 4096
# External address changes waiting to be announced (one is enough: each announces the
# address current when it is sent).
FEED_BOUND = 4


class RateLimiter:
    """Token buckets per client, bounded to MAX_TRACKED_CLIENTS (least recent evicted)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[IPv4Address, tuple[float, float]] = OrderedDict()

    def allow(self, client: IPv4Address, *, now: float) -> bool:
        """Take one token for this client; False when it has none left."""
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed


class PxpServer:
    """Receives NAT-PMP and PCP datagrams on the LAN and answers them."""

    def __init__(
        self,
        interfaces: Sequence[InternalInterface],
        natpmp_handler: NatPmpHandler | None,
        pcp_handler: PcpHandler | None,
        limiter: RateLimiter,
        service: Service,
    ) -> None:
        self.interfaces = interfaces
        self.natpmp = natpmp_handler
        self.pcp = pcp_handler
        self.limiter = limiter
        self.service = service
        self.epoch = service.epoch
        self.feed = service.subscribe("nat-pmp/pcp announcements", FEED_BOUND,
                                      (ExternalAddressChanged,))  # fmt: skip
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[IPv4Address, int] = {}

    async def start(self) -> None:
        """Open one socket per internal interface."""
        loop = asyncio.get_running_loop()
        for interface in self.interfaces:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bound to the device, so a request arriving on the external interface (even one
            # addressed to a LAN address) never reaches us (RFC 6886 §3.3, RFC 6887 §8.2).
            bind_to_device(sock, interface.name)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface.address.packed)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            sock.bind(("0.0.0.0", SERVER_PORT))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Receiver, self, interface), sock=sock
            )
            self._transports[interface.name] = transport
            log.info(
                "NAT-PMP/PCP listening on %s (%s) UDP %d",
                interface.name,
                interface.address,
                SERVER_PORT,
            )

    def attach(self, interface: InternalInterface, transport: asyncio.DatagramTransport) -> None:
        """Answer an interface's datagrams through this transport (start() opens real ones)."""
        self._transports[interface.name] = transport

    def close(self) -> None:
        """Stop receiving; requests in flight are cancelled."""
        self.feed.close()
        for transport in self._transports.values():
            transport.close()
        for task in self._tasks:
            task.cancel()

    def received(self, data: bytes, source: tuple[str, int], interface: InternalInterface) -> None:
        """One datagram from a LAN interface."""
        client = IPv4Address(source[0])
        if not interface.serves(client):
            log.debug("dropped datagram from %s: not on %s's networks", client, interface.name)
            return
        if not data:
            return
        if not self.limiter.allow(client, now=asyncio.get_running_loop().time()):
            log.debug("dropped datagram from %s: over its rate limit", client)
            self.service.publish(DatagramDropped(client, DropReason.RATE_LIMIT))
            return
        in_flight = self._in_flight.get(client, 0)
        if in_flight >= MAX_IN_FLIGHT_PER_CLIENT:
            self.service.publish(DatagramDropped(client, DropReason.CLIENT_IN_FLIGHT))
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.service.publish(DatagramDropped(client, DropReason.TOTAL_IN_FLIGHT))
            return
        self._in_flight[client] = in_flight + 1
        task = asyncio.get_running_loop().create_task(self._answer(data, source, client, interface))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(
        self,
        data: bytes,
        source: tuple[str, int],
        client: IPv4Address,
        interface: InternalInterface,
    ) -> None:
        try:
            reply = await self._dispatch(data, source)
        except Exception:
            log.exception("unexpected failure answering %s; request dropped", client)
            reply = None
        finally:
            left = self._in_flight.pop(client, 1) - 1
            if left:
                self._in_flight[client] = left
        transport = self._transports.get(interface.name)
        if reply is not None and transport is not None and not transport.is_closing():
            transport.sendto(reply, source)

    async def _dispatch(self, data: bytes, source: tuple[str, int]) -> bytes | None:
        if len(data) < 2:
            return None  # RFC 6887 §8.2; NAT-PMP has no packet this short either
        version = data[0]
        if version == natpmp.VERSION and self.natpmp is not None:
            return await self.natpmp.handle(data, IPv4Address(source[0]))
        if version == pcp.VERSION and self.pcp is not None:
            return await self.pcp.handle(data, source)
        # RFC 6887 §9, RFC 6886 §3.5: any other version gets "unsupported version" naming the
        # closest version served: NAT-PMP's format below 2, PCP's above (App. A: both agree
        # on the first four octets).
        if data[1] & natpmp.RESPONSE_BIT:
            return None
        if self.pcp is not None and (version > pcp.VERSION or self.natpmp is None):
            return pcp.encode_error(
                data, PcpResult.UNSUPP_VERSION, lifetime=1800, epoch=self.epoch(), parsed=False
            )
        if self.natpmp is not None:
            return natpmp.encode_unsupported_version(self.epoch())
        return None

    async def run(self) -> None:
        """Announce every external address change (RFC 6886 §3.2.1, RFC 6887 §14.1.3) and
        tell PCP clients their mappings' new address (RFC 6887 §14.2)."""
        async with asyncio.TaskGroup() as group:
            while True:
                events, lost = await self.feed.next()
                if events or lost:
                    group.create_task(self.announce())
                    group.create_task(self.send_mapping_updates())

    async def announce(self) -> None:
        """Send the restart/address-change announcements 10 times, 250 ms doubling
        (RFC 6886 §3.2.1, RFC 6887 §14.1.3), each with the current epoch."""
        gap = ANNOUNCE_FIRST_GAP
        for copy in range(ANNOUNCE_COPIES):
            messages = []
            if self.natpmp is not None and (message := self.natpmp.announcement()):
                messages.append(message)
            if self.pcp is not None:
                messages.append(self.pcp.announcement())
            for message in messages:
                self._send_all(message, ANNOUNCE_GROUP)
            if copy + 1 < ANNOUNCE_COPIES:
                await asyncio.sleep(gap)
                gap *= 2

    async def send_mapping_updates(self) -> None:
        """RFC 6887 §14.2: tell PCP clients their mappings' new external address, 3 times,
        250 ms then 500 ms apart."""
        if self.pcp is None:
            return
        for gap in (*MAPPING_UPDATE_GAPS, None):
            for message, destination in self.pcp.mapping_updates():
                self._send_to(message, destination)
            if gap is not None:
                await asyncio.sleep(gap)

    def _send_all(self, message: bytes, destination: tuple[str, int]) -> None:
        for transport in self._transports.values():
            if not transport.is_closing():
                transport.sendto(message, destination)

    def _send_to(self, message: bytes, destination: tuple[str, int]) -> None:
        """Unicast through the interface whose networks hold the destination."""
        address = IPv4Address(destination[0])
        for interface in self.interfaces:
            transport = self._transports.get(interface.name)
            if interface.serves(address) and transport and not transport.is_closing():
                transport.sendto(message, destination)
                return


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, server: PxpServer, interface: InternalInterface) -> None:
        self.server = server
        self.interface = interface

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.server.received(data, (str(addr[0]), int(str(addr[1]))), self.interface)

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error on %s: %s", self.interface.name, exc)
