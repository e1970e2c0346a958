"""The admin listener: the web console and /metrics (aiohttp), on loopback unless configured
otherwise, never on the external interface's addresses.

Every response carries a strict Content-Security-Policy; requests whose Host header is not
the listener's address or a configured name are refused (DNS rebinding); every POST needs the
session's CSRF token; off loopback a password (scrypt hash in the configuration) is asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from ipaddress import IPv4Address
from typing import Any

from aiohttp import web

from igd.model import MappingKey, MapRequest, Mechanism, Protocol
from igd.policy import Policy
from igd.server.admin.auth import (
    HashFormatError,
    LoginLimiter,
    PasswordHash,
    Session,
    Sessions,
    allowed_hosts,
    csrf_matches,
)
from igd.server.admin.console import ConsoleLog, policy_rows
from igd.server.admin.metrics import CONTENT_TYPE, Metrics
from igd.server.backends import BackendError
from igd.server.policy_cli import decide, explanation, render
from igd.server.service import Service

log = logging.getLogger("igd.admin")

COOKIE = "igd_session"
CSRF_HEADER = "X-CSRF-Token"
MAX_BODY = 16 * 1024  # bytes of a request body; larger ones are answered 413
MAX_LINE = 4096  # bytes of the request line (aiohttp answers 400 beyond)
MAX_FIELD = 4096  # bytes of one header field
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Served from the package: a fixed table, so a request names an entry, never a path.
ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
PAGES = ("console.html", "login.html")


class AdminListenError(ValueError):
    """The admin listener's address is one the WAN reaches (or the wildcard)."""


class AdminBindError(OSError):
    """The admin listener cannot listen (its address is taken or gone)."""


def check_listen(address: IPv4Address, forbidden: frozenset[IPv4Address]) -> None:
    """Refuse a listener the WAN could reach: the wildcard or an external address."""
    if address.is_unspecified:
        raise AdminListenError(
            f"[admin] listen {address} would include the external interface's addresses;"
            " name a loopback or LAN address"
        )
    if address in forbidden:
        raise AdminListenError(
            f"[admin] listen {address} is an address of the external interface (the WAN"
            " reaches it); name a loopback or LAN address"
        )


