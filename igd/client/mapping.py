"""`Mapping`: one granted mapping and its keeper task: renewed on its own timer, re-created
when the mapper says the gateway lost its state, events to subscribers, released on demand.
Every change of a mapping's grant happens here; `PortMapper` (mapper.py) finds the gateway,
picks the driver and tells mappings when the gateway restarted."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, Generic, cast
from typing import Protocol as TypingProtocol

from igd.client.errors import GatewayTimeout, NoGatewayError, PortMappingError
from igd.client.mechanisms import Driver, Grant, MapSpec
from igd.client.timing import clamp_lifetime, renew_at
from igd.model import Mechanism, Protocol

log = logging.getLogger("igd.client")

_rng = random.SystemRandom()  # timer jitter; the OS source needs no seeding
MAX_QUEUED_EVENTS = 64  # per subscriber; the oldest are dropped beyond it
RELEASE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0  # one create or renew, retransmissions included
if TYPE_CHECKING:
    # PEP 696 (typing 3.13): a bare `Mapping` is a `Mapping[IPv4Address]` to the checker,
    # as it was before pinholes; at run time the default is not needed.
    from typing_extensions import TypeVar

    A = TypeVar("A", IPv4Address, IPv6Address, default=IPv4Address)
else:
    from typing import TypeVar

    A = TypeVar("A", IPv4Address, IPv6Address)


class MapperView(TypingProtocol):
    """What a mapping needs from the mapper that made it."""

    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    request_timeout: float

    def forget(self, mapping: Mapping[Any]) -> None:
        """Drop a released or detached mapping."""
        ...

    def note_epoch(self, grant: Grant) -> None:
        """Check the epoch of a fresh answer (a restart re-creates every mapping)."""
        ...


class Timer(TypingProtocol):
    """How the keeper waits; tests pass one driven by a fake clock."""

    async def wait(self, delay: float, wake: asyncio.Event | None = None) -> bool:
        """Sleep `delay` seconds; True if `wake` was set first."""
        ...


class LoopTimer:
    """Waits on the event loop's clock."""

    async def wait(self, delay: float, wake: asyncio.Event | None = None) -> bool:
        if wake is None:
            await asyncio.sleep(delay)
            return False
        try:
            async with asyncio.timeout(delay):
                await wake.wait()
        except TimeoutError:
            return False
        return True


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
class MappingEvent(Generic[A]):
    """One change, with the mapping as it is after it."""

    kind: EventKind
    mechanism: Mechanism
    external_address: A
    external_port: int
    lifetime: int
    error: PortMappingError | None = None


