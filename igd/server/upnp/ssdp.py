"""SSDP on the internal interfaces: answers M-SEARCH, sends NOTIFY alive and byebye.

One socket per internal interface, bound to the device, so nothing arriving on the
external interface is ever answered (SSDP reflection); sources outside the interface's
networks are ignored; searches are rate-limited per source, pending answers bounded in
number, and the bytes answered bounded per source and in total (amplification).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from igd.proto import ssdp
from igd.proto.description import DeviceTree
from igd.proto.errors import DecodeError
from igd.server.interfaces import InternalInterface, InternalInterface6, bind_to_device
from igd.server.pxp import RateLimiter
from igd.server.ratelog import RateLimitedLog

log = logging.getLogger("igd.upnp.ssdp")

# UDA 1.1 §1.1: multicast TTL defaults to 2 (a hop beyond the LAN at most).
MULTICAST_TTL = 2
SEARCHES_PER_SECOND = 10.0
SEARCH_BURST = 20
MAX_PENDING = 256  # searches waiting for their random delay, all sources
MAX_PENDING_PER_SOURCE = 4
# Amplification: an ssdp:all search of 63 bytes draws 10 answers (about 3.9 KB, 62x). Answer
# bytes are budgeted per source (one source may be a spoofed LAN victim) and in total, so
# whatever the search rate, a victim receives at most ANSWER_BYTES_PER_SOURCE a second
# (burst: the same) and the gateway sends at most ANSWER_BYTES_TOTAL a second.
ANSWER_BYTES_PER_SOURCE = 8 * 1024
ANSWER_BYTES_TOTAL = 64 * 1024
MAX_BUDGETED_SOURCES = 4096  # per-source budgets remembered (least recent forgotten)
# UDA 1.1 §1.2.2: the initial set goes out after a random 0-100 ms, more than once but not
# more than three times, a few hundred milliseconds apart.
ANNOUNCE_COPIES = 2
ANNOUNCE_GAP = 0.25


@dataclass(frozen=True, slots=True)
class Offer:
    """One IGD version as SSDP advertises it."""

    tree: DeviceTree
    description_path: str
    config_id: int


Lan = InternalInterface | InternalInterface6
Source = IPv4Address | IPv6Address


class SsdpResponder:
    """Discovery for the gateway's root device."""

    group: tuple[str, int] = (ssdp.GROUP, ssdp.PORT)
    """Where NOTIFYs go."""
    notify_host: str = ssdp.HOST

    def __init__(
        self,
        interfaces: Sequence[Lan],
        offers: Mapping[int, Offer],
        *,
        primary: int,
        auto_v1: bool,
        wants_v1: Callable[[str], bool],
        http_port: int,
        server: str,
        boot_id: int,
        rng: random.Random | None = None,
        port: int = ssdp.PORT,
    ) -> None:
        self.interfaces = interfaces
        self.offers = offers
        self.primary = primary
        self.auto_v1 = auto_v1
        self.wants_v1 = wants_v1
        self.http_port = http_port
        self.server = server
        self.boot_id = boot_id
        self.rng = rng or random.Random()  # noqa: S311 - timing jitter, not security
        self.port = port
        self.limiter = RateLimiter(SEARCHES_PER_SECOND, SEARCH_BURST)
        self.budget = ByteBudget(ANSWER_BYTES_PER_SOURCE, ANSWER_BYTES_TOTAL)
        self.malformed = RateLimitedLog(log, logging.INFO)
        self.over_budget = RateLimitedLog(log, logging.INFO)
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._pending: dict[Source, int] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self, *, bind_device: bool = True) -> None:
        loop = asyncio.get_running_loop()
        for interface in self.interfaces:
            assert isinstance(interface, InternalInterface)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if bind_device:
                bind_to_device(sock, interface.name)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface.address.packed)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            sock.bind(("0.0.0.0", self.port))
            membership = struct.pack("4s4s", socket.inet_aton(ssdp.GROUP), interface.address.packed)
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            except OSError as error:
                log.warning(
                    "cannot join the SSDP group on %s (%s): unicast searches only",
                    interface.name,
                    error,
                )
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Receiver, self, interface), sock=sock
            )
            self._transports[interface.name] = transport
            log.info("SSDP listening on %s (%s)", interface.name, interface.address)

    async def run(self) -> None:
        """Announce at start, then again at random intervals below half of max-age."""
        if self.offers[self.primary].tree.version >= 2:
            # IGD:2 (WANIPConnection:2 §1.2): byebye before the first alive, so control
            # points drop what they cached of our previous life.
            self._announce(ssdp.BYEBYE)
        await asyncio.sleep(self.rng.uniform(0.0, 0.1))
        for copy in range(ANNOUNCE_COPIES):
            self._announce(ssdp.ALIVE)
            if copy + 1 < ANNOUNCE_COPIES:
                await asyncio.sleep(ANNOUNCE_GAP)
        while True:
            await asyncio.sleep(self.rng.uniform(ssdp.MAX_AGE / 4, ssdp.MAX_AGE / 2))
            self._announce(ssdp.ALIVE)

    def attach(self, interface: Lan, transport: asyncio.DatagramTransport) -> None:
        """Serve an interface through this transport (start() opens real ones)."""
        self._transports[interface.name] = transport

    def close(self) -> None:
        """Say byebye and stop."""
        self._announce(ssdp.BYEBYE)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()

    def _announce(self, nts: str) -> None:
        offer = self.offers[self.primary]
        for interface in self.interfaces:
            transport = self._transports.get(interface.name)
            if transport is None or transport.is_closing():
                continue
            advertising = self._advertising(interface, offer)
            for target in ssdp.advertisement_set(offer.tree):
                transport.sendto(
                    ssdp.encode_notify(target, nts, advertising, self.notify_host), self.group
                )

    def _advertising(self, interface: Lan, offer: Offer) -> ssdp.Advertising:
        address = interface.address
        host = f"[{address}]" if isinstance(address, IPv6Address) else str(address)
        location = f"http://{host}:{self.http_port}{offer.description_path}"
        return ssdp.Advertising(location, self.server, self.boot_id, offer.config_id)

    # -- searches ----------------------------------------------------------------------------

    def received(self, data: bytes, source: tuple[Any, ...], interface: Lan) -> None:
        """One datagram on an internal interface (`source` as the socket gave it)."""
        if not data.startswith(b"M-SEARCH"):
            # NOTIFYs and responses of other devices: normal multicast traffic, the bulk of
            # what arrives, dropped before the source is parsed.
            return
        try:
            client = ip_address(str(source[0]).split("%")[0])
        except ValueError:
            return
        if not interface.serves(client) or client in (interface.address, *_edges(interface)):
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            search = ssdp.decode_search(data)
        except DecodeError as error:
            # SSDP has no error answer: a silent drop, counted and logged rate-limited.
            self.malformed.note(now, "ignored malformed M-SEARCH from %s: %s", client, error)
            return
        if search.mx is None and search.multicast:
            return  # UDA 1.1 §1.3.2: a multicast M-SEARCH without MX is discarded
        if not self.limiter.allow(client, now=now):
            return
        offer = self._offer_for(search)
        answers = ssdp.search_answers(search.target, offer.tree)
        if not answers:
            return
        pending = self._pending.get(client, 0)
        if pending >= MAX_PENDING_PER_SOURCE or len(self._timers) >= MAX_PENDING:
            return
        advertising = self._advertising(interface, offer)
        date = formatdate(usegmt=True)
        messages = [ssdp.encode_search_response(a, advertising, date) for a in answers]
        if not self.budget.take(client, sum(map(len, messages)), now=now):
            self.over_budget.note(now, "SSDP answers to %s over their byte budget: dropped", client)
            return
        self._pending[client] = pending + 1
        # UDA 1.1 §1.3.2: answer after a random delay within MX, capped at 5 s; a unicast
        # search is answered at once.
        delay = (
            self.rng.uniform(0.0, min(search.mx, ssdp.MAX_MX))
            if search.mx and search.multicast
            else 0.0
        )
        timer: asyncio.TimerHandle

        def reply() -> None:
            self._timers.discard(timer)
            left = self._pending.pop(client, 1) - 1
            if left > 0:
                self._pending[client] = left
            transport = self._transports.get(interface.name)
            if transport is None or transport.is_closing():
                return
            for message in messages:
                transport.sendto(message, source)

        timer = loop.call_later(delay, reply)
        self._timers.add(timer)

    def _offer_for(self, search: ssdp.SsdpSearch) -> Offer:
        """Which version a searcher is shown: v1 to v1-only agents and v1 searches (auto)."""
        if self.auto_v1 and 1 in self.offers:
            primary = self.offers[self.primary]
            if self.wants_v1(search.user_agent) or ssdp.asks_lower_version(
                search.target, primary.tree
            ):
                return self.offers[1]
        return self.offers[self.primary]