def _static(name: str) -> bytes:
    return resources.files("igd.server.admin").joinpath("static", name).read_bytes()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminServer:
    """The admin HTTP listener: console pages, its JSON API and /metrics."""

    def __init__(
        self,
        service: Service,
        *,
        listen: tuple[IPv4Address, int],
        policy: Callable[[], Policy],
        external: Callable[[], IPv4Address | None],
        password_hash: str | None = None,
        names: tuple[str, ...] = (),
        device: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.address, self.port = listen
        self.policy = policy
        self.external = external
        self.device = device
        """Interface the socket is bound to (SO_BINDTODEVICE): packets for the listener's
        address arriving on any other interface (the WAN) never reach it."""
        self.now = clock
        if password_hash is None and not self.address.is_loopback:
            raise AdminListenError("[admin] listen off loopback needs [admin] password_hash")
        try:
            self.password = PasswordHash.parse(password_hash) if password_hash else None
        except HashFormatError as error:
            raise AdminListenError(f"[admin] password_hash: {error}") from None
        self.names = names
        self.hosts = allowed_hosts(self.address, self.port, names)
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self.metrics = Metrics(service)
        self.log = ConsoleLog(service)
        self.started = time.time()
        self.assets = {name: _static(name) for name in (*ASSETS, *PAGES)}
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (tests serve it on a test server)."""
        app = web.Application(
            client_max_size=MAX_BODY, middlewares=[self._guard], handler_args=None
        )
        app.router.add_get("/", self._console)
        app.router.add_get("/login", self._login_page)
        app.router.add_post("/login", self._login)
        app.router.add_post("/logout", self._logout)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/state", self._state)
        app.router.add_post("/api/delete", self._delete)
        app.router.add_post("/api/flush", self._flush)
        app.router.add_post("/api/explain", self._explain)
        return app

    def follow(self) -> None:
        """Subscribe the metrics and the console to the feed (before anything is served)."""
        self.metrics.attach()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.metrics.follow()),
            loop.create_task(self.log.follow()),
        ]

    async def start(self) -> None:
        """Open the listener and follow the feed; AdminBindError if it cannot listen."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.device is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
            sock.bind((str(self.address), self.port))
        except OSError as error:
            sock.close()
            raise AdminBindError(
                error.errno,
                f"[admin] cannot listen on {self.address}:{self.port}: {error.strerror}",
            ) from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.hosts = allowed_hosts(self.address, self.port, self.names)
        self.follow()
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            handler_cancellation=True,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("admin console and /metrics on http://%s:%d/", self.address, self.port)

    async def stop(self) -> None:
        """Close the listener and stop following the feed."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- guards ------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.host.lower() not in self.hosts:
                # DNS rebinding: a page of another site whose name now points here carries
                # that name in Host; only the listener's own address and names are served.
                raise web.HTTPMisdirectedRequest(text="unknown Host\n")
            response = await handler(request)
        except web.HTTPException as error:
            error.headers.update(SECURITY_HEADERS)
            raise
        response.headers.update(SECURITY_HEADERS)
        return response

    def _session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE), now=self.now())

    def _require(self, request: web.Request, *, post: bool) -> Session:
        session = self._session(request)
        if session is None:
            raise _json_error(web.HTTPUnauthorized, "no session: log in again")
        if post and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
            raise _json_error(web.HTTPForbidden, "missing or wrong CSRF token")
        return session

    def _set_cookie(self, response: web.StreamResponse, token: str) -> None:
        # No Secure flag: the listener speaks plain HTTP (loopback or the LAN); a browser
        # would not send a Secure cookie back over it. Put TLS in front for anything else.
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")

    # -- pages -------------------------------------------------------------------------------

    async def _console(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(
            body=self.assets["console.html"], content_type="text/html", charset="utf-8"
        )
        if self._session(request) is None:
            if self.password is not None:
                raise web.HTTPSeeOther("/login")
            token, _ = self.sessions.create(now=self.now())
            self._set_cookie(response, token)
        return response

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        if self.password is None:
            raise web.HTTPSeeOther("/")
        return web.Response(
            body=self.assets["login.html"], content_type="text/html", charset="utf-8"
        )

    async def _login(self, request: web.Request) -> web.StreamResponse:
        if self.password is None:
            raise web.HTTPSeeOther("/")
        client = request.remote or "?"
        wait = self.limiter.retry_after(client, now=self.now())
        if wait > 0:
            raise web.HTTPTooManyRequests(
                text="too many failed logins; try again later\n",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        form = await request.post()
        password = form.get("password")
        if not isinstance(password, str) or len(password) > 1024:
            password = ""
        # scrypt takes ~50 ms: off the event loop, so the gateway keeps answering.
        if not await asyncio.to_thread(self.password.verify, password):
            self.limiter.failed(client, now=self.now())
            log.warning("admin console: failed login from %s", client)
            raise web.HTTPSeeOther("/login?failed=1")
        self.sessions.end(request.cookies.get(COOKIE))
        token, _ = self.sessions.create(now=self.now())
        response = web.HTTPSeeOther("/")
        self._set_cookie(response, token)
        log.info("admin console: login from %s", client)
        raise response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self._require(request, post=True)
        self.sessions.end(request.cookies.get(COOKIE))
        response = web.json_response({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        kind = ASSETS.get(name)
        if kind is None:
            raise web.HTTPNotFound(text="no such asset\n")
        return web.Response(body=self.assets[name], headers={"Content-Type": kind})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        # Counts only (no client addresses): open to scrapers, behind the Host check.
        return web.Response(body=self.metrics.scrape(), headers={"Content-Type": CONTENT_TYPE})

    # -- API ---------------------------------------------------------------------------------

    async def _state(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request, post=False)
        now = self.now()
        rows, total = self.log.mapping_rows(now=now)
        pinholes, pinhole_total = self.log.pinhole_rows(now=now)
        external = self.external()
        return web.json_response(
            {
                "csrf": session.csrf,
                "login": self.password is not None,
                "status": {
                    "external_address": str(external) if external else None,
                    "epoch": self.service.epoch(),
                    "uptime": int(time.time() - self.started),
                    "mappings": total,
                    "pinholes": pinhole_total if self.log.pinholes is not None else None,
                },
                "mappings": rows,
                "pinholes": pinholes,
                "refusals": self.log.refusal_rows(),
                "policy": policy_rows(self.policy()),
            }
        )

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        self._require(request, post=True)
        body = await _body(request)
        try:
            key = MappingKey(
                Protocol(str(body.get("protocol", "")).lower()),
                _port(body.get("external_port"), minimum=1),
                _optional_address(body.get("remote_host")),
                _optional_address(body.get("external_address")),
            )
        except ValueError as error:
            raise _json_error(web.HTTPBadRequest, str(error)) from None
        try:
            mapping = await self.service.delete(key)
        except BackendError as error:
            raise _json_error(web.HTTPServiceUnavailable, f"not deleted: {error}") from None
        if mapping is None:
            raise _json_error(web.HTTPNotFound, "no such mapping")
        log.info("admin console: deleted %s %d", key.protocol, key.external_port)
        return web.json_response({"deleted": 1})

    async def _flush(self, request: web.Request) -> web.StreamResponse:
        self._require(request, post=True)
        body = await _body(request)
        try:
            client = _optional_address(body.get("client"))
            raw = body.get("mechanism")
            mechanism = Mechanism(str(raw).lower()) if raw else None
        except ValueError as error:
            raise _json_error(web.HTTPBadRequest, str(error)) from None
        try:
            change = await self.service.flush(client=client, mechanism=mechanism)
        except BackendError as error:
            raise _json_error(web.HTTPServiceUnavailable, f"not flushed: {error}") from None
        log.info("admin console: flushed %d mappings", len(change.removed))
        return web.json_response({"deleted": len(change.removed)})

    async def _explain(self, request: web.Request) -> web.StreamResponse:
        self._require(request, post=True)
        body = await _body(request)
        try:
            client = _address(body.get("client"))
            external_port = _port(body.get("external_port") or 0, minimum=0)
            exact, renewal = bool(body.get("exact")), bool(body.get("renewal"))
            if (exact or renewal) and not external_port:
                raise ValueError("exact and renewal need an external port")
            lifetime = int(body.get("lifetime") or 7200)
            if lifetime < 1:
                raise ValueError("the lifetime must be at least 1 second")
            internal = body.get("internal_address")
            map_request = MapRequest(
                mechanism=Mechanism(str(body.get("via", "")).lower()),
                client=client,
                protocol=Protocol(str(body.get("protocol", "")).lower()),
                internal_address=_address(internal) if internal else client,
                internal_port=_port(body.get("internal_port"), minimum=1),
                external_port=external_port,
                lifetime=lifetime,
                description=str(body.get("description") or "")[:256],
                exact_port=exact,
            )
        except (ValueError, TypeError) as error:
            raise _json_error(web.HTTPBadRequest, str(error)) from None
        policy = self.policy()
        decision = decide(policy, map_request, renewal=renewal)
        return web.json_response(
            {
                "explanation": explanation(policy, map_request, decision),
                "text": render(policy, map_request, decision),
            }
        )


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise _json_error(web.HTTPUnsupportedMediaType, "send application/json")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise _json_error(web.HTTPBadRequest, "malformed JSON") from None
    if not isinstance(body, dict):
        raise _json_error(web.HTTPBadRequest, "want a JSON object")
    return body


def _json_error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": message}), content_type="application/json")


def _port(value: object, *, minimum: int) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 65535:
        raise ValueError(f"not a port number: {value!r}")
    return value


def _address(value: object) -> IPv4Address:
    try:
        return IPv4Address(str(value).strip())
    except ValueError:
        raise ValueError(f"not an IPv4 address: {value!r}") from None


def _optional_address(value: object) -> IPv4Address | None:
    return _address(value) if value else None


def listener_device(
    address: IPv4Address,
    internal: dict[str, frozenset[IPv4Address]],
    external: frozenset[IPv4Address],
) -> str:
    """The interface the admin listener binds to: loopback, or the internal interface holding
    its address; AdminListenError for the wildcard, a WAN address or any other."""
    check_listen(address, external)
    if address.is_loopback:
        return "lo"
    for name, addresses in internal.items():
        if address in addresses:
            return name
    raise AdminListenError(
        f"[admin] listen {address} is an address of neither loopback nor an internal interface"
        f" ({', '.join(internal)})"
    )


__all__ = [
    "AdminBindError",
    "AdminListenError",
    "AdminServer",
    "Metrics",
    "check_listen",
    "listener_device",
]
