"""Finding gateways: default routes from the routing table (netifaces), and UPnP IGDs by
SSDP (async-upnp-client's search listener, sent unicast to the gateway and multicast)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.ssdp import SsdpProtocol, build_ssdp_search_packet

from igd.client.errors import NoGatewayError

log = logging.getLogger("igd.client")

SSDP_GROUP = ("239.255.255.250", 1900)
IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
_IGD_MARKERS = ("InternetGatewayDevice:", "WANIPConnection:", "WANPPPConnection:")
MAX_REPLIES = 10  # Tailscale keeps at most 10; a LAN with more IGDs than that is broken
SETTLE = 0.05  # after the first IGD reply, how long later replies may still arrive


@dataclass(frozen=True, slots=True)
class GatewayCandidate:
    """A router from the routing table."""

    address: IPv4Address
    interface: str
    default: bool


def default_gateways() -> list[GatewayCandidate]:
    """IPv4 gateways from the routing table, the default route's first."""
    import netifaces  # netifaces-plus: kept behind this function so it can be swapped

    found: list[GatewayCandidate] = []
    table: Any = netifaces.gateways()
    default = table.get("default", {}).get(netifaces.AF_INET)
    if default:
        found.append(GatewayCandidate(IPv4Address(default[0]), default[1], True))
    for entry in table.get(netifaces.AF_INET, []):
        candidate = GatewayCandidate(IPv4Address(entry[0]), entry[1], bool(entry[2]))
        if all(c.address != candidate.address for c in found):
            found.append(candidate)
    return found


PROC_ROUTE = Path("/proc/net/route")
_RTF_UP, _RTF_GATEWAY = 0x1, 0x2


def default_routes(table: Path = PROC_ROUTE) -> list[GatewayCandidate]:
    """Every IPv4 default route's gateway, best metric first (Linux: /proc/net/route, which
    lists them all; netifaces names only the best one default). Elsewhere: netifaces."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return [c for c in default_gateways() if c.default]
    routes: list[tuple[int, GatewayCandidate]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue  # not a default route (destination and mask 0)
        try:
            flags, metric = int(fields[3], 16), int(fields[6])
            address = IPv4Address(int(fields[2], 16).to_bytes(4, "little"))
        except ValueError:
            continue
        if flags & _RTF_UP and flags & _RTF_GATEWAY:
            routes.append((metric, GatewayCandidate(address, fields[0], False)))
    routes.sort(key=lambda mc: mc[0])
    return [replace(c, default=i == 0) for i, (_, c) in enumerate(routes)]


PROC_ROUTE6 = Path("/proc/net/ipv6_route")


@dataclass(frozen=True, slots=True)
class Router6:
    """An IPv6 default router: its address (often link-local) and the interface to it."""

    address: IPv6Address
    interface: str

    @property
    def index(self) -> int:
        """The interface's index (0 if it is gone)."""
        try:
            return socket.if_nametoindex(self.interface)
        except OSError:
            return 0

    @property
    def scope(self) -> int:
        """The scope a link-local address needs (0 for a global one)."""
        return self.index if self.address.is_link_local else 0


