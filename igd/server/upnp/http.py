"""The UPnP HTTP server: descriptions, SOAP control and GENA subscriptions, on the internal
addresses only, hardened against the browser- and LAN-borne attacks on UPnP.

- Connections from outside the interface's networks are closed at once; each client may hold
  MAX_CONNECTIONS_PER_CLIENT connections, all clients MAX_CONNECTIONS; idle ones are closed.
- Host must be our own literal address and port (DNS rebinding, Filet-o-Firewall).
- Control is POST with a SOAPACTION header and an XML content type, to the exact control URLs
  (a browser cannot send that cross-origin without a CORS preflight, which we never grant).
- Header lines, header count and bodies are capped; XML goes through defusedxml only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from igd.proto import soap
from igd.proto.description import DeviceTree, ServiceKind, Urls, service_version
from igd.proto.errors import DecodeError
from igd.server.interfaces import InternalInterface, bind_to_device
from igd.server.upnp import errors
from igd.server.upnp.actions import Actions
from igd.server.upnp.errors import UpnpError
from igd.server.upnp.events import Events

log = logging.getLogger("igd.upnp.http")

MAX_BODY = 16 * 1024
MAX_LINE = 2048
MAX_HEADERS = 32
IDLE_TIMEOUT = 10.0  # seconds a connection may sit without a request
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
    ) -> None:
        self.actions = actions
        self.events = events
        self.routes = routes
        self.documents = documents
        self.port = port
        self.server_header = server
        self.auto_v1 = auto_v1
        self._servers: list[asyncio.Server] = []
        self._http: _GuardedServer | None = None

    async def start(
        self, interfaces: Sequence[InternalInterface], *, bind_device: bool = True
    ) -> None:
        """Listen on each interface's own address (never on the wildcard address)."""
        loop = asyncio.get_running_loop()
        self._http = _GuardedServer(
            self.handle,
            {str(i.address): i for i in interfaces},
            keepalive_timeout=IDLE_TIMEOUT,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            access_log=None,
        )
        for interface in interfaces:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if bind_device:
                # A packet for this address arriving on the WAN interface is not accepted.
                bind_to_device(sock, interface.name)
            sock.bind((str(interface.address), self.port))
            sock.listen(128)
            sock.setblocking(False)
            self._servers.append(await loop.create_server(self._http, sock=sock))
            log.info(
                "UPnP HTTP listening on %s:%d (%s)", interface.address, self.port, interface.name
            )

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._http is not None:
            await self._http.shutdown(1.0)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    # -- requests ----------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request."""
        local = request.transport.get_extra_info("sockname") if request.transport else None
        peer = request.remote
        if local is None or peer is None:
            return self._plain(400)
        if not self._host_ok(request.headers.get("Host", ""), local[0]):
            log.warning(
                "refused request from %s with Host %r (DNS rebinding?)",
                peer,
                request.headers.get("Host", "")[:80],
            )
            return self._plain(403)
        route = self.routes.get(request.path)
        if route is None:
            return self._plain(404)
        client = IPv4Address(peer)
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
        self, route: Route, request: web.BaseRequest, client: IPv4Address
    ) -> web.Response:
        assert route.kind is not None
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
        name, sep, port = host.strip().rpartition(":")
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


class _GuardedServer(web.Server):
    """aiohttp's low-level server, refusing connections beyond the caps or from elsewhere."""

    def __init__(
        self, handler: Any, interfaces: Mapping[str, InternalInterface], **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.interfaces = interfaces
        self._per_client: dict[str, int] = {}
        self._counted: dict[RequestHandler, str] = {}

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        interface = self.interfaces.get(local[0]) if local else None
        client = peer[0] if peer else ""
        try:
            allowed = interface is not None and interface.serves(IPv4Address(client))
        except ValueError:
            allowed = False
        held = self._per_client.get(client, 0)
        if (
            not allowed
            or held >= MAX_CONNECTIONS_PER_CLIENT
            or len(self._counted) >= MAX_CONNECTIONS
        ):
            log.debug("closed connection from %s (outside the LAN or over the limits)", client)
            transport.abort()
            return
        self._per_client[client] = held + 1
        self._counted[handler] = client

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        client = self._counted.pop(handler, None)
        if client is not None:
            left = self._per_client.pop(client, 1) - 1
            if left > 0:
                self._per_client[client] = left
        super().connection_lost(handler, exc)
