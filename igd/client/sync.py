"""A synchronous wrapper for programs without asyncio: the mapper runs on its own event loop
in a background thread, which renews mappings while the program does other things."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address
from types import TracebackType
from typing import Any, TypeVar

from igd.client.mapper import PortMapper
from igd.client.mapping import EventKind, Mapping, MappingEvent
from igd.client.probe import ProbeResult
from igd.model import Mechanism, Protocol

T = TypeVar("T")


class SyncMapping:
    """A `Mapping` seen from another thread; reads are safe, `release()` blocks."""

    def __init__(self, owner: SyncPortMapper, mapping: Mapping) -> None:
        self._owner = owner
        self.mapping = mapping

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mapping, name)

    def __repr__(self) -> str:
        return repr(self.mapping)

    def subscribe(self, callback: Callable[[MappingEvent], None]) -> Callable[[], None]:
        """`callback` runs on the mapper's thread."""
        return self.mapping.subscribe(callback)

    def wait_for(self, *kinds: EventKind, within: float | None = None) -> MappingEvent:
        """Block until the next event of one of `kinds`."""
        return self._owner._run(self.mapping.wait_for(*kinds, within=within))

    def release(self) -> None:
        """Delete the mapping on the gateway and stop renewing it."""
        self._owner._run(self.mapping.release())


class SyncPortMapper:
    """`with SyncPortMapper() as pm: m = pm.map(8080, "tcp")`; same arguments as PortMapper."""

    def __init__(self, gateway: IPv4Address | str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="igd-client", daemon=True
        )
        self._thread.start()
        self._mapper: PortMapper = self._run(_make(gateway, options))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncPortMapper:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def probe(self, *, refresh: bool = False) -> ProbeResult:
        return self._run(self._mapper.probe(refresh=refresh))

    def external_address(self) -> IPv4Address:
        return self._run(self._mapper.external_address())

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
    ) -> SyncMapping:
        mapping = self._run(
            self._mapper.map(
                internal_port, protocol, external_port=external_port, lifetime=lifetime,
                description=description, via=via, exact=exact,
            )
        )  # fmt: skip
        return SyncMapping(self, mapping)

    def close(self) -> None:
        """Release every mapping and stop the background thread."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self._mapper.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


async def _make(gateway: IPv4Address | str | None, options: dict[str, Any]) -> PortMapper:
    return PortMapper(gateway, **options)
