"""Noticing a change of network while mappings are held: the first default route's gateway
and this host's source address toward the gateway, looked at every few seconds (polling the
routing table works everywhere, without netlink or privileges)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from igd.client.discovery import default_gateway, source_toward
from igd.client.errors import NoGatewayError, PortMappingError

log = logging.getLogger("igd.client")

NETWORK_CHECK = 5.0  # seconds between looks at the routing table while mappings are held


@dataclass(frozen=True, slots=True)
class NetworkView:
    """What the mappings depend on; a difference means they must be made again."""

    route: IPv4Address | None
    """The first default route's gateway (None when the user named the gateway, or none)."""
    source: IPv4Address | None
    """This host's address toward the gateway in use (None without a route)."""
    router6: IPv6Address | None = None
    """The IPv6 router pinholes are asked of (None: no pinholes held, or no IPv6 route)."""
    source6: IPv6Address | None = None
    """This host's global IPv6 address toward it: what pinholes open to."""


def look(named: IPv4Address | None) -> NetworkView:
    """The network now; with a `named` gateway only the source address toward it counts."""
    if named is not None:
        return NetworkView(None, source_toward(named))
    try:
        route: IPv4Address | None = default_gateway()
    except NoGatewayError:
        route = None
    return NetworkView(route, source_toward(route))


class NetworkWatch:
    """Calls `changed(before, now)` when `view()` differs from the last look, every `interval`
    seconds while `active()` holds; one task, kept here, ended by `close()`."""

    def __init__(
        self,
        view: Callable[[], NetworkView],
        changed: Callable[[NetworkView, NetworkView], Awaitable[None]],
        active: Callable[[], bool],
        interval: float = NETWORK_CHECK,
    ) -> None:
        self.view, self.changed, self.active, self.interval = view, changed, active, interval
        self.last: NetworkView | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching (no-op while already watching)."""
        if self._task is None or self._task.done():
            self.last = self.view()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.active():
            await asyncio.sleep(self.interval)
            now, before = self.view(), self.last
            if before is None or now == before:
                continue
            log.warning("the network changed (%s -> %s); making the mappings again",
                        self.last, now)  # fmt: skip
            self.last = now
            try:
                await self.changed(before, now)
            except PortMappingError as exc:
                # The new network's gateway may not be ready yet (its addresses, its UPnP
                # listeners): the next look sees the change again and retries.
                self.last = before
                log.warning("cannot map again after the network change: %s", exc)

    async def close(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
