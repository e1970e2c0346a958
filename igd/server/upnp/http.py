"""The UPnP HTTP server: descriptions, SOAP control and GENA subscriptions, on the internal
addresses only, hardened against the browser- and LAN-borne attacks on UPnP.

- Connections from outside the interface's networks are closed at once; each client may hold
  MAX_CONNECTIONS_PER_CLIENT connections, all clients MAX_CONNECTIONS. When all are taken, a
  client holding fewer than the biggest holder (and always one holding none) is admitted in
  place of that holder's oldest connection not running an action (slowloris from many LAN
  addresses, with half-sent heads or bodies, cannot lock everyone else out). A request head
  must arrive within HEADER_TIMEOUT of the connection or of the previous answer.
- Malformed requests get aiohttp's 400 and one rate-limited log line, never a traceback.
- Host must be our own literal address and port (DNS rebinding, Filet-o-Firewall).
- Control is POST with a SOAPACTION header and an XML content type, to the exact control URLs
  (a browser cannot send that cross-origin without a CORS preflight, which we never grant).
- Header lines, header count and bodies are capped; XML goes through defusedxml only.
- Control actions share each client's token bucket with its NAT-PMP and PCP requests (the
  `[limits]` rate and burst): past it, HTTP 503 with Retry-After, before the body is read or
  any XML parsed (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from igd.proto import soap
from igd.proto.description import DeviceTree, ServiceKind, Urls, service_version
from igd.proto.errors import DecodeError
from igd.server.interfaces import InternalInterface, InternalInterface6, bind_to_device
from igd.server.pxp import RateLimiter
from igd.server.ratelog import RateLimitedLog
from igd.server.upnp import errors
from igd.server.upnp.actions import Actions
from igd.server.upnp.errors import UpnpError
from igd.server.upnp.events import Events

log = logging.getLogger("igd.upnp.http")

MAX_BODY = 16 * 1024
MAX_LINE = 2048
MAX_HEADERS = 32
# Seconds from a connection's start, or from its previous answer, to a complete request head:
# an idle keep-alive connection and one whose head trickles in are closed alike (slowloris).
HEADER_TIMEOUT = 5.0
BODY_TIMEOUT = 5.0  # seconds to receive a request body
MAX_CONNECTIONS_PER_CLIENT = 8
MAX_CONNECTIONS = 256
XML = 'text/xml; charset="utf-8"'
# User-Agents of control points known to reject an InternetGatewayDevice:2 description
# (Windows' SSDP stack and its games; miniupnpd issues 277, 539).
V1_ONLY_AGENTS = ("microsoft", "fdssdp", "xbox")


def wants_v1(user_agent: str) -> bool:
    """Whether a User-Agent belongs to a control point that only understands IGD v1."""
    agent = user_agent.lower()
    return any(name in agent for name in V1_ONLY_AGENTS)


@dataclass(frozen=True, slots=True)
class Route:
    """What one URL serves."""

    tree: DeviceTree
    urls: Urls
    role: str  # "description", "scpd", "control" or "event"
    kind: ServiceKind | None = None


@dataclass(frozen=True, slots=True)
class Documents:
    """The prepared description documents, by IGD version."""

    descriptions: Mapping[int, bytes]
    scpds: Mapping[tuple[int, ServiceKind], bytes]


class UpnpHttp:
    """Serves one gateway's UPnP URLs on each internal interface's address."""

    def __init__(
        self,
        actions: Actions,
        events: Events,
        routes: Mapping[str, Route],
        documents: Documents,
        *,
        port: int,
        server: str,
        auto_v1: bool,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.actions = actions
        self.events = events
        self.routes = routes
        self.documents = documents
        self.port = port
        self.server_header = server
        self.auto_v1 = auto_v1
        self._servers: list[asyncio.Server] = []
        self._servers6: dict[str, asyncio.Server] = {}
        """The IPv6 listeners by address: rebind6 follows a renumbering."""
        self._served: dict[str, InternalInterface | InternalInterface6] = {}
        """The interface of each address listened on (the admission check reads it)."""
        self._bind_device = True
        self.unbound = RateLimitedLog(log, logging.WARNING)
        """New IPv6 addresses that could not be listened on yet (`count`)."""
        self._http: _GuardedServer | None = None
        self.rebinding = RateLimitedLog(log, logging.WARNING)
        self.limiter = limiter
        """Each client's action budget (None: unlimited)."""
        self.limited = RateLimitedLog(log, logging.WARNING)
        """Control requests refused with 503 for their client's rate (`count`)."""

    async def start(
        self,
        interfaces: Sequence[InternalInterface],
        *,
        bind_device: bool = True,
        lan6: Sequence[InternalInterface6] = (),
    ) -> None:
        """Listen on each interface's own address (never on the wildcard address), and on
        the LAN's IPv6 address of each interface in `lan6`."""
        self._bind_device = bind_device
        self._http = _GuardedServer(
            self.handle,
            self._served,
            # aiohttp's keep-alive timer runs from the connection's start and from each
            # answer until a complete head arrives: the header timeout.
            keepalive_timeout=HEADER_TIMEOUT,
            # A body left unread (refused, or sent to a URL that takes none) is not waited
            # for (aiohttp would read it for up to 10 s): the connection closes after the answer.
            lingering_time=0.0,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            access_log=None,
        )
        served: list[InternalInterface | InternalInterface6] = [*interfaces, *lan6]
        for interface in served:
            await self._listen(interface)

    async def rebind6(self, lan6: Sequence[InternalInterface6]) -> bool:
        """Follow a LAN renumbering: stop listening on IPv6 addresses no longer served and
        listen on the new ones (connections already open finish where they are); False if
        one could not be bound yet (asked again, only the missing ones are tried)."""
        bound = True
        wanted = {str(i.address): i for i in lan6}
        for address, server in list(self._servers6.items()):
            if address in wanted:
                self._served[address] = wanted[address]  # its prefixes may have changed
                continue
            server.close()
            self._servers.remove(server)
            del self._servers6[address], self._served[address]
            log.info("UPnP HTTP no longer listening on [%s]:%d", address, self.port)
        for address, interface in wanted.items():
            if address not in self._servers6:
                try:
                    await self._listen(interface)
                except OSError as error:
                    # The address may be gone again, or still tentative (RFC 4862 §5.4:
                    # not bindable during duplicate address detection): the caller asks
                    # again at its next look.
                    bound = False
                    now = asyncio.get_running_loop().time()
                    self.unbound.note(now, "cannot listen on [%s]:%d yet: %s", address,
                                      self.port, error)  # fmt: skip
        return bound

    async def _listen(self, interface: InternalInterface | InternalInterface6) -> None:
        assert self._http is not None
        loop = asyncio.get_running_loop()
        six = isinstance(interface, InternalInterface6)
        sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if six:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self._bind_device:
                # A packet for this address arriving on the WAN interface is not accepted.
                bind_to_device(sock, interface.name)
            sock.bind((str(interface.address), self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        server = await loop.create_server(self._http, sock=sock)
        self._servers.append(server)
        self._served[str(interface.address)] = interface
        if six:
            self._servers6[str(interface.address)] = server
        log.info(
            "UPnP HTTP listening on %s:%d (%s)",
            f"[{interface.address}]" if six else interface.address,
            self.port,
            interface.name,
        )

    @property
    def connections(self) -> int:
        """Connections open and counted against the caps."""
        return self._http.open if self._http is not None else 0

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._http is not None:
            await self._http.shutdown(1.0)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._servers6.clear()
        self._served.clear()

    # -- requests ----------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request."""
        local = request.transport.get_extra_info("sockname") if request.transport else None
        peer = request.remote
        if local is None or peer is None:
            return self._plain(400)
        if not self._host_ok(request.headers.get("Host", ""), local[0]):
            self.rebinding.note(
                asyncio.get_running_loop().time(),
                "refused request from %s with Host %r (DNS rebinding?)",
                peer,
                request.headers.get("Host", "")[:80],
            )
            return self._plain(403)
        route = self.routes.get(request.path)
        if route is None:
            return self._plain(404)
        client = ip_address(peer.split("%")[0])
        if route.role in ("description", "scpd"):
            if request.method not in ("GET", "HEAD"):
                return self._plain(405)
            return self._document(route, request.headers.get("User-Agent", ""))
        if route.role == "control":
            if request.method != "POST":
                return self._plain(405)
            return await self._control(route, request, client)
        assert route.kind is not None
        headers = {k.upper(): v for k, v in request.headers.items()}
        if isinstance(client, IPv6Address):
            # GENA callbacks are literal IPv4 URLs of the subscriber (gena.callback_target).
            return self._plain(412 if request.method in ("SUBSCRIBE", "UNSUBSCRIBE") else 405)
        if request.method == "SUBSCRIBE":
            version = service_version(route.kind, route.tree.version)
            status, extra = self.events.subscribe(client, route.kind, route.tree, version, headers)
            return self._plain(status, extra)
        if request.method == "UNSUBSCRIBE":
            return self._plain(self.events.unsubscribe(client, headers))
        return self._plain(405)

    def _document(self, route: Route, user_agent: str) -> web.Response:
        version = route.tree.version
        if route.role == "description":
            if (
                self.auto_v1
                and version > 1
                and wants_v1(user_agent)
                and 1 in self.documents.descriptions
            ):
                version = 1  # the description of the v1 tree, whose URLs are all v1
            body = self.documents.descriptions[version]
        else:
            assert route.kind is not None
            body = self.documents.scpds[(version, route.kind)]
        return web.Response(body=body, headers={"Content-Type": XML, "Server": self.server_header})

    async def _control(
        self, route: Route, request: web.BaseRequest, client: IPv4Address | IPv6Address
    ) -> web.Response:
        assert route.kind is not None
        limiter = self.limiter
        if limiter is not None:
            now = asyncio.get_running_loop().time()
            if not limiter.allow(client, now=now):
                # Before the body is read or parsed: a client over its rate costs little.
                self.limited.note(now, "UPnP actions from %s over its rate limit", client)
                wait = max(1, math.ceil(1 / limiter.rate)) if limiter.rate > 0 else 60
                return self._plain(503, {"Retry-After": str(wait)})
        if "xml" not in request.headers.get("Content-Type", "").lower():
            return self._plain(415)
        header = request.headers.get("SOAPAction")
        if header is None:
            return self._plain(400)
        if request.content_length is not None and request.content_length > MAX_BODY:
            return self._plain(413)
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await _read_capped(request)
        except TimeoutError:
            return self._plain(408)
        if body is None:
            return self._plain(413)
        try:
            action = soap.decode_soap_action(header)
            invocation = soap.decode_request(body)
            if invocation.action != action.action:
                raise DecodeError(f"SOAPACTION names {action.action}, the body {invocation.action}")
            version = self._version(route, action)
            assert self._http is not None
            with self._http.working(request):
                response = await self.actions.invoke(
                    route.tree,
                    route.kind,
                    version,
                    soap.SoapRequest(action.service_type, action.action, invocation.arguments),
                    client,
                )
        except DecodeError as error:
            log.debug("invalid SOAP request from %s: %s", client, error)
            return self._fault(UpnpError(errors.INVALID_ARGS, str(error)))
        except UpnpError as error:
            return self._fault(error)
        return web.Response(
            body=soap.encode_response(response),
            headers={"Content-Type": XML, "Server": self.server_header},
        )

    def _version(self, route: Route, action: soap.SoapAction) -> int:
        """The service version an invocation gets: the lower of the URL's and the header's."""
        assert route.kind is not None
        ours = service_version(route.kind, route.tree.version)
        if action.service_type == soap.CONTROL_NS:
            return ours
        prefix, _, _ = action.service_type.rpartition(":")
        if prefix != f"urn:schemas-upnp-org:service:{route.kind}" or action.version is None:
            raise UpnpError(errors.INVALID_ACTION, f"{action.service_type[:80]} is not served here")
        return max(1, min(ours, action.version))

    def _fault(self, error: UpnpError) -> web.Response:
        return web.Response(
            status=500,
            body=soap.encode_fault(error.fault()),
            headers={"Content-Type": XML, "Server": self.server_header},
        )

    def _plain(self, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(
            status=status, headers={"Server": self.server_header, **(headers or {})}
        )

    def _host_ok(self, host: str, local: str) -> bool:
        """Host must be our literal address, with our port (UDA 1.1 §2.1, and no names)."""
        host = host.strip()
        if host.startswith("["):
            # RFC 3986 §3.2.2: an IPv6 literal in brackets, then an optional port.
            name, closed, rest = host[1:].partition("]")
            if not closed or (rest and not rest.startswith(":")):
                return False
            port = rest[1:] if rest else "80"
            try:
                same = ip_address(name) == ip_address(local.split("%")[0])
            except ValueError:
                return False
            return same and port == str(self.port)
        name, sep, port = host.rpartition(":")
        if not sep:
            name, port = port, "80"
        return name == local and port == str(self.port)


async def _read_capped(request: web.BaseRequest) -> bytes | None:
    """The request body, or None when it is longer than MAX_BODY."""
    body = b""
    while len(body) <= MAX_BODY:
        chunk = await request.content.read(MAX_BODY + 1 - len(body))
        if not chunk:
            return body
        body += chunk
    return None


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _Connection:
    """What admission knows of one open connection."""

    client: str
    transport: asyncio.Transport
    busy: bool = False
    """An action is running for it (a mapping may be changing): never evicted then."""


class _GuardedServer(web.Server):
    """aiohttp's low-level server with admission control: connections from outside the LAN
    are refused, per-client and total connections capped, admission fair when all are taken.
    """

    def __init__(
        self,
        handler: Handler,
        interfaces: Mapping[str, InternalInterface | InternalInterface6],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.interfaces = interfaces
        # Insertion order is age order: the first of a client's entries is its oldest.
        self._open: dict[RequestHandler, _Connection] = {}
        self._per_client: dict[str, int] = {}
        self.refused = RateLimitedLog(log, logging.INFO)
        self.evicted = RateLimitedLog(log, logging.INFO)
        self.malformed = RateLimitedLog(log, logging.INFO)
        self.failed = RateLimitedLog(log, logging.ERROR)

    @property
    def open(self) -> int:
        return len(self._open)

    def __call__(self) -> RequestHandler:
        return _QuietHandler(self, loop=self._loop, **self._kwargs)

    @contextlib.contextmanager
    def working(self, request: web.BaseRequest) -> Iterator[None]:
        """Mark the request's connection busy (not to be evicted) for the block.

        Only around actions: a connection still sending its head or body, or slow to read
        its answer, is what a slowloris holds, and may be evicted.
        """
        connection = self._open.get(request.protocol)
        if connection is not None:
            connection.busy = True
        try:
            yield
        finally:
            if connection is not None:
                connection.busy = False

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        interface = self.interfaces.get(local[0]) if local else None
        client = peer[0] if peer else ""
        try:
            allowed = interface is not None and interface.serves(ip_address(client.split("%")[0]))
        except ValueError:
            allowed = False
        now = asyncio.get_running_loop().time()
        if not allowed:
            self.refused.note(now, "refused HTTP connection from %s: outside the LAN", client)
            self._refuse(handler, transport)
            return
        held = self._per_client.get(client, 0)
        if held >= MAX_CONNECTIONS_PER_CLIENT:
            self.refused.note(
                now, "refused HTTP connection from %s: it holds %d already", client, held
            )
            self._refuse(handler, transport)
            return
        if len(self._open) >= MAX_CONNECTIONS and not self._evict_for(client, held, now):
            self.refused.note(now, "refused HTTP connection from %s: all taken", client)
            self._refuse(handler, transport)
            return
        self._per_client[client] = held + 1
        self._open[handler] = _Connection(client, transport)

    def _refuse(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Close a connection just accepted.

        Not at once: aiohttp starts the handler's task after this hook returns, and that task
        fails (a traceback in the log) when the connection is already gone by then.
        """

        def close() -> None:
            transport.abort()
            handler.force_close()  # the handler's task then ends without reading anything

        asyncio.get_running_loop().call_soon(close)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._forget(handler)
        super().connection_lost(handler, exc)

    def _evict_for(self, client: str, held: int, now: float) -> bool:
        """Make room for `client` by closing the oldest idle or half-sent connection of the
        client holding the most, if that one holds more than `client` would; or no room."""
        most = max(self._per_client.values(), default=0)
        # A client with nothing open is always admitted; otherwise only when it would still
        # hold no more than the victim (no endless swapping between two big holders).
        if not (held == 0 < most or most > held + 1):
            return False
        for handler, connection in self._open.items():
            if self._per_client[connection.client] == most and not connection.busy:
                self.evicted.note(
                    now,
                    "all HTTP connections taken: closed one of %s (holding %d) for %s",
                    connection.client,
                    most,
                    client,
                )
                self._forget(handler)
                connection.transport.abort()
                return True
        return False

    def _forget(self, handler: RequestHandler) -> None:
        connection = self._open.pop(handler, None)
        if connection is not None:
            left = self._per_client.pop(connection.client, 1) - 1
            if left > 0:
                self._per_client[connection.client] = left

    def bad_request(self, request: web.BaseRequest, status: int, exc: BaseException | None) -> None:
        """A request aiohttp could not parse, or a handler that failed: one line a minute."""
        if isinstance(exc, ConnectionError):
            return  # the client left (or was evicted) while sending its body: nothing to say
        now = asyncio.get_running_loop().time()
        if exc is None or isinstance(exc, HttpProcessingError):
            # repr: one line whatever the request held (aiohttp quotes it over several).
            reason = repr(getattr(exc, "message", None) or type(exc).__name__)[:100]
            self.malformed.note(
                now, "bad HTTP request from %s (%d): %s", request.remote, status, reason
            )
        else:
            # A failing handler is a bug worth its traceback, but not one per request.
            self.failed.note(now, "HTTP handler failed for %s: %r", request.remote, exc)
            if self.failed.count == 1:
                log.error("HTTP handler failure", exc_info=exc)


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, reporting bad requests to the server's rate-limited log
    instead of logging a traceback for each."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request aiohttp could not parse (or a failed handler), quietly."""
        manager = self._manager
        if isinstance(manager, _GuardedServer):
            manager.bad_request(request, status, exc)
        if request.writer.output_size > 0:
            # Part of an answer went out already: aiohttp closes the connection.
            raise ConnectionError("an answer was already under way")
        response = web.Response(status=status, text=f"{status}\n", content_type="text/plain")
        response.force_close()
        return response

    def log_debug(self, *args: Any, **kw: Any) -> None:
        """aiohttp's debug lines, without the tracebacks some of them carry."""
        kw.pop("exc_info", None)
        super().log_debug(*args, **kw)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own failures outside a handler: rate-limited, like a failed handler."""
        manager = self._manager
        exc = kw.get("exc_info")
        if isinstance(manager, _GuardedServer) and isinstance(exc, BaseException):
            manager.failed.note(
                asyncio.get_running_loop().time(), "HTTP connection failed: %r", exc
            )
        else:
            super().log_exception(*args, **kw)
