"""Double NAT: every mapping the gateway grants is mirrored onto the upstream gateway, through
the client library (igd.client), so clients are told the endpoint the Internet reaches.

The upstream mapping forwards the upstream's public port to this gateway's external address
and the local mapping's external port; the local DNAT then carries the traffic on to the LAN
host. The upstream may grant another public port than the local one: nothing is re-keyed, the
data path is upstream public port -> local external port -> LAN host, and clients are told the
public port (docs/upstream.md). One upstream mapping serves every local mapping holding the
same protocol and external port (remote-host mappings share it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

from igd.client import Mapping as UpstreamMapping
from igd.client import (
    MappingEvent,
    NotAuthorized,
    OutOfResources,
    PortMapper,
    PortMappingError,
    PortUnavailable,
)
from igd.client.discovery import default_gateway
from igd.client.errors import MappingRefused
from igd.client.mapping import EventKind
from igd.client.selection import Verdict
from igd.decision import Reason
from igd.events import Event, MappingGranted, MappingRemoved, MappingRenewed
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Protocol
from igd.server.config import UpstreamSettings
from igd.server.feed import Subscriber
from igd.server.interfaces import ExternalAddress, is_public
from igd.server.store import STATE_FILE_MODE, secure_state_directory

log = logging.getLogger("igd.upstream")

MODES = ("off", "auto", "pcp", "natpmp", "upnp")
# While the upstream has not answered, a client is told the local mapping with at most this
# lifetime, so its renewal (which then finds the upstream mapping) comes soon.
PENDING_LIFETIME = 30
FEED_BOUND = 4096
# The secret the mirror's PCP nonces derive from, in the state directory: a gateway restarted
# after kill -9 asks with the nonces of its previous run, so the upstream renews the mappings
# that run left instead of refusing another nonce for them (RFC 6887 §11.1, §11.3).
NONCE_KEY_FILE = "upstream-nonce.key"
NONCE_KEY_SIZE = 32


@dataclass(frozen=True, slots=True)
class Public:
    """What to tell a client: the public endpoint (address None: the local one, pending)."""

    address: IPv4Address | None
    port: int
    lifetime: int


@dataclass(frozen=True, slots=True)
class UpstreamRefusal:
    """The upstream refused the mirror: the client is refused for this neutral reason."""

    reason: Reason
    detail: str


def reason_for(error: PortMappingError) -> Reason | None:
    """The neutral reason a refusal from the upstream becomes downstream; None: not a refusal
    (timeouts, no gateway: the local mapping stands, reported as pending)."""
    if isinstance(error, NotAuthorized):
        return Reason.POLICY_DENIED
    if isinstance(error, PortUnavailable):
        return Reason.PORT_IN_USE
    if isinstance(error, OutOfResources):
        return Reason.GATEWAY_QUOTA
    if isinstance(error, MappingRefused):
        return Reason.BACKEND_FAILURE
    return None


def nonce_key(directory: Path | None) -> bytes:
    """The nonce secret kept in `directory` (made on first use, mode 0600); a fresh one that
    lives only as long as the process without a directory."""
    if directory is None:
        return secrets.token_bytes(NONCE_KEY_SIZE)
    # As the lease store's files: a regular file of ours, 0600, or the daemon refuses to start.
    secure_state_directory(directory, [NONCE_KEY_FILE])
    path = directory / NONCE_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, STATE_FILE_MODE)
    except FileExistsError:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as held:
            key = held.read(NONCE_KEY_SIZE + 1)
        if len(key) == NONCE_KEY_SIZE:
            return key
        # Cut short (a crash while it was written): a new secret, and the upstream mappings
        # of the previous run are left to expire.
        log.warning("upstream: %s is damaged; making a new nonce secret", path)
        path.unlink()
        return nonce_key(directory)
    key = secrets.token_bytes(NONCE_KEY_SIZE)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    return key


def mirror_nonce(key: bytes, protocol: Protocol, port: int) -> bytes:
    """The PCP nonce of the upstream mapping for one local port: unguessable without the key
    (RFC 6887 §11.1), the same in every run that holds it."""
    digest = hmac.new(key, f"{protocol.value}/{port}".encode(), hashlib.sha256).digest()
    return digest[:12]


class ServiceView(TypingProtocol):
    """What the mirror needs of the service: its mappings, its feed, its addresses."""

    def mappings(self) -> Iterator[Mapping]: ...

    def is_local(self, address: IPv4Address) -> bool:
        """One of the gateway's addresses or a host of its internal networks."""

    def is_own(self, address: IPv4Address) -> bool:
        """One of the gateway's own addresses."""

    def subscribe(
        self, name: str, bound: int = ..., kinds: tuple[type[Event], ...] | None = ...
    ) -> Subscriber: ...

    def address_changed(self, previous: IPv4Address | None, current: IPv4Address | None) -> None:
        """A new epoch, announced."""


