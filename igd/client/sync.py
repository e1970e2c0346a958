"""A synchronous wrapper for programs without asyncio: the mapper runs on its own event loop
in a background thread, which renews mappings while the program does other things. Every
method blocks until its asyncio twin is done and returns the same typed value."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from types import TracebackType
from typing import Any, Generic, TypeVar

from igd.client.errors import PortMappingError
from igd.client.mapper import PortMapper
from igd.client.mapping import (
    MAX_QUEUED_EVENTS,
    REQUEST_TIMEOUT,
    A,
    EventKind,
    Mapping,
    MappingEvent,
)
from igd.client.network import NETWORK_CHECK
from igd.client.pinholes import Ipv6Report
from igd.client.probe import ProbeResult
from igd.client.selection import DEFAULT_PREFERENCE
from igd.client.state import Record, StateFile
from igd.client.upnp import UpnpEntry
from igd.model import Mechanism, Protocol

T = TypeVar("T")


class SyncMapping(Generic[A]):
    """A `Mapping` seen from another thread; every read and action runs on the mapper's
    thread (whose event loop keeps the clock) and blocks until done.

    `with pm.map(8080, "tcp") as m:` releases the mapping when the block ends.
    """

    def __init__(self, owner: SyncPortMapper, mapping: Mapping[A]) -> None:
        self._owner = owner
        self.mapping: Mapping[A] = mapping
        """The asyncio mapping underneath (use it only on the mapper's thread)."""

    def __repr__(self) -> str:
        return repr(self.mapping)

    def __enter__(self) -> SyncMapping[A]:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @property
    def protocol(self) -> Protocol:
        return self.mapping.protocol

    @property
    def internal_port(self) -> int:
        return self.mapping.internal_port

    @property
    def internal_address(self) -> A:
        return self.mapping.internal_address

    @property
    def external_address(self) -> A:
        return self.mapping.external_address

    @property
    def family(self) -> int:
        """4 for a port mapping, 6 for an IPv6 pinhole."""
        return self.mapping.family

    @property
    def external_port(self) -> int:
        return self.mapping.external_port

    @property
    def mechanism(self) -> Mechanism:
        return self.mapping.mechanism

    @property
    def lifetime(self) -> int:
        """Seconds granted at the last renewal; 0 for a permanent UPnP lease."""
        return self.mapping.lifetime

    @property
    def expires(self) -> float | None:
        """When the lease ends on the mapper's monotonic clock; None if permanent."""
        return self._owner._run(_call(lambda: self.mapping.expires))

    @property
    def expires_at(self) -> datetime | None:
        """When the lease ends, wall clock (UTC); None if permanent."""
        return self._owner._run(_call(lambda: self.mapping.expires_at))

    @property
    def remaining(self) -> float | None:
        """Seconds until the lease ends; None if permanent."""
        return self._owner._run(_call(lambda: self.mapping.remaining))

    @property
    def released(self) -> bool:
        return self.mapping.released

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return self._owner._run(_call(self.mapping.to_dict))

    def subscribe(self, callback: Callable[[MappingEvent[A]], None]) -> Callable[[], None]:
        """`callback` runs on the mapper's thread; returns the function that unsubscribes."""
        return self._owner._run(_call(self.mapping.subscribe, callback))

    def events(self) -> Iterator[MappingEvent[A]]:
        """Every event from now on, until the mapping is released; blocks between events."""
        events: queue.Queue[MappingEvent[A]] = queue.Queue(MAX_QUEUED_EVENTS)

        def put(event: MappingEvent[A]) -> None:
            with contextlib.suppress(queue.Full):  # a consumer that stopped reading
                events.put_nowait(event)

        unsubscribe = self.subscribe(put)
        try:
            while True:
                event = events.get()
                yield event
                if event.kind is EventKind.RELEASED:
                    return
        finally:
            if self._owner._thread.is_alive():
                self._owner._run(_call(unsubscribe))

    def wait_for(self, *kinds: EventKind, within: float | None = None) -> MappingEvent[A]:
        """Block until the next event of one of `kinds` (any kind if none given)."""
        return self._owner._run(self.mapping.wait_for(*kinds, within=within))

    def renew(self, *, timeout: float | None = None) -> None:
        """Renew now, outside the schedule; blocks until the gateway answered."""
        self._owner._run(self.mapping.renew(timeout=timeout))

    def release(self) -> None:
        """Delete the mapping on the gateway and stop renewing it."""
        self._owner._run(self.mapping.release())

    def detach(self) -> None:
        """Stop renewing, leave the mapping on the gateway until its lease ends."""
        self._owner._run(self.mapping.detach())


@dataclass(frozen=True, slots=True)
class SyncExposed:
    """What `SyncPortMapper.expose()` got; a family that failed is None, its error in
    `errors`."""

    mapping: SyncMapping[IPv4Address] | None
    pinhole: SyncMapping[IPv6Address] | None
    errors: tuple[PortMappingError, ...] = ()

    def release(self) -> None:
        """Release both."""
        for held in (self.mapping, self.pinhole):
            if held is not None:
                held.release()


class SyncPortMapper:
    """`with SyncPortMapper() as pm: m = pm.map(8080, "tcp")`; the arguments of PortMapper."""

    def __init__(
        self,
        gateway: IPv4Address | str | None = None,
        *,
        prefer: Sequence[Mechanism | str] = DEFAULT_PREFERENCE,
        disable: Collection[Mechanism | str] = (),
        force: Mechanism | str | None = None,
        probe_timeout: float = 2.0,
        request_timeout: float = REQUEST_TIMEOUT,
        recovery_delay: float = 5.0,
        listen: bool = True,
        state: StateFile | str | os.PathLike[str] | None = None,
        pcp_addresses: Sequence[IPv4Address | str] = (),
        network_check: float | None = NETWORK_CHECK,
        gateway6: IPv6Address | str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="igd-client", daemon=True
        )
        self._thread.start()

        async def make() -> PortMapper:
            return PortMapper(
                gateway, prefer=prefer, disable=disable, force=force,
                probe_timeout=probe_timeout, request_timeout=request_timeout,
                recovery_delay=recovery_delay, listen=listen, state=state,
                pcp_addresses=pcp_addresses, network_check=network_check, gateway6=gateway6,
            )  # fmt: skip

        try:
            self._mapper = self._run(make())
        except BaseException:
            self._stop()
            raise

    def _run(self, work: Awaitable[T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("SyncPortMapper methods cannot run on its own thread")
        return asyncio.run_coroutine_threadsafe(_wait(work), self._loop).result()

    def __enter__(self) -> SyncPortMapper:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def mapper(self) -> PortMapper:
        """The asyncio mapper underneath (use it only on the mapper's thread)."""
        return self._mapper

    @property
    def gateway(self) -> IPv4Address:
        return self._run(_call(lambda: self._mapper.gateway))

    def probe(self, *, refresh: bool = False, timeout: float | None = None) -> ProbeResult:
        """Probe every enabled mechanism at once (cached unless `refresh`)."""
        return self._run(self._mapper.probe(refresh=refresh, timeout=timeout))

    def external_address(self, *, timeout: float | None = None) -> IPv4Address:
        """The external address of the chosen mechanism."""
        return self._run(self._mapper.external_address(timeout=timeout))

    def map(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        external_port: int | None = None,
        lifetime: int = 7200,
        description: str = "",
        via: Mechanism | str | None = None,
        exact: bool = False,
        timeout: float | None = None,
    ) -> SyncMapping[IPv4Address]:
        """Get a mapping and keep it alive on the background thread (see PortMapper.map)."""
        mapping = self._run(
            self._mapper.map(
                internal_port, protocol, external_port=external_port, lifetime=lifetime,
                description=description, via=via, exact=exact, timeout=timeout,
            )
        )  # fmt: skip
        return SyncMapping(self, mapping)

    def pinhole(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        lifetime: int = 7200,
        description: str = "",
        via: Mechanism | str | None = None,
        timeout: float | None = None,
        remote: IPv6Address | IPv6Network | str | None = None,
        remote_port: int = 0,
    ) -> SyncMapping[IPv6Address]:
        """Open an IPv6 pinhole and keep it open on the background thread (see
        PortMapper.pinhole); `family` is 6 and `external_address` this host's own."""
        pinhole = self._run(
            self._mapper.pinhole(
                internal_port, protocol, lifetime=lifetime, description=description, via=via,
                timeout=timeout, remote=remote, remote_port=remote_port,
            )
        )  # fmt: skip
        return SyncMapping(self, pinhole)

    def expose(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        lifetime: int = 7200,
        description: str = "",
        timeout: float | None = None,
    ) -> SyncExposed:
        """Both families at once (see PortMapper.expose): the IPv4 mapping and the IPv6
        pinhole, each None if its family failed (its error in `errors`)."""
        got = self._run(
            self._mapper.expose(
                internal_port, protocol, lifetime=lifetime, description=description,
                timeout=timeout,
            )
        )  # fmt: skip
        return SyncExposed(
            SyncMapping(self, got.mapping) if got.mapping is not None else None,
            SyncMapping(self, got.pinhole) if got.pinhole is not None else None,
            got.errors,
        )

    def probe_ipv6(self, *, refresh: bool = False, timeout: float | None = None) -> Ipv6Report:
        """What the IPv6 router offers for pinholes (see PortMapper.probe_ipv6)."""
        return self._run(self._mapper.probe_ipv6(refresh=refresh, timeout=timeout))

    def unmap(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        timeout: float | None = None,
        family: int = 4,
    ) -> bool:
        """Delete the mapping held or remembered for `internal_port` (see PortMapper.unmap);
        `family=6`: the pinhole."""
        return self._run(
            self._mapper.unmap(internal_port, protocol, timeout=timeout, family=family)
        )

    def stored(self) -> list[Record]:
        """This gateway's records in the state file."""
        return self._run(_call(self._mapper.stored))

    def close(self) -> None:
        """Release every mapping and stop the background thread."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self._mapper.close())
        finally:
            self._stop()

    def list(self, *, timeout: float | None = None) -> list[UpnpEntry]:
        """The router's UPnP mapping list (all hosts)."""
        return self._run(self._mapper.list(timeout=timeout))

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _wait(work: Awaitable[T]) -> T:
    return await work


async def _call(function: Callable[..., T], *args: Any) -> T:
    """Run a plain function on the mapper's thread (mappings are not thread-safe)."""
    return function(*args)
