"""UDP 5351 on the internal interfaces: one socket per interface, shared by NAT-PMP and PCP,
dispatched on the version octet (0 NAT-PMP, 2 PCP, anything else unsupported)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict, deque
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

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
MAX_ACTIVE = 128
"""Requests being answered at once; the others wait in per-client queues, taken in turn (one
request per client per round), so a client that asks once is answered after at most one
round however much other clients send."""
RECEIVE_SIZE = 2048
"""The longest datagram answered: above pcp.MAX_SIZE, so an over-long PCP request is answered
as one (RFC 6887 §8.3) rather than cut to a valid-looking 1100. One octet more is read, so a
longer datagram is seen whole-or-longer and dropped: echoing a cut copy (NAT-PMP's unknown
opcode answer, RFC 6886 §3.5) would not be the request back."""
DRAIN_BATCH = 256
"""Datagrams read from a socket per wake-up: the socket is emptied into the per-client
queues (where fairness applies) instead of one datagram per event-loop turn."""
RECEIVE_BUFFER = 1 << 20
"""Bytes asked for the socket's receive queue (the kernel doubles it, within rmem_max): room
for MAX_IN_FLIGHT requests arriving at once (a datagram takes ~1 KiB of it). The default
~200 KiB holds ~270: 128 clients with 4 requests each overflowed it, and every lost
request cost its client a 1 s retransmit. The kernel's guard keeps floods out of it."""
# External address changes waiting to be announced (one is enough: each announces the
# address current when it is sent).
FEED_BOUND = 4


class Sender(Protocol):
    """Where an interface's answers go: its socket (or a test's transport)."""

    def sendto(self, data: bytes, address: tuple[str, int], /) -> object: ...


