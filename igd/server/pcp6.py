"""PCP over IPv6 (RFC 6887) on a pure firewall: MAP opens a pinhole, no address translation.

A MAP from a LAN host opens (or renews, or with lifetime 0 closes) a pinhole to its own
address and port; the answer's "external" address and port are the internal ones (§2: on a
pure firewall the mapping is the identity; §11.3). ANNOUNCE answers the epoch; PEER is not
offered (UNSUPP_OPCODE). `Pcp6Handler` turns datagrams into answers through
`PinholeService`; `Pcp6Server` owns one socket per LAN interface and answers only LAN sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv6Address, IPv6Network

from igd.model import Mechanism, Protocol
from igd.pinhole import Pinhole, PinholeFilter, PinholeKey, PinholeOwner, PinholeRequest, Refusal
from igd.proto import pcp
from igd.proto.pcp import (
    PcpDecodeError,
    PcpDescription,
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpPreferFailure,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
    PcpUnknownOption,
)
from igd.server.interfaces import bind_to_device
from igd.server.pcp import error_reply
from igd.server.pcp_options import PcpError
from igd.server.pinholes import CommitError, PinholeService
from igd.server.pxp import ANNOUNCE_COPIES, ANNOUNCE_FIRST_GAP, RateLimiter
from igd.server.ratelog import RateLimitedLog

log = logging.getLogger("igd.pcp6")

SERVER_PORT = 5351
CLIENT_PORT = 5350
ALL_NODES = "ff02::1"
"""RFC 6887 §14.1.3: unsolicited ANNOUNCE goes to the all-nodes group, port 5350."""
LINK_LOCAL = IPv6Network("fe80::/10")
MAX_DATAGRAM = 1100

_REFUSAL_RESULTS = {
    Refusal.NOT_ALLOWED: PcpResult.NOT_AUTHORIZED,
    Refusal.THIRD_PARTY: PcpResult.NOT_AUTHORIZED,
    Refusal.NOT_OWNER: PcpResult.NOT_AUTHORIZED,
    Refusal.QUOTA: PcpResult.USER_EX_QUOTA,
    Refusal.FULL: PcpResult.NO_RESOURCES,
}
MAX_IN_FLIGHT = 256
"""Requests being answered at once; more are dropped (spoofed sources defeat per-source
token buckets, and pinhole commits run one at a time)."""


class Pcp6Handler:
    """Answers PCP requests that arrived over IPv6 from a LAN host."""

    def __init__(
        self, service: PinholeService, *, max_filters: int = 8, max_description: int = 128
    ) -> None:
        self.service = service
        self.max_filters = max_filters
        self.max_description = max_description

    async def answer(self, data: bytes, source: IPv6Address, *, now: float) -> bytes | None:
        """The reply to one datagram from `source`, or None to stay silent."""
        try:
            request = pcp.decode_request(data)
        except PcpDecodeError as error:
            if error.result is None:
                return None
            return self._error(data, error.result, None, now=now, parsed=False)
        try:
            return pcp.encode_response(await self._handle(request, source, now=now))
        except PcpError as error:
            log.debug("PCP6 %s from %s: %s", error.result.name, source, error)
            return self._error(data, error.result, error.lifetime, now=now, parsed=True)

    async def _handle(self, request: PcpRequest, source: IPv6Address, *, now: float) -> PcpResponse:
        epoch = self.service.epoch(now=now)
        if request.opcode is PcpOpcode.ANNOUNCE:
            return PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, epoch)
        if request.opcode is not PcpOpcode.MAP:
            raise PcpError(PcpResult.UNSUPP_OPCODE, "PEER: this gateway does not translate")
        # RFC 6887 §8.2: the client's own idea of its address must be the source's.
        if request.client_address != source:
            raise PcpError(PcpResult.ADDRESS_MISMATCH, f"client field {request.client_address}")
        data = request.data
        assert isinstance(data, PcpMapData)  # the decoder gives MAP data to a MAP
        internal, filters, description, echo = self._options(request, source)
        if data.protocol not in (6, 17):
            # §11.1: protocol 0 means all protocols; pinholes here are per TCP/UDP port.
            raise PcpError(PcpResult.UNSUPP_PROTOCOL, f"protocol {data.protocol}")
        if data.internal_port == 0:
            raise PcpError(PcpResult.NOT_AUTHORIZED, "internal port 0 (all ports)")
        key = PinholeKey(internal, Protocol.from_number(data.protocol), data.internal_port)
        owner = PinholeOwner(Mechanism.PCP, source, data.nonce)
        if request.lifetime == 0:
            if any(isinstance(option, PcpFilter | PcpPreferFailure) for option in echo):
                raise PcpError(PcpResult.MALFORMED_OPTION, "FILTER or PREFER_FAILURE, lifetime 0")
            held = self.service.get(key)
            refusal = await self._close(key, owner, now=now)
            if refusal is not None:
                raise PcpError(
                    _REFUSAL_RESULTS[refusal], refusal.value, _held_for(refusal, held, now)
                )
            # §15: deleting succeeds whether or not the mapping existed.
            return self._success(request, data, internal, 0, epoch, echo)
        existing = self.service.get(key)
        merged = _merge_filters(filters, existing.filters if existing else ())
        if len(merged) > self.max_filters:
            raise PcpError(PcpResult.EXCESSIVE_REMOTE_PEERS, f"{len(merged)} filters")
        if description is None:
            description = existing.description if existing else ""
        ask = PinholeRequest(key, owner, request.lifetime, description, merged)
        try:
            result = await self.service.open(ask, now=now)
        except CommitError as error:
            raise PcpError(PcpResult.NO_RESOURCES, f"commit failed: {error}") from None
        if isinstance(result, Refusal):
            raise PcpError(_REFUSAL_RESULTS[result], result.value, _held_for(result, existing, now))
        return self._success(request, data, internal, result.remaining(now), epoch, echo)

    async def _close(self, key: PinholeKey, owner: PinholeOwner, *, now: float) -> Refusal | None:
        try:
            return await self.service.close(key, owner, now=now)
        except CommitError as error:
            raise PcpError(PcpResult.NO_RESOURCES, f"commit failed: {error}") from None

    def _options(
        self, request: PcpRequest, source: IPv6Address
    ) -> tuple[IPv6Address, list[PcpFilter], str | None, tuple[PcpOption, ...]]:
        """Check options in order (RFC 6887 §7.3): the internal address, FILTERs, label, echo."""
        internal = source
        filters: list[PcpFilter] = []
        description: str | None = None
        echo: list[PcpOption] = []
        seen: set[type] = set()
        for option in request.options:
            if isinstance(option, PcpUnknownOption):
                if option.mandatory:
                    raise PcpError(PcpResult.UNSUPP_OPTION, f"unsupported option {option.code}")
                continue
            if isinstance(option, PcpThirdParty | PcpPreferFailure | PcpDescription):
                if type(option) in seen:
                    raise PcpError(PcpResult.MALFORMED_OPTION, f"{type(option).__name__} twice")
                seen.add(type(option))
            if isinstance(option, PcpThirdParty):
                if pcp.unmapped(option.address) is not None:
                    raise PcpError(PcpResult.MALFORMED_OPTION, "IPv4 THIRD_PARTY over IPv6")
                if option.address == source:
                    raise PcpError(PcpResult.MALFORMED_REQUEST, "THIRD_PARTY names the sender")
                internal = option.address  # the rules decide (secure mode refuses it)
            elif isinstance(option, PcpFilter):
                # §13.3: an IPv6 remote prefix of 0..128 bits; 0 clears the filters.
                if option.prefix_length > 128 or (
                    option.prefix_length and pcp.unmapped(option.remote_address) is not None
                ):
                    raise PcpError(PcpResult.MALFORMED_OPTION, "bad FILTER for IPv6")
                filters.append(option)
            elif isinstance(option, PcpDescription):
                text = option.text.encode()[: self.max_description].decode("utf-8", "ignore")
                description, option = text, PcpDescription(text)
            # PREFER_FAILURE needs nothing: the "external" port is always the internal one.
            echo.append(option)
        return internal, filters, description, tuple(echo)

    @staticmethod
    def _success(
        request: PcpRequest,
        data: PcpMapData,
        internal: IPv6Address,
        lifetime: int,
        epoch: int,
        echo: tuple[PcpOption, ...],
    ) -> PcpResponse:
        # §2, §11.3: on a pure firewall the mapping is the identity, so the assigned external
        # address and port are the internal ones.
        body = PcpMapData(data.nonce, data.protocol, data.internal_port, data.internal_port,
                          internal)  # fmt: skip
        return PcpResponse(PcpOpcode.MAP, PcpResult.SUCCESS, lifetime, epoch, body, echo)

    def _error(
        self, data: bytes, result: PcpResult, lifetime: int | None, *, now: float, parsed: bool
    ) -> bytes:
        epoch = self.service.epoch(now=now)
        return error_reply(data, result, lifetime, epoch=epoch, parsed=parsed)

    def announcement(self) -> bytes:
        """The unsolicited ANNOUNCE after a (re)start (§14.1.3)."""
        return pcp.encode_response(
            PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, self.service.epoch())
        )


def _held_for(refusal: Refusal, existing: Pinhole | None, now: float) -> int | None:
    """§11.3: a nonce mismatch is answered with the lifetime of the mapping it hit."""
    if refusal is Refusal.NOT_OWNER and existing is not None:
        return existing.remaining(now)
    return None


def _merge_filters(
    options: list[PcpFilter], existing: tuple[PinholeFilter, ...]
) -> tuple[PinholeFilter, ...]:
    """§13.3: new FILTERs add to the pinhole's; a prefix length of 0 removes them all."""
    kept = list(existing)
    for option in options:
        if option.prefix_length == 0:
            kept = []
            continue
        network = IPv6Network((option.remote_address, option.prefix_length), strict=False)
        item = PinholeFilter(network, option.remote_port)
        if item not in kept:
            kept.append(item)
    return tuple(sorted(kept))


