"""`PortMapper`: one call gets a working mapping over PCP, NAT-PMP or UPnP, and a `Mapping`
that keeps working: renewed on its own timer, re-created when the gateway loses its state
(epoch rule, announcements on 224.0.0.1:5350, the UPnP entry gone), released on close."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import TracebackType
from typing import Any

from igd.client.announce import Announcement, AnnouncementListener
from igd.client.discovery import default_gateway, ssdp_search
from igd.client.errors import GatewayTimeout, MappingRefused, NoGatewayError, PortMappingError
from igd.client.mechanisms import (
    Driver,
    Grant,
    MapSpec,
    NatPmpDriver,
    PcpDriver,
    PxpDriver,
    UpnpDriver,
)
from igd.client.natpmp import NatPmpClient
from igd.client.pcp import PcpClient
from igd.client.probe import ProbeResult, probe, require_gateway
from igd.client.selection import DEFAULT_PREFERENCE
from igd.client.timing import EpochRule, EpochTracker, clamp_lifetime, renew_at
from igd.client.upnp import UpnpEntry, UpnpIgdClient
from igd.model import Mechanism, Protocol
from igd.proto.pcp import PcpResponse

log = logging.getLogger("igd.client")

_rng = random.SystemRandom()  # timer jitter; the OS source needs no seeding
MAX_MAPPINGS = 256  # per PortMapper: each holds a timer task
MAX_QUEUED_EVENTS = 64  # per subscriber; the oldest are dropped beyond it
RELEASE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0  # one create or renew, retransmissions included


class EventKind(enum.StrEnum):
    """What happened to a mapping."""

    CREATED = "created"
    RENEWED = "renewed"
    CHANGED = "changed"
    """The external address, port or mechanism is different now."""
    RECREATED = "recreated"
    """Re-made after the gateway lost it (restart, state loss, entry gone)."""
    FAILED = "failed"
    """A renewal failed; the keeper retries while the lease lasts."""
    LOST = "lost"
    """The lease ran out without a successful renewal; the keeper keeps trying."""
    RELEASED = "released"


@dataclass(frozen=True, slots=True)
class MappingEvent:
    """One change, with the mapping as it is after it."""

    kind: EventKind
    mechanism: Mechanism
    external_address: IPv4Address
    external_port: int
    lifetime: int
    error: PortMappingError | None = None


class Mapping:
    """A mapping the gateway granted, kept alive until `release()`."""

    def __init__(self, mapper: PortMapper, driver: Driver, spec: MapSpec, grant: Grant) -> None:
        self._mapper = mapper
        self._driver = driver
        self.spec = spec
        self.grant = grant
        self.granted_at = mapper.clock()
        self.released = False
        self._wake = asyncio.Event()
        self._recover_after: float | None = None
        self._subscribers: list[Callable[[MappingEvent], None]] = []
        self._task: asyncio.Task[None] | None = None

    # -- what the application reads --------------------------------------------------------

    @property
    def protocol(self) -> Protocol:
        return self.spec.protocol

    @property
    def internal_port(self) -> int:
        return self.spec.internal_port

    @property
    def internal_address(self) -> IPv4Address:
        return self.spec.internal_address

    @property
    def external_address(self) -> IPv4Address:
        return self.grant.external_address

    @property
    def external_port(self) -> int:
        return self.grant.external_port

    @property
    def mechanism(self) -> Mechanism:
        return self.grant.mechanism

    @property
    def lifetime(self) -> int:
        """Seconds granted at the last renewal; 0 for a permanent UPnP lease."""
        return self.grant.lifetime

    @property
    def expires(self) -> float | None:
        """When the lease ends (the mapper's clock, monotonic); None if permanent."""
        return self.granted_at + self.grant.lifetime if self.grant.lifetime else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "mechanism": self.mechanism.value,
            "protocol": self.protocol.value,
            "internal_address": str(self.internal_address),
            "internal_port": self.internal_port,
            "external_address": str(self.external_address),
            "external_port": self.external_port,
            "lifetime": self.lifetime,
            "description": self.spec.description,
            "nonce": self.grant.nonce.hex() if self.grant.nonce else None,
            "notes": list(self.grant.notes),
        }

    def __repr__(self) -> str:
        return (
            f"<Mapping {self.mechanism.value} {self.external_address}:{self.external_port}"
            f" -> {self.internal_address}:{self.internal_port}/{self.protocol.value}>"
        )

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[MappingEvent], None]) -> Callable[[], None]:
        """Call `callback` on every event; returns the function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def events(self) -> AsyncIterator[MappingEvent]:
        """Every event from now on, until the mapping is released."""
        queue: asyncio.Queue[MappingEvent] = asyncio.Queue(MAX_QUEUED_EVENTS)

        def put(event: MappingEvent) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

        unsubscribe = self.subscribe(put)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.kind is EventKind.RELEASED:
                    return
        finally:
            unsubscribe()

    async def wait_for(self, *kinds: EventKind, within: float | None = None) -> MappingEvent:
        """The next event of one of `kinds` (any kind if none given)."""
        async with asyncio.timeout(within):
            async for event in self.events():
                if not kinds or event.kind in kinds:
                    return event
        raise NoGatewayError("the mapping was released")

    def _emit(self, kind: EventKind, error: PortMappingError | None = None) -> None:
        g = self.grant
        event = MappingEvent(
            kind, g.mechanism, g.external_address, g.external_port, g.lifetime, error
        )
        log.info("mapping %s: %s%s", self, kind.value, f" ({error})" if error else "")
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("a mapping event subscriber failed")

    # -- lifecycle -------------------------------------------------------------------------

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep(), name=repr(self))

    def recover(self, delay: float = 0.0) -> None:
        """Re-create the mapping `delay` seconds from now (the gateway lost its state)."""
        if not self.released:
            self._recover_after = delay
            self._wake.set()

    async def renew(self) -> None:
        """Renew now, outside the schedule."""
        await self._apply(await self._request(self.grant), EventKind.RENEWED)

    async def release(self) -> None:
        """Stop renewing and delete the mapping on the gateway (best effort, bounded)."""
        if self.released:
            return
        self.released = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await self._driver.delete(self.spec, self.grant)
        except (PortMappingError, TimeoutError) as exc:
            log.warning("could not delete %s on the gateway: %s", self, exc)
        self._mapper._forget(self)
        self._emit(EventKind.RELEASED)

    async def detach(self) -> None:
        """Stop renewing and forget the mapping, leaving it on the gateway until its lease
        ends (what `igd map` without --keep does)."""
        self.released = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._mapper._forget(self)

    async def _request(self, previous: Grant | None) -> Grant:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                grant = await self._driver.create(self.spec, previous)
        except TimeoutError:
            raise GatewayTimeout(f"no answer to the renewal of {self}") from None
        self._mapper._note_epoch(grant)
        return grant

    async def _apply(self, grant: Grant, kind: EventKind) -> None:
        before = (self.grant.mechanism, self.grant.external_address, self.grant.external_port)
        self.grant, self.granted_at = grant, self._mapper.clock()
        self._emit(kind)
        if before != (grant.mechanism, grant.external_address, grant.external_port):
            self._emit(EventKind.CHANGED)

    def _lease_for_schedule(self) -> int:
        # A permanent UPnP lease is still refreshed and checked on our own timer.
        return clamp_lifetime(self.grant.lifetime or self.spec.lifetime)

    async def _keep(self) -> None:
        attempt, lost = 0, False
        while not self.released:
            now = self._mapper.clock()
            when = renew_at(
                self.granted_at, self._lease_for_schedule(), attempt, now=now,
                jitter=_rng.random(),
            )  # fmt: skip
            if when is None:
                if not lost:
                    lost = True
                    self._emit(EventKind.LOST)
                when = now + min(2.0**attempt, 60.0)  # keep trying, backing off
            recovering = await self._sleep_until(when)
            try:
                if recovering:
                    await asyncio.sleep(self._recover_after or 0.0)
                    grant = await self._request(self.grant)
                    await self._apply(grant, EventKind.RECREATED)
                else:
                    alive = await self._driver.verify(self.spec, self.grant)
                    grant = await self._request(self.grant)
                    kind = EventKind.RENEWED if alive and not lost else EventKind.RECREATED
                    await self._apply(grant, kind)
                attempt, lost = 0, False
            except PortMappingError as exc:
                attempt += 1
                self._emit(EventKind.FAILED, exc)

    async def _sleep_until(self, when: float) -> bool:
        """Sleep until `when`; True if woken early to recover."""
        self._wake.clear()
        delay = max(0.0, when - self._mapper.clock())
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True


class PortMapper:
    """Finds the gateway, picks the mechanism, makes and keeps mappings.

    `async with PortMapper() as pm: m = await pm.map(8080, "tcp")`. Every mapping still
    held is released when the block ends.
    """

    def __init__(
        self,
        gateway: IPv4Address | str | None = None,
        *,
        prefer: Sequence[Mechanism | str] = DEFAULT_PREFERENCE,
        probe_timeout: float = 2.0,
        recovery_delay: float = 5.0,
        listen: bool = True,
    ) -> None:
        self._gateway = IPv4Address(gateway) if gateway else None
        self.prefer = tuple(Mechanism(m) for m in prefer)
        self.probe_timeout = probe_timeout
        self.recovery_delay = recovery_delay
        """RFC 6887 §14.1.3 and RFC 6886 §3.7: wait a random 0..this many seconds."""
        self.listen = listen
        self.clock: Callable[[], float] = lambda: asyncio.get_running_loop().time()
        self.mappings: list[Mapping] = []
        self.last_probe: ProbeResult | None = None
        self._natpmp: NatPmpClient | None = None
        self._pcp: PcpClient | None = None
        self._upnp: UpnpIgdClient | None = None
        self._listener: AnnouncementListener | None = None
        self._epochs = {
            Mechanism.PCP: EpochTracker(EpochRule.PCP),
            Mechanism.NATPMP: EpochTracker(EpochRule.NATPMP),
        }
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> PortMapper:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def gateway(self) -> IPv4Address:
        """The gateway in use (the default route's unless one was given)."""
        if self._gateway is None:
            self._gateway = default_gateway()
        return self._gateway

    async def _clients(self) -> tuple[NatPmpClient, PcpClient]:
        if self._natpmp is None or self._pcp is None:
            self._natpmp = NatPmpClient(self.gateway)
            self._pcp = PcpClient(self.gateway)
            self._pcp.on_unsolicited = self._pcp_unsolicited
            await self._pcp.open()
            await self._natpmp.open()
            if self.listen:
                listener = AnnouncementListener(
                    self.gateway, self._pcp.local_address, self._announced
                )
                if await listener.start():
                    self._listener = listener
        return self._natpmp, self._pcp

    async def probe(self, *, refresh: bool = False) -> ProbeResult:
        """Probe every preferred mechanism at once (cached unless `refresh`)."""
        async with self._lock:
            if self.last_probe is None or refresh:
                natpmp, pcp = await self._clients()
                result = await probe(
                    self.gateway, natpmp=natpmp, pcp=pcp, mechanisms=self.prefer,
                    budget=self.probe_timeout,
                )  # fmt: skip
                for report in result.reports:
                    if report.epoch is not None and report.mechanism in self._epochs:
                        self._epochs[report.mechanism].observe(report.epoch, now=self.clock())
                self._upnp = result.upnp or self._upnp
                self.last_probe = result
            return self.last_probe

    async def external_address(self) -> IPv4Address:
        """The external address of the chosen mechanism."""
        result = await self.probe()
        require_gateway(result)
        address = result.choice.external_address
        if address is None:
            raise NoGatewayError("the gateway did not say its external address")
        return address

    async def local_address(self) -> IPv4Address:
        """This host's address toward the gateway."""
        return (await self._clients())[1].local_address

    async def upnp(self) -> UpnpIgdClient:
        """The gateway's UPnP IGD client (found by SSDP once, then kept)."""
        if self._upnp is None:
            _, pcp = await self._clients()
            replies = await ssdp_search(
                self.gateway, local=pcp.local_address, budget=self.probe_timeout
            )
            if not replies:
                raise NoGatewayError(f"no UPnP IGD answered SSDP (gateway {self.gateway})")
            self._upnp = await UpnpIgdClient.connect(replies[0].location, server=replies[0].server)
        return self._upnp

    async def driver(self, mechanism: Mechanism, *, fallback: bool = True) -> Driver:
        """The driver for `mechanism`; PCP falls back to NAT-PMP per request if `fallback`."""
        natpmp, pcp = await self._clients()
        if mechanism is Mechanism.UPNP:
            return UpnpDriver(await self.upnp())
        if mechanism is Mechanism.NATPMP and not fallback:
            return NatPmpDriver(natpmp)
        if mechanism is Mechanism.PCP and not fallback:
            return PcpDriver(pcp)
        return PxpDriver(PcpDriver(pcp), NatPmpDriver(natpmp))

    async def map(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        external_port: int | None = None,
        lifetime: int = 7200,
        description: str = "",
        via: Mechanism | str | None = None,
        exact: bool = False,
    ) -> Mapping:
        """Get a mapping and keep it alive. `external_port` is a suggestion unless `exact`;
        `via` forces a mechanism (otherwise the probe's choice, then the others ranked)."""
        if len(self.mappings) >= MAX_MAPPINGS:
            raise ValueError(f"a PortMapper holds at most {MAX_MAPPINGS} mappings")
        if not 0 < internal_port < 65536 or lifetime <= 0:
            raise ValueError("internal_port must be 1..65535 and lifetime positive")
        if via is not None:
            order: list[Mechanism] = [Mechanism(via)]
            drivers = [await self.driver(order[0], fallback=False)]
        else:
            result = await self.probe()
            require_gateway(result)
            order = list(result.choice.ranked)
            if Mechanism.PCP in order and Mechanism.NATPMP in order:
                order.remove(Mechanism.NATPMP)  # the PCP driver falls back to it
            drivers = [await self.driver(m) for m in order]
        _, pcp = await self._clients()
        spec = MapSpec(
            Protocol(protocol), internal_port, pcp.local_address, lifetime,
            external_port, exact, description,
        )  # fmt: skip
        error: PortMappingError | None = None
        for driver in drivers:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    grant = await driver.create(spec, None)
            except TimeoutError:
                error = GatewayTimeout(f"no answer over {driver.name}")
                continue
            except MappingRefused as exc:
                if exc.advice.value in ("other-mechanism",):
                    error = exc
                    continue
                raise  # the gateway answered no: its policy holds whatever the mechanism
            except PortMappingError as exc:
                error = exc
                continue
            self._note_epoch(grant)
            mapping = Mapping(self, driver, spec, grant)
            self.mappings.append(mapping)
            mapping._start()
            mapping._emit(EventKind.CREATED)
            return mapping
        raise error or NoGatewayError("no mechanism available")

    async def list(self) -> list[UpnpEntry]:
        """The router's UPnP mapping list (all hosts)."""
        return await (await self.upnp()).list_mappings()

    def _forget(self, mapping: Mapping) -> None:
        with contextlib.suppress(ValueError):
            self.mappings.remove(mapping)

    def _note_epoch(self, grant: Grant) -> None:
        if grant.epoch is not None and grant.mechanism in self._epochs:
            self._epoch(grant.mechanism, grant.epoch)

    def _epoch(self, mechanism: Mechanism, epoch: int) -> None:
        tracker = self._epochs[mechanism]
        if tracker.server is None:
            # No baseline over this mechanism yet (a PCP mapping, then a NAT-PMP address
            # announcement): NAT-PMP and PCP on one port share the server's epoch in practice
            # (RFC 6887 appendix A), so start from the other mechanism's last observation.
            other = next(t for m, t in self._epochs.items() if m is not mechanism)
            tracker.server, tracker.client = other.server, other.client
        if tracker.observe(epoch, now=self.clock()):
            return
        log.warning("%s epoch %d: the gateway lost its state; re-creating mappings",
                    mechanism.value, epoch)  # fmt: skip
        for mapping in self.mappings:
            if mapping.mechanism in (Mechanism.PCP, Mechanism.NATPMP):
                mapping.recover(_rng.uniform(0, self.recovery_delay))

    def _announced(self, announcement: Announcement) -> None:
        log.debug("announcement from %s: %s", self.gateway, announcement)
        self._epoch(announcement.mechanism, announcement.epoch)

    def _pcp_unsolicited(self, response: PcpResponse) -> None:
        # RFC 6887 §14.2 Mapping Update or unicast ANNOUNCE: the epoch tells of a restart;
        # a new external address shows at the next renewal, which we bring forward.
        self._epoch(Mechanism.PCP, response.epoch)

    async def close(self) -> None:
        """Release every mapping, close the sockets."""
        await asyncio.gather(*(m.release() for m in list(self.mappings)), return_exceptions=True)
        for client in (self._natpmp, self._pcp):
            if client is not None:
                client.close()
        if self._listener is not None:
            self._listener.close()
        self._natpmp = self._pcp = None
        self._listener = None
