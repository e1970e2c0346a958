"""UPnP IPv6 pinholes: the IGD:2 WANIPv6FirewallControl:1 service, found by SSDP on
ff02::c (and unicast to the router) and spoken to over IPv6, so that the gateway sees the
address the pinhole is for as the caller (spec §2.6.3.3: InternalClient should be the
caller's own address, and secure gateways refuse anything else with 606)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpError
from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.ssdp import SsdpProtocol, build_ssdp_search_packet

from igd.client.discovery import MAX_REPLIES, SETTLE, Router6, SsdpReply, _collect, _source
from igd.client.errors import GatewayTimeout, NoGatewayError, Unsupported
from igd.client.upnp import UpnpIgdClient
from igd.model import Mechanism, Protocol
from igd.proto.description import MAX_PINHOLE_LEASE
from igd.proto.ssdp import GROUP6, PORT

FIREWALL = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
_MARKERS = ("WANIPv6FirewallControl:", "InternetGatewayDevice:2", "WANConnectionDevice:2")


@dataclass(frozen=True, slots=True)
class FirewallStatus:
    """GetFirewallStatus: whether the firewall filters at all, and whether it takes pinholes."""

    enabled: bool
    inbound_allowed: bool


class UpnpFirewallClient(UpnpIgdClient):
    """One WANIPv6FirewallControl:1 service (the action and error plumbing of
    `UpnpIgdClient`, without its WAN*Connection choice)."""

    @classmethod
    async def connect(
        cls, location: str, *, http_timeout: float = 3.0, server: str = ""
    ) -> UpnpFirewallClient:
        """Read the description at `location`; Unsupported if it has no pinhole service."""
        factory = UpnpFactory(AiohttpRequester(timeout=int(max(1, http_timeout))), non_strict=True)
        try:
            device = await factory.async_create_device(location)
        except (UpnpError, OSError, TimeoutError) as exc:
            raise GatewayTimeout(f"cannot read the IGD description at {location}: {exc}") from exc
        for service in device.all_services:
            if service.service_type == FIREWALL:
                return cls(service, location, server=server)
        raise Unsupported(f"{location} has no {FIREWALL} service", mechanism=Mechanism.UPNP)

    @property
    def version(self) -> int:
        return 2  # the service exists only in IGD:2

    async def firewall_status(self) -> FirewallStatus:
        """GetFirewallStatus."""
        result = await self.call("GetFirewallStatus")
        return FirewallStatus(
            _flag(result.get("FirewallEnabled")), _flag(result.get("InboundPinholeAllowed"))
        )

    async def add_pinhole(
        self,
        internal_client: IPv6Address,
        internal_port: int,
        protocol: Protocol,
        lease: int,
        *,
        remote_host: str = "",
        remote_port: int = 0,
    ) -> int:
        """AddPinhole; its UniqueID. RemoteHost "" and RemotePort 0 are wildcards (§2.5.7).
        The same 5-tuple again extends the pinhole and returns the same UniqueID."""
        result = await self.call(
            "AddPinhole",
            RemoteHost=remote_host,
            RemotePort=remote_port,
            InternalClient=str(internal_client),
            InternalPort=internal_port,
            Protocol=protocol.number,
            LeaseTime=_lease(lease),
        )
        return int(result.get("UniqueID") or 0)

    async def update_pinhole(self, unique_id: int, lease: int) -> None:
        """UpdatePinhole: a new lease; NoSuchMapping (704) if the gateway lost it."""
        await self.call("UpdatePinhole", UniqueID=unique_id, NewLeaseTime=_lease(lease))

    async def delete_pinhole(self, unique_id: int) -> None:
        """DeletePinhole; NoSuchMapping (704) if it is not there."""
        await self.call("DeletePinhole", UniqueID=unique_id)

    async def pinhole_packets(self, unique_id: int) -> int:
        """GetPinholePackets: packets that went through it (NoSuchMapping if gone)."""
        result = await self.call("GetPinholePackets", UniqueID=unique_id)
        return int(result.get("PinholePackets") or 0)


def _lease(lease: int) -> int:
    return max(1, min(lease, MAX_PINHOLE_LEASE))


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


def is_firewall_reply(headers: Any) -> bool:
    """An SSDP answer naming a device that may hold WANIPv6FirewallControl."""
    text = f"{headers.get_lower('st', '')} {headers.get_lower('usn', '')}"
    return bool(headers.get_lower("location")) and any(m in text for m in _MARKERS)


async def ssdp_search6(
    router: Router6,
    *,
    local: IPv6Address | None = None,
    budget: float = 2.0,
    mx: int = 1,
    cutoff: asyncio.Event | None = None,
) -> list[SsdpReply]:
    """Search the router's link for IGD:2 devices over IPv6: `ssdp:all` unicast to the
    router, the firewall service and IGD:2 to ff02::c; those on the router first. Returns
    early when `cutoff` is set with no answer yet (PCP answered: UPnP had its grace)."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    replies: dict[str, SsdpReply] = {}
    first = asyncio.Event()
    index = router.index

    def on_reply(headers: Any) -> None:
        if not is_firewall_reply(headers) or len(replies) >= MAX_REPLIES:
            return
        location = str(headers.get_lower("location"))
        boot = str(headers.get_lower("bootid.upnp.org") or "")
        replies.setdefault(
            location,
            SsdpReply(
                location, str(headers.get_lower("st", "")), str(headers.get_lower("usn", "")),
                str(headers.get_lower("server", "")), _source(headers),
                int(boot) if boot.isascii() and boot.isdigit() else None,
                time.monotonic() - started,
            ),
        )  # fmt: skip
        first.set()

    group = (GROUP6, PORT, 0, index)
    source = (str(local) if local is not None else "::", 0, 0, index)
    listener = SsdpSearchListener(
        callback=on_reply, loop=loop, source=source, target=group, timeout=mx,
        search_target=FIREWALL,
    )  # fmt: skip
    try:
        await listener.async_start()
    except (OSError, UpnpError) as exc:
        raise NoGatewayError(f"cannot open an IPv6 SSDP socket: {exc}") from exc
    try:
        transport: Any = listener._transport  # the listener keeps no public handle
        protocol: SsdpProtocol = transport.get_protocol()
        unicast = (str(router.address), PORT, 0, router.scope)
        protocol.send_ssdp_packet(build_ssdp_search_packet(unicast, mx, "ssdp:all"), unicast)
        for target in (FIREWALL, "urn:schemas-upnp-org:device:InternetGatewayDevice:2"):
            protocol.send_ssdp_packet(build_ssdp_search_packet(group, mx, target), group)
        await _collect(first, cutoff, budget, SETTLE)
    finally:
        listener.async_stop()

    def rank(reply: SsdpReply) -> tuple[bool, str]:
        return (reply.source[0].split("%", 1)[0] != str(router.address), reply.location)

    return sorted(replies.values(), key=rank)