class Pcp6Server:
    """One UDP socket on [::]:5351 per LAN interface; answers LAN sources only."""

    def __init__(
        self,
        interfaces: Sequence[str],
        handler: Pcp6Handler,
        lan: Sequence[IPv6Network],
        limiter: RateLimiter,
    ) -> None:
        self.interfaces = interfaces
        self.handler = handler
        self.lan = tuple(lan)
        self.limiter = limiter
        self.dropped = RateLimitedLog(log, logging.INFO)
        """Datagrams from non-LAN sources or over the rate, dropped without an answer."""
        self.failed = RateLimitedLog(log, logging.ERROR)
        self._sockets: dict[str, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._announcer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the sockets and send the ANNOUNCE of a (re)start to each LAN (§14.1.3)."""
        loop = asyncio.get_running_loop()
        for name in self.interfaces:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bound to the device: a request from the WAN (even to a LAN address) never
            # reaches this socket (RFC 6887 §8.2, RFC 6092 REC-50).
            bind_to_device(sock, name)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(name)
            )
            sock.bind(("::", SERVER_PORT))
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._drain, sock)
            self._sockets[name] = sock
            log.info("PCP over IPv6 listening on %s UDP [::]:%d", name, SERVER_PORT)
        self._announcer = loop.create_task(self.announce())

    async def announce(self, pause: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """RFC 6887 §14.1.3: the restart ANNOUNCE to [ff02::1]:5350 on every LAN, ten times,
        250 ms then doubling gaps, each copy with the epoch of its sending."""
        gap = ANNOUNCE_FIRST_GAP
        for copy in range(ANNOUNCE_COPIES):
            message = self.handler.announcement()
            for sock in list(self._sockets.values()):
                with contextlib.suppress(OSError):
                    sock.sendto(message, (ALL_NODES, CLIENT_PORT))
            if copy + 1 < ANNOUNCE_COPIES:
                await pause(gap)
                gap *= 2

    def close(self) -> None:
        """Close every socket; answers in flight are dropped."""
        loop = asyncio.get_running_loop()
        if self._announcer is not None:
            self._announcer.cancel()
        for sock in self._sockets.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for task in self._tasks:
            task.cancel()

    def is_lan_source(self, address: IPv6Address) -> bool:
        """Whether a datagram from `address` may be answered (a LAN prefix or on-link)."""
        return address in LINK_LOCAL or any(address in net for net in self.lan)

    def _drain(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded per wake-up; the reader fires again while data waits
            try:
                data, peer = sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            source = IPv6Address(peer[0].split("%")[0])
            now = time.monotonic()
            if not self.is_lan_source(source) or peer[1] == 0:
                self.dropped.note(now, "PCP6 datagram from non-LAN source %s dropped", source)
                continue
            if not self.limiter.allow(source, now=now):
                self.dropped.note(now, "PCP6 client %s over its rate: dropped", source)
                continue
            if len(self._tasks) >= MAX_IN_FLIGHT:
                self.dropped.note(now, "PCP6: %d requests in flight, %s dropped", MAX_IN_FLIGHT,
                                  source)  # fmt: skip
                continue
            task = asyncio.get_running_loop().create_task(self._answer(sock, data, peer, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(
        self, sock: socket.socket, data: bytes, peer: tuple[object, ...], now: float
    ) -> None:
        try:
            reply = await self.handler.answer(data, IPv6Address(str(peer[0]).split("%")[0]),
                                              now=now)  # fmt: skip
        except Exception as error:  # a peer never crashes the daemon, nor logs a traceback
            self.failed.note(now, "PCP6 request from %s failed: %r", peer[0], error)
            return
        if reply is not None:
            with contextlib.suppress(OSError):
                sock.sendto(reply, peer)