class _Mirror:
    """One upstream mapping and the local mappings it serves."""

    __slots__ = ("asking", "error", "holders", "mapping", "port", "protocol", "task")

    def __init__(self, protocol: Protocol, port: int) -> None:
        self.protocol = protocol
        self.port = port
        self.holders: set[MappingKey] = set()
        self.mapping: UpstreamMapping | None = None
        self.error: PortMappingError | None = None
        self.task: asyncio.Task[None] | None = None
        self.asking: asyncio.Event | None = None
        """Set when the request in flight ends; None while none is (an Event is ~700 B, and
        thousands of mirrors wait for nothing most of their life)."""

    def finished(self) -> None:
        """The request in flight ended: wake whoever waits for it."""
        asking, self.asking = self.asking, None
        if asking is not None:
            asking.set()


class Upstream:
    """Mirrors the service's mappings onto the upstream gateway and answers what is public."""

    def __init__(
        self,
        settings: UpstreamSettings,
        external: ExternalAddress,
        mapper_factory: Callable[[], PortMapper] | None = None,
        state_directory: Path | None = None,
    ) -> None:
        self.settings = settings
        self.external = external
        self._factory = mapper_factory or self._default_mapper
        self._nonce_key = nonce_key(state_directory)
        self.local_address: IPv4Address | None = None
        """This gateway's address toward the upstream (where mirror requests come from)."""
        self.mapper: PortMapper | None = None
        self.address: IPv4Address | None = None
        """The upstream gateway's address (configured, or the default route's)."""
        self.active = False
        self.verdict = "not-checked"
        self.reachable = True
        self.last_error = ""
        self._mirrors: dict[tuple[Protocol, int], _Mirror] = {}
        self._releases: set[asyncio.Task[None]] = set()
        self._full = False  # max_mappings reached (logged once)
        self._ready = asyncio.Event()
        self._service: ServiceView | None = None

    def _default_mapper(self) -> PortMapper:
        prefer = (Mechanism.PCP, Mechanism.NATPMP, Mechanism.UPNP)
        # One upstream mapping per mirrored port, each with its renewal timer (a sleeping
        # task): about 5 kB each in all (docs/performance.md), bounded by max_mappings.
        return PortMapper(self.address, prefer=prefer, max_mappings=self.settings.max_mappings)

    # -- start and the feed ------------------------------------------------------------------

    async def start(self) -> None:
        """Decide whether to mirror (`auto`: only behind a private, shared or reserved
        external address) and probe the upstream once."""
        mode = self.settings.mode
        if mode == "off":
            self.verdict = "off"
            self._ready.set()
            return
        local = self.external.current
        if mode == "auto" and local is not None and is_public(local):
            self.verdict = "public"
            log.info("upstream: external address %s is public; nothing to mirror", local)
            self._ready.set()
            return
        self.active = True
        try:
            # The configured upstream, else the default route's (read here: the route may
            # appear after the daemon).
            self.address = self.settings.address or default_gateway()
            if self._is_ours(self.address):
                self._ready.set()
                self.stop_loop(f"the upstream gateway {self.address} is this gateway or its LAN")
                return
            self.mapper = self._factory()
            probe = await self.mapper.probe()
            self.local_address = await self.mapper.local_address()
        except (PortMappingError, OSError) as error:
            self.verdict = "no-gateway"
            self._fail(f"cannot probe the upstream gateway: {error}")
        else:
            self.verdict = str(probe.choice.verdict)
            public = probe.choice.external_address
            log.info(
                "upstream: gateway %s, %s, external address %s, verdict %s",
                self.address, probe.choice.mechanism, public, probe.choice.verdict,
            )  # fmt: skip
            if public is not None and self._is_ours(public):
                self._ready.set()
                self.stop_loop(f"the upstream gateway {self.address} says its external "
                               f"address is {public}, one of ours")  # fmt: skip
                return
            if public is not None:
                self.external.public = public
        self._ready.set()

    async def run(self, service: ServiceView) -> None:
        """Probe, mirror what the service holds (a restart), then follow its feed and check
        the upstream every `check_interval` seconds."""
        feed = service.subscribe(
            "upstream mirror", FEED_BOUND, (MappingGranted, MappingRenewed, MappingRemoved)
        )
        self._service = service
        await self.start()
        for mapping in list(service.mappings()):
            self.ensure(mapping)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_feed(service, feed))
            if self.active:
                group.create_task(self._check())

    async def _follow_feed(self, service: ServiceView, feed: Subscriber) -> None:
        while True:
            events, lost = await feed.next()
            if lost:
                # Fell behind: the service's table is the truth.
                self._resync(list(service.mappings()))
            for event in events:
                if isinstance(event, MappingGranted | MappingRenewed | MappingRemoved):
                    self.follow(event)

    async def _check(self) -> None:
        """Probe the upstream now and then: an upstream that went away is reported, one that
        restarted is found by the epoch test (the mapper re-creates the mappings)."""
        while self.active:
            await asyncio.sleep(self.settings.check_interval)
            if self.mapper is None:
                continue
            try:
                probe = await self.mapper.probe(refresh=True)
            except (PortMappingError, OSError) as error:
                answered, detail = False, str(error)
            else:
                answered = probe.choice.verdict is not Verdict.NO_GATEWAY
                detail = "no PCP, NAT-PMP or UPnP answer"
                public = probe.choice.external_address
                if answered and public is not None:
                    if self._is_ours(public):
                        self.stop_loop(f"the upstream gateway {self.address} now says its "
                                       f"external address is {public}, one of ours")  # fmt: skip
                        return
                    self.external.public = public
            if not answered and self.reachable:
                self._fail(f"upstream gateway {self.address} does not answer: {detail}")
            elif answered and not self.reachable:
                self.reachable = True
                log.warning("upstream gateway %s answers again", self.address)

    def _resync(self, held: list[Mapping]) -> None:
        slots = {(m.protocol, m.external_port) for m in held}
        for slot, mirror in list(self._mirrors.items()):
            if slot not in slots:
                for key in list(mirror.holders):
                    self._drop_key(slot, key)
        for mapping in held:
            self.ensure(mapping)

    def follow(self, event: MappingGranted | MappingRenewed | MappingRemoved) -> None:
        """Keep the mirrors in step with one event from the service's feed."""
        if not self.active:
            return
        if isinstance(event, MappingRemoved):
            self.drop(event.mapping)
            return
        if isinstance(event, MappingRenewed) and event.previous.key != event.mapping.key:
            self.drop(event.previous)  # renewed onto another port: that mirror goes
        self.ensure(event.mapping)

    def ensure(self, mapping: Mapping) -> _Mirror | None:
        """The mirror serving this local mapping, started if it is not held upstream."""
        if not self.active or mapping.key.external_address is not None:
            # A further external address (network.external_addresses) is the router's own
            # public address: nothing upstream to mirror it on, and its port is not ours alone.
            return None
        slot = (mapping.protocol, mapping.external_port)
        mirror = self._mirrors.get(slot)
        if mirror is None:
            bound = self.settings.max_mappings
            if len(self._mirrors) >= bound:
                if not self._full:
                    # Once until there is room again: every renewal of an unmirrored mapping
                    # comes here, and the log is no place for thousands of the same line.
                    self._full = True
                    what = f"{mapping.protocol}/{mapping.external_port}"
                    self._fail(f"more than {bound} upstream mappings; not mirroring {what}"
                               " and later grants", unreachable=False)  # fmt: skip
                return None
            mirror = self._mirrors[slot] = _Mirror(*slot)
        mirror.holders.add(mapping.key)
        if mirror.mapping is None and (mirror.task is None or mirror.task.done()):
            mirror.asking = asyncio.Event()
            mirror.task = asyncio.get_running_loop().create_task(self._create(mirror))
        return mirror

    def drop(self, mapping: Mapping) -> None:
        """A local mapping went away: release the upstream mapping once nothing holds it."""
        self._drop_key((mapping.protocol, mapping.external_port), mapping.key)

    def _drop_key(self, slot: tuple[Protocol, int], key: MappingKey) -> None:
        mirror = self._mirrors.get(slot)
        if mirror is None:
            return
        mirror.holders.discard(key)
        if mirror.holders:
            return
        del self._mirrors[slot]
        self._full = False
        if mirror.task is not None and not mirror.task.done():
            mirror.task.cancel()
        if mirror.mapping is not None:
            held, mirror.mapping = mirror.mapping, None
            task = asyncio.get_running_loop().create_task(self._release(held))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _create(self, mirror: _Mirror) -> None:
        await self._ready.wait()
        if self.mapper is None:
            # No upstream found at start (no route yet): look again for this request.
            try:
                self.address = self.settings.address or default_gateway()
            except PortMappingError as error:
                mirror.error = error
                self._fail(f"no upstream gateway: {error}")
                mirror.finished()
                return
            self.mapper = self._factory()
        via = self.settings.mode if self.settings.mode in ("pcp", "natpmp", "upnp") else None
        try:
            held = await self.mapper.map(
                mirror.port, mirror.protocol, external_port=mirror.port,
                lifetime=self.settings.lifetime, via=via, description="igd double NAT",
                nonce=mirror_nonce(self._nonce_key, mirror.protocol, mirror.port),
            )  # fmt: skip
        except ValueError as error:
            # What the client refuses to ask for (its own bounds): logged, stays local.
            self._fail(f"cannot mirror {mirror.protocol}/{mirror.port}: {error}", unreachable=False)
        except PortMappingError as error:
            mirror.error = error
            slot = f"{mirror.protocol}/{mirror.port}"
            refused = reason_for(error) is not None
            what = "refused" if refused else "did not answer"
            self._fail(f"upstream {what} {slot}: {error}", unreachable=not refused)
        else:
            mirror.error = None
            self.reachable = True
            current = self._mirrors.get((mirror.protocol, mirror.port))
            if not mirror.holders or current is not mirror:
                await self._release(held)  # the local mapping went while we asked
                return
            if self._is_ours(held.external_address):
                self.stop_loop(f"the upstream mapped {mirror.protocol}/{mirror.port} on "
                               f"{held.external_address}, one of our addresses")  # fmt: skip
                return
            mirror.mapping = held
            self.external.public = held.external_address
            held.subscribe(lambda event: self._heard(mirror, event))
            log.info(
                "upstream: %s/%d mirrored as %s:%d over %s (lease %d s)",
                mirror.protocol, mirror.port, held.external_address, held.external_port,
                held.mechanism, held.lifetime,
            )  # fmt: skip
        finally:
            mirror.finished()
            if mirror.task is asyncio.current_task():
                mirror.task = None  # a finished task keeps its frame: ~1 kB per mirror

    async def _release(self, held: UpstreamMapping) -> None:
        try:
            await held.release()  # bounded; a refusal or silence is logged by the client
        except OSError as error:
            log.warning("upstream: could not release %s/%d: %s", held.protocol,
                        held.internal_port, error)  # fmt: skip
            return
        log.info("upstream: released %s/%d", held.protocol, held.internal_port)

    def _heard(self, mirror: _Mirror, event: MappingEvent) -> None:
        if event.kind in (EventKind.FAILED, EventKind.LOST):
            refused = event.error is not None and reason_for(event.error) is not None
            self._fail(
                f"upstream mapping {mirror.protocol}/{mirror.port} {event.kind}: {event.error}",
                unreachable=not refused,
            )
        elif event.kind is EventKind.CHANGED:
            # The upstream re-made it elsewhere (its restart, its new address): what clients
            # were told is wrong now. A new epoch, announced (RFC 6886 §3.2.1, RFC 6887
            # §14.1.3), makes them map again and learn the new endpoint, as a PCP proxy
            # (RFC 7648) passes the server's state loss on to its clients.
            self.reachable = True
            previous = self.external.reported
            self.external.public = event.external_address
            log.warning(
                "upstream mapping %s/%d changed: now %s:%d; new epoch",
                mirror.protocol, mirror.port, event.external_address, event.external_port,
            )  # fmt: skip
            if self._service is not None:
                self._service.address_changed(previous, self.external.reported)
        elif event.kind in (EventKind.RENEWED, EventKind.RECREATED):
            self.reachable = True
            if event.kind is EventKind.RECREATED:
                log.warning(
                    "upstream mapping %s/%d re-created (the upstream lost it)",
                    mirror.protocol, mirror.port,
                )  # fmt: skip

    # -- loops ---------------------------------------------------------------------------------

    def _is_ours(self, address: IPv4Address) -> bool:
        if address == self.external.current:
            return True
        return self._service is not None and self._service.is_local(address)

    def loops(self, request: MapRequest) -> str | None:
        """Why a mapping request closes a mirroring loop (our own mirror's request for a port
        we mirror, come back to us), after which mirroring is off; None: it does not."""
        if not self.active or (request.protocol, request.internal_port) not in self._mirrors:
            return None
        own = request.client == self.local_address or (
            self._service is not None and self._service.is_own(request.client)
        )
        if not own:
            return None
        detail = (
            f"a request to map {request.protocol}/{request.internal_port}, which we mirror, came"
            f" from our own address {request.client}: the upstream gateway is this gateway"
        )
        self.stop_loop(detail)
        return detail

    def stop_loop(self, detail: str) -> None:
        """Turn mirroring off for good (until a restart): every upstream request would come
        back to us, or go round the cascade, each time for another port."""
        if self.verdict == "loop":
            return
        self.active, self.verdict = False, "loop"
        self.last_error = f"mirroring loop, mirroring disabled: {detail}"
        log.error("upstream: mirroring loop: %s; mirroring disabled (check [upstream] gateway)",
                  detail)  # fmt: skip
        for mirror in self._mirrors.values():
            if mirror.task is not None and not mirror.task.done():
                mirror.task.cancel()
        self._mirrors.clear()
        mapper, self.mapper = self.mapper, None
        if mapper is not None:
            # Releases what it made: in a loop between two gateways, the other one's echo goes.
            task = asyncio.get_running_loop().create_task(mapper.close())
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)
        previous = self.external.reported
        self.external.public = None
        if self._service is not None and previous != self.external.reported:
            # Clients were told the loop's "public" address: a new epoch makes them ask again.
            self._service.address_changed(previous, self.external.reported)

    def _fail(self, message: str, *, unreachable: bool = True) -> None:
        if unreachable:
            self.reachable = False
        self.last_error = message
        log.warning("upstream: %s", message)

    # -- what replies say ----------------------------------------------------------------------

    async def public(self, mapping: Mapping, lifetime: int) -> Public | UpstreamRefusal | None:
        """What to tell the client about a mapping just granted with `lifetime`: the public
        endpoint (waiting at most `reply_wait` s for the upstream), a refusal, or None when
        no upstream is in use."""
        mirror = self.ensure(mapping)
        if mirror is None:
            return None
        asking = mirror.asking
        if asking is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.reply_wait):
                    await asking.wait()
        held = mirror.mapping
        if held is not None:
            return Public(held.external_address, held.external_port, _lesser(lifetime, held))
        if mirror.error is not None:
            reason = reason_for(mirror.error)
            if reason is not None:
                return UpstreamRefusal(reason, f"upstream gateway: {mirror.error}")
        # Still asking, or the upstream is silent: the local mapping, soon renewed.
        pending = min(lifetime, PENDING_LIFETIME) or PENDING_LIFETIME
        return Public(None, mapping.external_port, pending)

    def told(self, mapping: Mapping, lifetime: int) -> Public | None:
        """What a client is told about a mapping held upstream now (its Mapping Update, its
        renewal's port); None if it is not mirrored."""
        mirror = self._mirrors.get((mapping.protocol, mapping.external_port))
        if mirror is None or mirror.mapping is None or mapping.key.external_address is not None:
            return None
        held = mirror.mapping
        return Public(held.external_address, held.external_port, _lesser(lifetime, held))

    def endpoint(self, mapping: Mapping) -> str | None:
        """The public address:port a local mapping is reached at, if mirrored."""
        mirror = self._mirrors.get((mapping.protocol, mapping.external_port))
        if mirror is None or mirror.mapping is None or mapping.key.external_address is not None:
            return None
        return f"{mirror.mapping.external_address}:{mirror.mapping.external_port}"

    def counts(self) -> tuple[int, int]:
        """Mirrors held upstream and mirrors without an upstream mapping (status() numbers)."""
        mirrored = sum(1 for m in self._mirrors.values() if m.mapping is not None)
        return mirrored, len(self._mirrors) - mirrored

    def status(self) -> dict[str, Any]:
        """The chain, for the admin status command and the console."""
        held = [m for m in self._mirrors.values() if m.mapping is not None]
        failing = [m for m in self._mirrors.values() if m.mapping is None]
        return {
            "mode": self.settings.mode,
            "active": self.active,
            "upstream_gateway": str(self.address) if self.address else None,
            "local_external_address": str(self.external.current) if self.external.current else None,
            "public_address": str(self.external.public) if self.external.public else None,
            "mechanism": str(held[0].mapping.mechanism) if held and held[0].mapping else None,
            "verdict": self.verdict,
            "reachable": self.reachable,
            "mirrored": len(held),
            "failing": len(failing),
            "max_mappings": self.settings.max_mappings,
            "full": self._full,
            "last_error": self.last_error or None,
            "mirrors": [
                {
                    "protocol": str(m.protocol),
                    "local_port": m.port,
                    "public_port": m.mapping.external_port if m.mapping else None,
                    "error": str(m.error) if m.error and not m.mapping else None,
                }
                for m in self._mirrors.values()
            ],
        }

    async def close(self) -> None:
        """Stop renewing and release every upstream mapping (bounded per mapping)."""
        # Released even when the local mappings are kept (on_stop = "keep"): the next start
        # maps them again (with the same nonces, so a kill -9, which releases nothing, is
        # repaired the same way), and no stale upstream mapping outlives a stop.
        for mirror in self._mirrors.values():
            if mirror.task is not None:
                mirror.task.cancel()
        if self.mapper is not None:
            await self.mapper.close()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)


def _lesser(lifetime: int, held: UpstreamMapping) -> int:
    """The lesser of the local lease and what is left of the upstream one (a permanent
    upstream lease, 0, leaves the local one)."""
    expires = held.expires
    if expires is None or held.lifetime == 0:
        return lifetime
    left = int(expires - asyncio.get_running_loop().time())
    if lifetime == 0:
        return max(1, left)
    return max(1, min(lifetime, left))


__all__ = ["MODES", "Public", "Upstream", "UpstreamRefusal", "UpstreamSettings"]