class Mapping(Generic[A]):
    """A mapping the gateway granted, kept alive until `release()`: `Mapping[IPv4Address]`
    from `map()`; a `Pinhole` (pinholes.py) is a `Mapping[IPv6Address]`."""

    def __init__(
        self,
        mapper: MapperView,
        driver: Driver,
        spec: MapSpec,
        grant: Grant,
        timer: Timer | None = None,
    ) -> None:
        self._mapper = mapper
        self._timer = timer or LoopTimer()
        self._driver = driver
        self.spec = spec
        self.grant = grant
        self.granted_at = mapper.clock()
        self.released = False
        self._wake = asyncio.Event()
        self._recover_after: float | None = None
        self._subscribers: list[Callable[[MappingEvent[A]], None]] = []
        self._task: asyncio.Task[None] | None = None

    # -- what the application reads --------------------------------------------------------

    @property
    def protocol(self) -> Protocol:
        return self.spec.protocol

    @property
    def internal_port(self) -> int:
        return self.spec.internal_port

    @property
    def internal_address(self) -> A:
        return cast(A, self.spec.internal_address)  # the mapper makes a pinhole a Pinhole

    @property
    def external_address(self) -> A:
        return cast(A, self.grant.external_address)

    @property
    def family(self) -> int:
        """4 for a port mapping, 6 for a pinhole."""
        return self.spec.internal_address.version

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

    @property
    def remaining(self) -> float | None:
        """Seconds until the lease ends (0 once it has); None if permanent."""
        expires = self.expires
        return None if expires is None else max(0.0, expires - self._mapper.clock())

    @property
    def expires_at(self) -> datetime | None:
        """When the lease ends, wall clock (UTC); None if permanent."""
        remaining = self.remaining
        if remaining is None:
            return None
        return datetime.fromtimestamp(self._mapper.wall_clock() + remaining, UTC)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        expires_at, remaining = self.expires_at, self.remaining
        return {
            "mechanism": self.mechanism.value,
            "protocol": self.protocol.value,
            "internal_address": str(self.internal_address),
            "internal_port": self.internal_port,
            "external_address": str(self.external_address),
            "external_port": self.external_port,
            "lifetime": self.lifetime,
            "expires_at": None if expires_at is None else expires_at.isoformat(timespec="seconds"),
            "remaining": None if remaining is None else round(remaining),
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

    def subscribe(self, callback: Callable[[MappingEvent[A]], None]) -> Callable[[], None]:
        """Call `callback` on every event; returns the function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def events(self) -> AsyncIterator[MappingEvent[A]]:
        """Every event from now on, until the mapping is released."""
        queue: asyncio.Queue[MappingEvent[A]] = asyncio.Queue(MAX_QUEUED_EVENTS)

        def put(event: MappingEvent[A]) -> None:
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

    async def wait_for(self, *kinds: EventKind, within: float | None = None) -> MappingEvent[A]:
        """The next event of one of `kinds` (any kind if none given)."""
        async with asyncio.timeout(within):
            async for event in self.events():
                if not kinds or event.kind in kinds:
                    return event
        raise NoGatewayError("the mapping was released")

    def _emit(self, kind: EventKind, error: PortMappingError | None = None) -> None:
        g = self.grant
        event: MappingEvent[A] = MappingEvent(
            kind, g.mechanism, self.external_address, g.external_port, g.lifetime, error
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

    def move(self, driver: Driver, internal_address: IPv4Address | IPv6Address) -> None:
        """Re-create the mapping over `driver` from `internal_address` (a new network)."""
        if self.released:
            return
        self._driver = driver
        self.spec = replace(self.spec, internal_address=internal_address)
        # RFC 7488 §4: another PCP server gets another nonce; the port is asked again. A
        # UPnP pinhole's UniqueID belonged to the old address: AddPinhole anew.
        self.grant = replace(self.grant, nonce=None, unique_id=None)
        self.recover(0.0)

    async def renew(self, *, timeout: float | None = None) -> None:
        """Renew now, outside the schedule (`timeout`: the mapper's request timeout)."""
        await self._apply(await self._request(self.grant, timeout), EventKind.RENEWED)

    async def release(self, *, timeout: float = RELEASE_TIMEOUT) -> None:
        """Stop renewing and delete the mapping on the gateway (best effort, bounded)."""
        if self.released:
            return
        await self._stop()
        try:
            async with asyncio.timeout(timeout):
                await self._driver.delete(self.spec, self.grant)
        except (PortMappingError, TimeoutError) as exc:
            log.warning("could not delete %s on the gateway: %s", self, exc)
        self._mapper.forget(self)
        self._emit(EventKind.RELEASED)

    async def detach(self) -> None:
        """Stop renewing and forget the mapping, leaving it on the gateway until its lease
        ends (what `igd map` without --keep does)."""
        await self._stop()
        self._mapper.forget(self)

    async def _stop(self) -> None:
        """Mark the mapping released and end its renewal task."""
        self.released = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _request(self, previous: Grant | None, timeout: float | None = None) -> Grant:
        try:
            async with asyncio.timeout(timeout or self._mapper.request_timeout):
                grant = await self._driver.create(self.spec, previous)
        except TimeoutError:
            raise GatewayTimeout(f"no answer to the renewal of {self}") from None
        self._mapper.note_epoch(grant)
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
                    await self._timer.wait(self._recover_after or 0.0)
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
        return await self._timer.wait(max(0.0, when - self._mapper.clock()), self._wake)
