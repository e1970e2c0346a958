"""Noticing that the UPnP IGD restarted: its SSDP NOTIFY carries a BOOTID.UPNP.ORG, and a
new one means the device rebooted and may have lost every mapping and pinhole (UDA 1.1
§1.2.2); the renewal's entry check would find out only at the next renewal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from ipaddress import AddressValueError, IPv4Address
from urllib.parse import urlsplit

from igd.client.announce import SsdpNotify, SsdpNotifyListener
from igd.client.errors import PortMappingError
from igd.client.upnp import UpnpIgdClient

log = logging.getLogger("igd.client")

MAX_RECOVERIES = 4  # UPnP restart recoveries pending at once; more restarts are coalesced


class UpnpRestartWatch:
    """Listens for the IGD's NOTIFY once a UPnP mapping exists; on a new BOOTID, after
    `delay()` seconds, reads the description again if the device moved (`reconnect`), then
    calls `recover()`. `boot` is the last BOOTID heard (the search answer's at first)."""

    def __init__(
        self,
        *,
        client: Callable[[], UpnpIgdClient | None],
        reconnect: Callable[[str], Awaitable[None]],
        recover: Callable[[], None],
        delay: Callable[[], float],
    ) -> None:
        self.client, self.reconnect, self.recover, self.delay = client, reconnect, recover, delay
        self.boot: int | None = None
        self.seen_at = ""  # the LOCATION of the last ssdp:alive, if it moved
        self.listener: SsdpNotifyListener | None = None
        self._recoveries: set[asyncio.Task[None]] = set()

    async def start(self, local: IPv4Address) -> None:
        """Listen (once) for the NOTIFY of the IGD now in use, from `local`."""
        client = self.client()
        if self.listener is not None or client is None:
            return
        try:
            host = IPv4Address(urlsplit(client.location).hostname or "")
        except AddressValueError:
            return  # a host name in LOCATION: sources cannot be checked, so do not listen
        listener = SsdpNotifyListener(host, local, self.notified)
        if await listener.start():
            self.listener = listener

    def notified(self, notify: SsdpNotify) -> None:
        """One NOTIFY from the IGD's host."""
        client = self.client()
        if client is None or notify.usn.split("::", 1)[0] not in client.udns:
            return  # another device on the same host (a media server on the router)
        if notify.nts == "ssdp:alive" and notify.location != client.location:
            self.seen_at = notify.location
        previous, self.boot = self.boot, notify.boot_id
        if previous is None or previous == notify.boot_id:
            return
        # UDA 1.1 §1.2.2: a new BOOTID means the device restarted, and an IGD that restarts
        # may have lost its mappings; the entry check at renewal would find out too late.
        log.warning("UPnP BOOTID %d -> %d: the gateway restarted; re-creating mappings",
                    previous, notify.boot_id)  # fmt: skip
        if len(self._recoveries) < MAX_RECOVERIES:
            task = asyncio.get_running_loop().create_task(self._recover())
            self._recoveries.add(task)
            task.add_done_callback(self._recoveries.discard)

    async def _recover(self) -> None:
        # The same random wait as for PCP (RFC 6887 §14.1.3): every client on the LAN heard
        # the same NOTIFY. The alive that follows a byebye arrives meanwhile, with LOCATION.
        await asyncio.sleep(self.delay())
        moved, self.seen_at = self.seen_at, ""
        if moved:
            try:  # the control URL changed with the restart (miniupnpd picks a new port)
                await self.reconnect(moved)
            except PortMappingError as exc:
                log.warning("cannot read the restarted IGD at %s: %s", moved, exc)
        self.recover()

    def reset(self) -> None:
        """Forget the device (another gateway from now on)."""
        self.close()
        self.boot, self.seen_at = None, ""

    def close(self) -> None:
        """Stop listening and recovering."""
        for task in list(self._recoveries):
            task.cancel()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
