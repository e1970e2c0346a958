"""A UDP socket connected to one gateway port, with request/answer matching and
retransmission: what the NAT-PMP and PCP clients share."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from igd.client.errors import GatewayTimeout, NoGatewayError, PortMappingError

log = logging.getLogger("igd.client")

T = TypeVar("T")
A = TypeVar("A", IPv4Address, IPv6Address)

Matcher = Callable[[bytes], "T | PortMappingError | None"]
"""Looks at one datagram: the answer, an error to raise, or None (not for this request)."""


@dataclass(slots=True, eq=False)
class _Pending(Generic[T]):
    matcher: Matcher[T]
    future: asyncio.Future[T] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class UdpChannel(asyncio.DatagramProtocol, Generic[A]):
    """A datagram socket connected to gateway:port; the kernel drops anything from elsewhere
    (RFC 6886 §3.2 and RFC 6887 §8.3: answers must come from the server's address and port).

    IPv6: `scope` is the interface index a link-local gateway needs, `local` the address
    to send from (a link-local destination would otherwise get a link-local source)."""

    def __init__(self, gateway: A, port: int, *, local: A | None = None, scope: int = 0) -> None:
        self.gateway: A = gateway
        self.port = port
        self.local_address: A = type(gateway)(0)
        self.bind: A | None = local
        self.scope = scope
        self.on_unsolicited: Callable[[bytes], None] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: list[_Pending[object]] = []

    async def open(self) -> UdpChannel[A]:
        """Open the socket (a random source port, RFC 6056)."""
        loop = asyncio.get_running_loop()
        try:
            if isinstance(self.gateway, IPv6Address):
                # asyncio takes only 2-tuples: a link-local gateway needs its scope, so the
                # socket is bound and connected here.
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: self, sock=self._socket6(self.gateway)
                )
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: self, remote_addr=(str(self.gateway), self.port)
                )
        except OSError as exc:
            raise NoGatewayError(f"cannot reach the gateway {self.gateway}: {exc}") from exc
        self._transport = transport
        name = str(transport.get_extra_info("sockname")[0]).split("%", 1)[0]
        self.local_address = type(self.gateway)(name)
        return self

    def _socket6(self, gateway: IPv6Address) -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            if self.bind is not None:
                scope = self.scope if self.bind.is_link_local else 0
                sock.bind((str(self.bind), 0, 0, scope))
            sock.connect((str(gateway), self.port, 0, self.scope))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Close the socket; requests in flight fail."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail(NoGatewayError("the client was closed"))

    @property
    def closed(self) -> bool:
        return self._transport is None

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        for pending in list(self._pending):
            if pending.future.done():
                continue
            try:
                outcome = pending.matcher(data)
            except Exception as exc:  # a matcher bug must not kill the socket
                log.exception("matching a datagram from %s failed", self.gateway)
                outcome = PortMappingError(f"bad answer: {exc}")
            if outcome is None:
                continue
            if isinstance(outcome, PortMappingError):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
            return
        if self.on_unsolicited is not None:
            self.on_unsolicited(data)

    def error_received(self, exc: Exception) -> None:
        # RFC 6886 §3.1: ICMP port unreachable means no NAT-PMP (or PCP) server; stop now.
        if isinstance(exc, ConnectionRefusedError):
            self._fail(NoGatewayError(f"{self.gateway} port {self.port} is closed (ICMP)"))
        else:
            # EPERM from a host firewall and the like count as a lost datagram (Tailscale #3619).
            log.debug("send to %s failed: %s", self.gateway, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def _fail(self, error: PortMappingError) -> None:
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def exchange(
        self, payload: bytes, matcher: Matcher[T], waits: Iterable[float], what: str
    ) -> T:
        """Send `payload`, resend after each wait in `waits`, return the first matching answer."""
        pending: _Pending[T] = _Pending(matcher)
        self._pending.append(pending)  # type: ignore[arg-type]
        try:
            for wait in waits:
                if self._transport is None:
                    raise NoGatewayError("the client is closed")
                self._transport.sendto(payload)
                try:
                    return await asyncio.wait_for(asyncio.shield(pending.future), wait)
                except TimeoutError:
                    continue
            raise GatewayTimeout(f"no answer from {self.gateway} to the {what}")
        finally:
            self._pending.remove(pending)  # type: ignore[arg-type]
            if not pending.future.done():
                pending.future.cancel()


class ChannelClient:
    """A protocol client over one UdpChannel: opened by `async with` or `open()`, closed on
    leaving it or by `close()`."""

    channel: UdpChannel[Any]

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def open(self) -> None:
        """Open the socket."""
        if self.channel.closed:
            await self.channel.open()

    def close(self) -> None:
        """Close the socket."""
        self.channel.close()