def default_routers6(table: Path = PROC_ROUTE6) -> list[Router6]:
    """The IPv6 default routes' next hops, best metric first (RFC 6887 §8.1: the PCP
    server of a host is its default router, unless configured otherwise)."""
    try:
        lines = table.read_text().splitlines()
    except OSError:
        return []
    routes: list[tuple[int, Router6]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[0] != "0" * 32 or fields[1] != "00":
            continue  # not ::/0
        try:
            hop = IPv6Address(bytes.fromhex(fields[4]))
            metric, flags = int(fields[5], 16), int(fields[8], 16)
        except ValueError:
            continue
        if flags & _RTF_UP and flags & _RTF_GATEWAY and not hop.is_unspecified:
            routes.append((metric, Router6(hop, fields[9])))
    routes.sort(key=lambda mr: mr[0])
    return list(dict.fromkeys(r for _, r in routes))


def global_address6(router: Router6) -> IPv6Address | None:
    """This host's address for pinholes toward `router`: the kernel's source toward a global
    router, else a global address on the router's interface (a link-local source cannot be
    reached from the Internet); None if the host has none."""
    if not router.address.is_link_local:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
            try:
                udp.connect((str(router.address), 5351))  # a route lookup; nothing is sent
                source = IPv6Address(udp.getsockname()[0].split("%", 1)[0])
            except (OSError, ValueError):
                source = None
        if source is not None and not source.is_link_local:
            return source
    import netifaces

    found: list[IPv6Address] = []
    for entry in netifaces.ifaddresses(router.interface).get(netifaces.AF_INET6, []):
        try:
            address = IPv6Address(str(entry.get("addr", "")).split("%", 1)[0])
        except ValueError:
            continue
        if not (address.is_link_local or address.is_loopback or address.is_multicast):
            found.append(address)
    # Global unicast before unique local (RFC 6724 would pick that way toward the Internet).
    found.sort(key=lambda a: a.is_private)
    return found[0] if found else None


def default_gateway() -> IPv4Address:
    """The default IPv4 gateway; NoGatewayError if the routing table has none."""
    found = default_gateways()
    if not found:
        raise NoGatewayError("no IPv4 default route: pass the gateway address explicitly")
    return found[0].address


def source_toward(target: IPv4Address | None) -> IPv4Address | None:
    """The source address the kernel picks toward `target` (a connected UDP socket sends
    nothing); None without a route."""
    if target is None:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect((str(target), 5351))
        except OSError:
            return None
        return IPv4Address(udp.getsockname()[0])


@dataclass(frozen=True, slots=True)
class SsdpReply:
    """One SSDP search answer that names an IGD."""

    location: str
    st: str
    usn: str
    server: str
    source: tuple[str, int]
    boot_id: int | None
    seconds: float

    @property
    def host(self) -> str:
        return urlsplit(self.location).hostname or ""

    def rank(self, gateway: IPv4Address | None) -> tuple[bool, bool, str]:
        """Sort key: the gateway's own device first, IGD:2 before IGD:1 (more actions)."""
        on_gateway = gateway is not None and self.host == str(gateway)
        v2 = ":2" in self.st or "InternetGatewayDevice:2" in self.usn
        return (not on_gateway, not v2, self.location)


def is_igd_reply(headers: Any) -> bool:
    """An answer names an IGD by its ST or USN, whatever port it came from (Tailscale #7377)."""
    text = f"{headers.get_lower('st', '')} {headers.get_lower('usn', '')}"
    return bool(headers.get_lower("location")) and any(m in text for m in _IGD_MARKERS)


async def ssdp_search(
    gateway: IPv4Address | None,
    *,
    local: IPv4Address | None = None,
    budget: float = 2.0,
    mx: int = 1,
    settle: float = SETTLE,
    cutoff: asyncio.Event | None = None,
    only_gateway: bool = False,
    trace: Callable[[str], None] | None = None,
) -> list[SsdpReply]:
    """Search for IGDs; return the distinct ones (by LOCATION), best first.

    Sends `ssdp:all` unicast to the gateway (some routers answer only that; it also opens
    stateful host firewalls for the multicast answers), then `ssdp:all` and IGD:1
    multicast (some answer `ssdp:all` with their first descriptor only, Tailscale #3557).
    Returns `settle` seconds after the first IGD answer, after `budget` seconds, or when
    `cutoff` is set with no answer yet (the probe sets it once NAT-PMP or PCP answered).
    With `only_gateway` (the user named the gateway), devices elsewhere are ignored.
    """
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    replies: dict[str, SsdpReply] = {}
    first = asyncio.Event()

    def on_reply(headers: Any) -> None:
        if not is_igd_reply(headers) or len(replies) >= MAX_REPLIES:
            return
        location = str(headers.get_lower("location"))
        if location in replies:
            return
        if only_gateway and urlsplit(location).hostname != str(gateway):
            # A named gateway is the only device used: another IGD on the LAN (a second
            # router, a repeater) answering the multicast search would map on the wrong box.
            if trace is not None:
                trace(f"ssdp: ignoring {location}: not on the named gateway {gateway}")
            return
        boot = headers.get_lower("bootid.upnp.org")
        replies[location] = SsdpReply(
            location=location,
            st=str(headers.get_lower("st", "")),
            usn=str(headers.get_lower("usn", "")),
            server=str(headers.get_lower("server", "")),
            source=_source(headers),
            boot_id=int(boot) if boot and str(boot).isascii() and str(boot).isdigit() else None,
            seconds=time.monotonic() - started,
        )
        if trace is not None:
            reply = replies[location]
            trace(f"ssdp: {reply.source[0]}:{reply.source[1]} names {location} ({reply.st})")
        first.set()

    listener = SsdpSearchListener(
        callback=on_reply,
        loop=loop,
        source=(str(local or "0.0.0.0"), 0),
        target=SSDP_GROUP,
        timeout=mx,
        search_target=IGD1,
    )
    try:
        await listener.async_start()
    except OSError as exc:
        raise NoGatewayError(f"cannot open an SSDP socket: {exc}") from exc
    try:
        transport: Any = listener._transport  # the listener keeps no public handle
        protocol: SsdpProtocol = transport.get_protocol()
        if gateway is not None:
            unicast = (str(gateway), SSDP_GROUP[1])
            protocol.send_ssdp_packet(build_ssdp_search_packet(unicast, mx, "ssdp:all"), unicast)
        protocol.send_ssdp_packet(build_ssdp_search_packet(SSDP_GROUP, mx, "ssdp:all"), SSDP_GROUP)
        protocol.send_ssdp_packet(build_ssdp_search_packet(SSDP_GROUP, mx, IGD1), SSDP_GROUP)
        if trace is not None:
            unicast_to = f"unicast to {gateway}, " if gateway is not None else ""
            trace(f"ssdp: searches sent ({unicast_to}multicast ssdp:all and IGD:1)")
        await _collect(first, cutoff, budget, settle)
    finally:
        listener.async_stop()
    return sorted(replies.values(), key=lambda r: r.rank(gateway))


def _source(headers: Any) -> tuple[str, int]:
    remote = headers.get_lower("_remote_addr") or ("", 0)
    return (str(remote[0]), int(remote[1]))


async def _collect(
    first: asyncio.Event, cutoff: asyncio.Event | None, budget: float, settle: float
) -> None:
    """Wait up to `budget` for the `first` reply (or the `cutoff`), then `settle` more for
    the others a search brings."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(budget):
            await _first_of(first, cutoff)
            if first.is_set():
                await asyncio.sleep(settle)


async def _first_of(*events: asyncio.Event | None) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
