"""The mapping keeper (igd/client/mapping.py) with time passed in: when it renews, how it
retries and re-creates, what it tells subscribers, and that release stops it. A fake clock
drives both the keeper's clock and its waits, so nothing sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from igd.client.errors import GatewayTimeout
from igd.client.mapping import EventKind, Mapping, MappingEvent
from igd.client.mechanisms import Grant, MapSpec
from igd.model import Mechanism, Protocol

HOST = IPv4Address("192.168.1.10")
EXTERNAL = IPv4Address("198.51.100.7")
SPEC = MapSpec(Protocol.TCP, 8080, HOST, lifetime=100)
GRANT = Grant(Mechanism.PCP, EXTERNAL, 8080, 100, epoch=1, nonce=b"n" * 12)


class FakeTime:
    """A clock and a timer: waits end when the test advances the clock past them."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def wait(self, delay: float, wake: asyncio.Event | None = None) -> bool:
        entry = (self.now + delay, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        waiter = asyncio.ensure_future(wake.wait() if wake else asyncio.Future())
        try:
            done, _ = await asyncio.wait({entry[1], waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if entry in self._sleepers:
                self._sleepers.remove(entry)
        return waiter in done

    async def advance(self, seconds: float) -> None:
        """Let time pass, waking each waiter at its deadline in order."""
        end = self.now + seconds
        await settle()
        while due := [e for e in self._sleepers if e[0] <= end]:
            entry = min(due, key=lambda e: e[0])
            self._sleepers.remove(entry)
            self.now = max(self.now, entry[0])
            entry[1].set_result(None)
            await settle()
        self.now = end


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class Gateway:
    """A driver whose answers the test scripts: a grant, or an error, per request."""

    name = "fake"

    def __init__(self) -> None:
        self.answers: list[Grant | Exception] = []
        self.requests: list[tuple[float, Grant | None]] = []
        self.deleted: list[Grant] = []
        self.holds = True
        self.time: FakeTime | None = None

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        assert self.time is not None
        self.requests.append((self.time.now, previous))
        answer = self.answers.pop(0) if self.answers else previous or GRANT
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        self.deleted.append(grant)

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        return self.holds


class Owner:
    def __init__(self, time: FakeTime) -> None:
        self.clock = time
        self.wall_clock = lambda: 1_800_000_000.0 + time.now
        self.request_timeout = 30.0
        self.forgotten: list[Mapping] = []
        self.epochs: list[int | None] = []

    def forget(self, mapping: Mapping) -> None:
        self.forgotten.append(mapping)

    def note_epoch(self, grant: Grant) -> None:
        self.epochs.append(grant.epoch)


class Rig:
    def __init__(self) -> None:
        self.time = FakeTime()
        self.gateway = Gateway()
        self.gateway.time = self.time
        self.owner = Owner(self.time)
        self.mapping = Mapping(self.owner, self.gateway, SPEC, GRANT, timer=self.time)
        self.events: list[MappingEvent] = []
        self.mapping.subscribe(self.events.append)

    def kinds(self) -> list[EventKind]:
        found = [e.kind for e in self.events]
        self.events.clear()
        return found

    def request_times(self) -> list[float]:
        return [when for when, _ in self.gateway.requests]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    made = Rig()
    made.mapping._start()
    yield made
    await made.mapping.detach()


async def test_renews_between_half_and_five_eighths_of_the_lease(rig: Rig) -> None:
    await rig.time.advance(49)
    assert rig.gateway.requests == []
    await rig.time.advance(14)  # RFC 6887 §11.2.1: first renewal in [1/2, 5/8] of 100 s
    [(when, previous)] = rig.gateway.requests
    assert 50 <= when <= 62.5 and previous == GRANT  # the same port and nonce asked again
    assert rig.kinds() == [EventKind.RENEWED]
    assert rig.mapping.granted_at == when and rig.owner.epochs == [1]
    await rig.time.advance(when + 62.5 - rig.time.now)
    assert len(rig.gateway.requests) == 2 and rig.request_times()[1] >= when + 50


async def test_failed_renewals_retry_then_the_lease_is_lost_and_then_recreated(rig: Rig) -> None:
    rig.gateway.answers = [GatewayTimeout("no answer")] * 6
    await rig.time.advance(99.9)
    times = rig.request_times()
    # RFC 6887 §11.2.1: after a failure at 3/4, 7/8, 15/16 ... of the lease, but never
    # sooner than 4 s (here lifetime/8) after the failure, while a retry still fits.
    assert 50 <= times[0] <= 62.5 and times[1:4] == [75.0, 87.5, 93.75]
    # Then the lease is lost, and the keeper keeps trying, backing off.
    assert rig.kinds() == [EventKind.FAILED] * len(times) + [EventKind.LOST]
    rig.gateway.answers = []  # the gateway answers again
    await rig.time.advance(70)
    assert EventKind.RECREATED in rig.kinds()
    assert rig.mapping.granted_at > 100


async def test_a_mapping_the_gateway_lost_is_recreated_at_renewal(rig: Rig) -> None:
    rig.gateway.holds = False  # e.g. UPnP's GetSpecificPortMappingEntry says it is gone
    await rig.time.advance(63)
    assert rig.kinds() == [EventKind.RECREATED]


async def test_recover_recreates_after_the_delay_and_reports_a_new_port(rig: Rig) -> None:
    moved = replace(GRANT, external_port=40000, epoch=0)
    rig.gateway.answers = [moved]
    await rig.time.advance(10)
    rig.mapping.recover(delay=5)  # the mapper saw the gateway restart
    await rig.time.advance(4)
    assert rig.gateway.requests == []
    await rig.time.advance(1)
    assert rig.request_times() == [15.0]
    assert rig.kinds() == [EventKind.RECREATED, EventKind.CHANGED]
    assert rig.mapping.external_port == 40000 and rig.mapping.granted_at == 15.0
    # The schedule restarts from the new grant.
    await rig.time.advance(49)
    assert len(rig.gateway.requests) == 1


async def test_release_deletes_and_stops_the_keeper() -> None:
    rig = Rig()
    rig.mapping._start()
    await rig.time.advance(10)
    await rig.mapping.release()
    assert rig.gateway.deleted == [GRANT] and rig.owner.forgotten == [rig.mapping]
    assert rig.kinds() == [EventKind.RELEASED]
    await rig.time.advance(500)
    assert rig.gateway.requests == []
    await rig.mapping.release()  # idempotent
    assert rig.gateway.deleted == [GRANT]
