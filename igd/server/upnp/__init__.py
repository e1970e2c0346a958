"""UPnP IGD v1/v2 on top of the gateway service: SSDP, descriptions, SOAP control, GENA.

`UpnpServer` wires the pieces: `ssdp.SsdpResponder` (discovery), `http.UpnpHttp`
(descriptions, control, subscriptions), `actions.Actions` (what each action does),
`events.Events` (subscribers) and `errors` (refusal reasons to UPnP codes per version).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import secrets
import uuid
import zlib
from collections.abc import Callable, Sequence

import igd
from igd.events import ExternalAddressChanged, MappingGranted, MappingRemoved, MappingRenewed
from igd.proto import description
from igd.proto.description import DeviceTree, Identity, ServiceKind, Urls
from igd.server.interfaces import ExternalAddress, InternalInterface, InternalInterface6
from igd.server.pinholes import PinholeService
from igd.server.pxp import RateLimiter
from igd.server.service import Service
from igd.server.store import LeaseStore
from igd.server.upnp.actions import Actions
from igd.server.upnp.events import Events
from igd.server.upnp.http import Documents, Route, UpnpHttp, wants_v1
from igd.server.upnp.pinholes import PinholeActions
from igd.server.upnp.ssdp import Offer, SsdpResponder
from igd.server.upnp.ssdp6 import Ssdp6Responder

log = logging.getLogger("igd.upnp")

UUID_KEY = "upnp_uuid"
URL_KEY = "upnp_url_token"
BOOT_KEY = "upnp_boot_id"
PRODUCT = f"igd-server/{igd.__version__}"
WAN_IP = ServiceKind.WAN_IP_CONNECTION
# Service events GENA may have waiting; past it the oldest are dropped, and subscribers are
# sent every variable those events could have changed.
FEED_BOUND = 256
MAPPING_VARIABLES = frozenset({"PortMappingNumberOfEntries", "SystemUpdateID"})


def versions_for(igd_version: int | None) -> tuple[int, ...]:
    """The IGD versions served for a configured `igd_version` (None is "auto")."""
    return (igd_version,) if igd_version else (1, 2)


class UpnpServer:
    """Everything UPnP for one gateway."""

    def __init__(
        self,
        service: Service,
        external: ExternalAddress,
        interfaces: Sequence[InternalInterface],
        *,
        external_interface: str,
        http_port: int,
        igd_version: int | None,
        store: LeaseStore,
        bind_device: bool = True,
        identity: Identity | None = None,
        pinholes: PinholeService | None = None,
        lan6: Sequence[InternalInterface6] = (),
        limiter: RateLimiter | None = None,
    ) -> None:
        self.service = service
        self.interfaces = interfaces
        self.lan6 = lan6
        self.bind_device = bind_device
        self.server = f"Linux/{platform.release()} UPnP/1.1 {PRODUCT}"
        root_uuid = _meta(store, UUID_KEY, lambda: str(uuid.uuid4()))
        # An unguessable path prefix, kept across restarts so cached URLs keep working: a web
        # page cannot aim a request at a control URL it cannot know (Filet-o-Firewall).
        token = _meta(store, URL_KEY, lambda: secrets.token_hex(8))
        boot_id = (int(store.get_meta(BOOT_KEY) or 0) + 1) & 0x7FFFFFFF
        store.set_meta(BOOT_KEY, str(boot_id))
        versions = versions_for(igd_version)
        # WANIPv6FirewallControl:1 joins the trees when `[ipv6]` pinholes are on.
        self.trees = {
            v: DeviceTree.build(root_uuid, v, pinholes=pinholes is not None) for v in versions
        }
        self.urls = {v: Urls(f"/{token}/igd{v}") for v in versions}
        identity = identity or Identity()
        descriptions, scpds, routes, offers = {}, {}, {}, {}
        for version, tree in self.trees.items():
            urls = self.urls[version]
            for kind in tree.services:
                scpds[(version, kind)] = description.scpd(
                    kind, description.service_version(kind, version)
                )
                routes[urls.scpd(kind)] = Route(tree, urls, "scpd", kind)
                routes[urls.control(kind)] = Route(tree, urls, "control", kind)
                routes[urls.event(kind)] = Route(tree, urls, "event", kind)
            # UDA 1.1 §1.2.2: CONFIGID changes whenever the descriptions change.
            config_id = zlib.crc32(b"".join(scpds[(version, k)] for k in tree.services)) & 0xFFFFFF
            descriptions[version] = description.root_description(tree, urls, identity, config_id)
            routes[urls.description] = Route(tree, urls, "description")
            offers[version] = Offer(tree, urls.description, config_id)
        primary = max(versions)
        auto = igd_version is None
        self.actions = Actions(
            service,
            external,
            external_interface,
            pinholes=PinholeActions(pinholes) if pinholes is not None else None,
        )
        self.events = Events(self._value, self.actions.evented, server=self.server)
        self.http = UpnpHttp(
            self.actions,
            self.events,
            routes,
            Documents(descriptions, scpds),
            port=http_port,
            server=self.server,
            auto_v1=auto,
            limiter=limiter,
        )
        self.ssdp = SsdpResponder(
            interfaces,
            offers,
            primary=primary,
            auto_v1=auto,
            wants_v1=wants_v1,
            http_port=http_port,
            server=self.server,
            boot_id=boot_id,
        )
        # SSDP over IPv6 on the LAN's IPv6 addresses (none yet is fine: a prefix may come).
        self.ssdp6 = (
            Ssdp6Responder(
                lan6,
                offers,
                primary=primary,
                auto_v1=auto,
                wants_v1=wants_v1,
                http_port=http_port,
                server=self.server,
                boot_id=boot_id,
            )
            if pinholes is not None or lan6
            else None
        )
        self.feed = service.subscribe(
            "upnp gena",
            FEED_BOUND,
            (MappingGranted, MappingRenewed, MappingRemoved, ExternalAddressChanged),
        )

    async def start(self) -> None:
        """Open the HTTP and SSDP sockets."""
        await self.http.start(self.interfaces, bind_device=self.bind_device, lan6=self.lan6)
        await self.ssdp.start(bind_device=self.bind_device)
        if self.ssdp6 is not None:
            await self.ssdp6.start(bind_device=self.bind_device)
        log.info(
            "UPnP IGD serving version %s at %s",
            "/".join(str(v) for v in self.trees),
            ", ".join(self.urls[v].description for v in self.trees),
        )

    async def run(self) -> None:
        """Periodic SSDP announcements and GENA events (the rest is driven by requests)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.ssdp.run())
            if self.ssdp6 is not None:
                group.create_task(self.ssdp6.run())
            group.create_task(self.follow())

    async def follow(self) -> None:
        """Turn the service's events into GENA notifications of the variables they change."""
        while True:
            events, lost = await self.feed.next()
            names = set(MAPPING_VARIABLES) if lost else set()
            if lost:
                self.address_changed()
            for event in events:
                if isinstance(event, MappingGranted | MappingRenewed | MappingRemoved):
                    names |= MAPPING_VARIABLES
                elif isinstance(event, ExternalAddressChanged):
                    self.address_changed()
            if names:
                self.events.changed(WAN_IP, names)

    async def readdress6(self, lan6: Sequence[InternalInterface6]) -> bool:
        """The LAN's IPv6 addresses changed (renumbering): HTTP listens on the new ones and
        SSDP over IPv6 advertises them; False if HTTP could not listen on one yet."""
        self.lan6 = lan6
        bound = await self.http.rebind6(lan6)
        if bound and self.ssdp6 is not None:
            # Advertised once HTTP listens there: a LOCATION must answer when fetched.
            await self.ssdp6.readdress(lan6)
        return bound

    async def stop(self) -> None:
        """Byebye, then close every socket and subscription."""
        self.feed.close()
        self.ssdp.close()
        if self.ssdp6 is not None:
            self.ssdp6.close()
        await self.events.close()
        await self.http.close()

    def address_changed(self) -> None:
        """The external address changed (or appeared, or went away): tell subscribers."""
        self.events.changed(WAN_IP, {"ExternalIPAddress", "ConnectionStatus"})

    def _value(self, tree: DeviceTree, name: str) -> str | None:
        return self.actions.value(tree, name)


def _meta(store: LeaseStore, key: str, make: Callable[[], str]) -> str:
    value = store.get_meta(key)
    if value is None:
        value = make()
        store.set_meta(key, value)
    return value


__all__ = ["UpnpServer", "Urls", "versions_for"]