class ByteBudget:
    """Token buckets of answer bytes: one per source (bounded in number) and one in total."""

    def __init__(self, per_source: int, total: int) -> None:
        self.per_source = per_source
        self.total = total
        self._sources: OrderedDict[Source, tuple[float, float]] = OrderedDict()
        self._all = (float(total), float("-inf"))

    def take(self, source: Source, size: int, *, now: float) -> bool:
        """Spend `size` bytes for `source`; False (nothing spent) when either bucket is short."""
        start = (float(self.per_source), now)
        mine = _refill(self._sources.pop(source, start), self.per_source, now)
        everyone = _refill(self._all, self.total, now)
        allowed = size <= mine and size <= everyone
        if allowed:
            mine, everyone = mine - size, everyone - size
        self._sources[source] = (mine, now)
        self._all = (everyone, now)
        if len(self._sources) > MAX_BUDGETED_SOURCES:
            self._sources.popitem(last=False)
        return allowed


def _refill(bucket: tuple[float, float], rate: int, now: float) -> float:
    """Bytes in a bucket refilled at `rate` a second, holding at most one second's worth."""
    tokens, last = bucket
    return min(float(rate), tokens + (now - last) * rate) if last <= now else tokens


def _edges(interface: Lan) -> list[Source]:
    """The network and broadcast addresses of the interface's networks: never a searcher."""
    return [
        edge
        for network in interface.networks
        if network.prefixlen < 31
        for edge in (network.network_address, network.broadcast_address)
    ]


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, responder: SsdpResponder, interface: Lan) -> None:
        self.responder = responder
        self.interface = interface

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if isinstance(self.interface, InternalInterface6):
            # The whole IPv6 address tuple: a link-local searcher is answered on its link.
            self.responder.received(data, tuple(addr), self.interface)
        else:
            self.responder.received(data, (str(addr[0]), int(str(addr[1]))), self.interface)

    def error_received(self, exc: Exception) -> None:
        log.debug("SSDP socket error on %s: %s", self.interface.name, exc)