class RateLimiter:
    """Token buckets per client, bounded to MAX_TRACKED_CLIENTS (least recent evicted)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[IPv4Address | IPv6Address, tuple[float, float]] = OrderedDict()

    def allow(self, client: IPv4Address | IPv6Address, *, now: float) -> bool:
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
        self._sockets: dict[str, socket.socket] = {}
        self._senders: dict[str, Sender] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[IPv4Address, int] = {}
        """Requests per client, waiting or being answered (at most MAX_IN_FLIGHT_PER_CLIENT)."""
        self._pending = 0
        """All requests waiting or being answered (MAX_IN_FLIGHT; twice that for new clients)."""
        self._waiting: OrderedDict[IPv4Address, deque[tuple[bytes, tuple[str, int], str]]] = (
            OrderedDict()
        )
        """Clients with queued requests, in turn order."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._clients: dict[str, IPv4Address] = {}
        """Source address texts parsed already (at most MAX_TRACKED_CLIENTS)."""

    async def start(self) -> None:
        """Open one socket per internal interface."""
        loop = self._loop = asyncio.get_running_loop()
        for interface in self.interfaces:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # No SO_REUSEADDR: UDP needs none to rebind after a restart, and without it no
            # process started later can bind 5351 beside us (one socket per device is allowed).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            # Bound to the device, so a request arriving on the external interface (even one
            # addressed to a LAN address) never reaches us (RFC 6886 §3.3, RFC 6887 §8.2).
            bind_to_device(sock, interface.name)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface.address.packed)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            sock.bind(("0.0.0.0", SERVER_PORT))
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._drain, sock, interface)
            self._sockets[interface.name] = sock
            self._senders[interface.name] = sock
            log.info(
                "NAT-PMP/PCP listening on %s (%s) UDP %d",
                interface.name,
                interface.address,
                SERVER_PORT,
            )

    def attach(self, interface: InternalInterface, sender: Sender) -> None:
        """Answer an interface's datagrams through this sender (start() opens real sockets)."""
        self._senders[interface.name] = sender

    def close(self) -> None:
        """Stop receiving; requests in flight are cancelled."""
        self._closed = True
        self.feed.close()
        for sock in self._sockets.values():
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        self._senders.clear()
        self._waiting.clear()
        for task in self._tasks:
            task.cancel()

    def _drain(self, sock: socket.socket, interface: InternalInterface) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                # More than PCP's 1100 octets, so the decoder sees an over-long request.
                data, address = sock.recvfrom(RECEIVE_SIZE + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier reply
                log.debug("socket error on %s: %s", interface.name, exc)
                continue
            self.received(data, (str(address[0]), int(address[1])), interface)

    def received(self, data: bytes, source: tuple[str, int], interface: InternalInterface) -> None:
        """One datagram from a LAN interface."""
        # Parsing the address text costs more than the rest of admitting a request: the
        # same few clients ask again and again.
        client = self._clients.get(source[0])
        known = client is not None
        if client is None:
            client = IPv4Address(source[0])
        if not interface.serves(client):
            log.debug("dropped datagram from %s: not on %s's networks", client, interface.name)
            return
        if not known:
            # Remembered once it is a LAN source: others cannot push the LAN's out.
            if len(self._clients) >= MAX_TRACKED_CLIENTS:
                self._clients.clear()
            self._clients[source[0]] = client
        if not data:
            return
        if not self.limiter.allow(client, now=asyncio.get_running_loop().time()):
            self.service.publish(DatagramDropped(client, DropReason.RATE_LIMIT))
            return
        in_flight = self._in_flight.get(client, 0)
        # A client with nothing in flight gets a slot beyond MAX_IN_FLIGHT (up to twice it):
        # busy clients filling the bound cannot lock out one that asks for the first time.
        busy = self._pending
        full = busy >= MAX_IN_FLIGHT and (in_flight > 0 or busy >= 2 * MAX_IN_FLIGHT)
        if in_flight >= MAX_IN_FLIGHT_PER_CLIENT:
            self.service.publish(DatagramDropped(client, DropReason.CLIENT_IN_FLIGHT))
            return
        if full:
            self.service.publish(DatagramDropped(client, DropReason.TOTAL_IN_FLIGHT))
            return
        self._in_flight[client] = in_flight + 1
        self._pending += 1
        queue = self._waiting.get(client)
        if queue is None:
            queue = self._waiting[client] = deque()
        queue.append((data, source, interface.name))
        self._start_next()

    def _start_next(self) -> None:
        """Start waiting requests, one client after another, up to MAX_ACTIVE at once."""
        loop = asyncio.get_running_loop()
        while len(self._tasks) < MAX_ACTIVE and self._waiting:
            client, queue = next(iter(self._waiting.items()))
            data, source, name = queue.popleft()
            if queue:
                self._waiting.move_to_end(client)  # its next request waits for the others
            else:
                del self._waiting[client]
            task = loop.create_task(self._answer(data, source, client, name))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._closed:
            self._start_next()

    async def _answer(
        self,
        data: bytes,
        source: tuple[str, int],
        client: IPv4Address,
        interface: str,
    ) -> None:
        try:
            reply = await self.answer(data, source, client)
        except Exception:
            log.exception("unexpected failure answering %s; request dropped", client)
            reply = None
        finally:
            self._pending -= 1
            left = self._in_flight.pop(client, 1) - 1
            if left:
                self._in_flight[client] = left
        if reply is not None:
            self._send(interface, reply, source)

    async def answer(
        self, data: bytes, source: tuple[str, int], client: IPv4Address | None = None
    ) -> bytes | None:
        """The reply to one datagram from a LAN client (`client`: source's address, parsed
        already), or None to stay silent."""
        if len(data) < 2:
            return None  # RFC 6887 §8.2; NAT-PMP has no packet this short either
        if len(data) > RECEIVE_SIZE:
            return None  # longer than any message of either protocol (see RECEIVE_SIZE)
        version = data[0]
        if version == natpmp.VERSION and self.natpmp is not None:
            return await self.natpmp.handle(data, client or IPv4Address(source[0]))
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

    def _send(self, interface: str, message: bytes, destination: tuple[str, int]) -> None:
        sender = self._senders.get(interface)
        if sender is None:
            return
        try:
            sender.sendto(message, destination)
        except OSError as exc:  # a full send queue or an unreachable host: UDP may drop
            log.debug("cannot send to %s on %s: %s", destination[0], interface, exc)

    def _send_all(self, message: bytes, destination: tuple[str, int]) -> None:
        for name in list(self._senders):
            self._send(name, message, destination)

    def _send_to(self, message: bytes, destination: tuple[str, int]) -> None:
        """Unicast through the interface whose networks hold the destination."""
        address = IPv4Address(destination[0])
        for interface in self.interfaces:
            if interface.serves(address) and interface.name in self._senders:
                self._send(interface.name, message, destination)
                return
