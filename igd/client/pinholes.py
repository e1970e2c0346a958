"""IPv6 pinholes: what `PortMapper` uses when the application asks for IPv6. On IPv6 there
is no NAT, but the router's firewall drops unsolicited inbound traffic (RFC 6092); a pinhole
lets it through to this host's address and port. Two mechanisms: PCP MAP over IPv6 to the
default router (RFC 6887 §8.1, §11.3) and UPnP IGD:2 WANIPv6FirewallControl:1.

`Pinhole` is a `Mapping` (same keeper, renewal, events) whose external address and port are
the internal ones; `Ipv6Gateway` is the router's IPv6 side: its address, this host's global
address, the two clients, the probe, the PCP epoch of the IPv6 server (kept apart from the
IPv4 one: another socket, maybe another server) and its announcements on [ff02::1]:5350."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network, ip_network
from typing import Any

from igd.client.discovery import Router6, default_routers6, global_address6
from igd.client.errors import (
    InvalidRequest,
    NoGatewayError,
    NoSuchMapping,
    PortMappingError,
    UnsupportedVersion,
)
from igd.client.mapping import Mapping
from igd.client.mechanisms import Driver, Grant, MapSpec, padded
from igd.client.pcp import new_nonce
from igd.client.pcp6 import Pcp6Client
from igd.client.timing import EpochRule, EpochTracker
from igd.client.upnp6 import FirewallStatus, UpnpFirewallClient, ssdp_search6
from igd.model import Mechanism
from igd.proto import pcp
from igd.proto.errors import DecodeError
from igd.proto.pcp import PcpOpcode, PcpResponse, PcpResult

log = logging.getLogger("igd.client")

ALL_NODES = "ff02::1"  # RFC 6887 §14.1.3: unsolicited ANNOUNCE to [ff02::1]:5350
ANNOUNCE_PORT = 5350
PINHOLE_MECHANISMS = (Mechanism.PCP, Mechanism.UPNP)  # in order of preference
# Once PCP answered, an IGD gets this long to answer SSDP too (as probe.py does for IPv4).
UPNP_GRACE = 0.3
HINT_INTERVAL = 1.0  # at most one solicited ANNOUNCE a second, however many we hear
PROBE_MAX_AGE = 1800.0  # as for IPv4 (mapper.py): mechanisms may have come up since


class Pinhole(Mapping[IPv6Address]):
    """An IPv6 pinhole kept open until `release()`: `address` and `port` are what peers
    connect to (this host's own, as the firewall does not translate)."""

    @property
    def address(self) -> IPv6Address:
        return self.external_address

    @property
    def port(self) -> int:
        return self.grant.external_port

    @property
    def unique_id(self) -> int | None:
        """UPnP: the UniqueID the gateway gave (None over PCP, which uses the nonce)."""
        return self.grant.unique_id

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "family": 6, "unique_id": self.unique_id}

    def __repr__(self) -> str:
        return (
            f"<Pinhole {self.mechanism.value} [{self.address}]:{self.port}/{self.protocol.value}>"
        )


def _address(spec: MapSpec) -> IPv6Address:
    if not isinstance(spec.internal_address, IPv6Address):
        raise TypeError(f"a pinhole driver was asked for {spec.internal_address}")
    return spec.internal_address


def remote_peers(
    remote: IPv6Address | IPv6Network | str | None, port: int
) -> tuple[IPv6Network, int] | None:
    """The remote peers a pinhole lets in (None: all); ValueError for what is not IPv6."""
    if not 0 <= port < 65536:
        raise ValueError("remote_port must be 0..65535 (0: any)")
    if remote is None:
        return (IPv6Network("::/0"), port) if port else None
    network = ip_network(remote, strict=False) if isinstance(remote, str) else remote
    if isinstance(network, IPv6Address):
        network = IPv6Network(network)
    if not isinstance(network, IPv6Network):
        raise ValueError(f"a pinhole's remote peers are IPv6, not {remote}")
    return network, port


def _remote_host(spec: MapSpec) -> tuple[str, int]:
    """AddPinhole's RemoteHost and RemotePort: one address or the wildcard (WANIPv6FC §2.5.7
    has no prefixes; `PortMapper.pinhole` refuses a prefix over UPnP before asking)."""
    if spec.remote is None:
        return "", 0
    network, port = spec.remote
    return (str(network.network_address) if network.prefixlen else ""), port


class Pcp6Driver:
    """PCP MAP over IPv6; one nonce per pinhole, kept across renewals (RFC 6887 §11.2.1)."""

    name = "pcp (IPv6)"

    def __init__(self, client: Pcp6Client) -> None:
        self.client = client
        self.pad_description = False

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        nonce = previous.nonce if previous and previous.nonce else new_nonce()
        text = spec.description or None
        if text and self.pad_description:
            text = padded(text)
        # RFC 6887 §13.3: FILTER lets in only the remote peers it names.
        filters = (
            [(spec.remote[0].network_address, spec.remote[0].prefixlen, spec.remote[1])]
            if spec.remote is not None
            else []
        )
        try:
            got = await self.client.map(
                spec.protocol, spec.internal_port, spec.lifetime, nonce=nonce,
                description=text, filters=filters,
            )  # fmt: skip
        except InvalidRequest as exc:
            # miniupnpd 2.3.1's DESCRIPTION length bug, as over IPv4 (mechanisms.py).
            if exc.code != PcpResult.MALFORMED_OPTION or not text or padded(text) == text:
                raise
            self.pad_description = True
            got = await self.client.map(
                spec.protocol, spec.internal_port, spec.lifetime, nonce=nonce,
                description=padded(text), filters=filters,
            )  # fmt: skip
        return Grant(Mechanism.PCP, got.address, got.port, got.lifetime, got.epoch, nonce)

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        assert grant.nonce is not None
        await self.client.unmap(spec.protocol, spec.internal_port, nonce=grant.nonce)

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        return True  # the epoch tells of state loss


class UpnpPinholeDriver:
    """WANIPv6FirewallControl: AddPinhole, then UpdatePinhole with its UniqueID; a pinhole
    the gateway lost (704, or 402 from miniupnpd 2.3.1) is added again."""

    name = "upnp (IPv6)"

    def __init__(self, client: Callable[[], Awaitable[UpnpFirewallClient]]) -> None:
        self.client = client
        """The service, found again after the IGD restarted (its control URL may move)."""

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        lease = spec.lifetime
        client = await self.client()
        if previous is not None and previous.unique_id is not None:
            try:
                await client.update_pinhole(previous.unique_id, lease)
                return Grant(
                    Mechanism.UPNP, _address(spec), spec.internal_port, min(lease, 86400),
                    unique_id=previous.unique_id,
                )  # fmt: skip
            except (NoSuchMapping, InvalidRequest) as exc:
                # Gone (expired, or the gateway restarted): add it again. miniupnpd 2.3.1
                # answers 402 rather than 704 for a UniqueID it no longer holds (its nft
                # update re-adds the rule, miniupnp #663); the same 5-tuple again is safe:
                # it extends the pinhole and returns its UniqueID (§2.6.3.3).
                log.info("UpdatePinhole %d failed (%s); adding the pinhole again",
                         previous.unique_id, exc)  # fmt: skip
        host, port = _remote_host(spec)
        unique_id = await client.add_pinhole(
            _address(spec), spec.internal_port, spec.protocol, lease,
            remote_host=host, remote_port=port,
        )  # fmt: skip
        return Grant(
            Mechanism.UPNP, _address(spec), spec.internal_port, min(lease, 86400),
            unique_id=unique_id,
        )  # fmt: skip

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        if grant.unique_id is None:
            return
        with contextlib.suppress(NoSuchMapping):  # gone already: what we wanted
            await (await self.client()).delete_pinhole(grant.unique_id)

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        if grant.unique_id is None:
            return False
        try:
            await (await self.client()).pinhole_packets(grant.unique_id)
        except NoSuchMapping:
            return False
        except PortMappingError:
            return True  # optional action missing or failing: the update will tell
        return True


@dataclass(frozen=True, slots=True)
class Ipv6Report:
    """What the router offers for IPv6 pinholes."""

    router: IPv6Address | None
    local_address: IPv6Address | None
    pcp: bool = False
    pcp_epoch: int | None = None
    pcp_error: str | None = None
    upnp: bool = False
    upnp_location: str | None = None
    upnp_error: str | None = None
    firewall: FirewallStatus | None = None
    seconds: float = 0.0
    client: UpnpFirewallClient | None = field(default=None, repr=False, compare=False)

    @property
    def mechanisms(self) -> tuple[Mechanism, ...]:
        """The pinhole mechanisms that answered, PCP first."""
        usable = {Mechanism.PCP: self.pcp, Mechanism.UPNP: self.upnp}
        return tuple(m for m in PINHOLE_MECHANISMS if usable[m])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        status = self.firewall
        return {
            "router": None if self.router is None else str(self.router),
            "local_address": None if self.local_address is None else str(self.local_address),
            "pcp": {"available": self.pcp, "epoch": self.pcp_epoch, "error": self.pcp_error},
            "upnp": {
                "available": self.upnp,
                "location": self.upnp_location,
                "error": self.upnp_error,
                "firewall_enabled": None if status is None else status.enabled,
                "inbound_pinhole_allowed": None if status is None else status.inbound_allowed,
            },
            "seconds": round(self.seconds, 4),
        }


class Ipv6Gateway:
    """The IPv6 side of one `PortMapper`: the router (`router`, else the first IPv6 default
    route's), this host's global address, the PCP and UPnP clients, made on first use.
    `restarted(mechanism)` is called when the IPv6 PCP server lost its state."""

    def __init__(
        self,
        router: IPv6Address | str | None,
        *,
        restarted: Callable[[Mechanism], None],
        clock: Callable[[], float],
        listen: bool = True,
        probe_timeout: float = 2.0,
    ) -> None:
        self._named = IPv6Address(str(router).split("%", 1)[0]) if router else None
        self._router: Router6 | None = None
        self.restarted = restarted
        self.clock = clock
        self.listen = listen
        self.probe_timeout = probe_timeout
        self.epoch = EpochTracker(EpochRule.PCP)
        self.pcp_port = pcp.SERVER_PORT
        """Where the router's PCP server listens (RFC 6887 §19.1: 5351)."""
        self.last_probe: Ipv6Report | None = None
        self._probed_at = 0.0
        self._pcp: Pcp6Client | None = None
        self._upnp: UpnpFirewallClient | None = None
        self._listener: asyncio.DatagramTransport | None = None
        self._hint: asyncio.Task[None] | None = None
        self._hinted_at = -HINT_INTERVAL

    @property
    def router(self) -> Router6:
        """The router pinholes are asked of; NoGatewayError without an IPv6 route."""
        if self._router is None:
            self._router = self._find_router()
            if self._router is None:
                raise NoGatewayError("no IPv6 default route: pass the IPv6 gateway explicitly")
        return self._router

    def _find_router(self) -> Router6 | None:
        routes = default_routers6()
        if self._named is not None:
            named = self._named
            via = next((r for r in routes if r.address == named), None)
            return via or Router6(named, routes[0].interface if routes else "")
        return routes[0] if routes else None

    def look(self) -> tuple[IPv6Address | None, IPv6Address | None]:
        """The router and this host's global address toward it now (not cached): what the
        network watch compares to notice a new IPv6 network or prefix."""
        router = self._find_router()
        if router is None:
            return None, None
        return router.address, global_address6(router)

    def reset(self) -> None:
        """A new IPv6 network: close the sockets, forget the router, its epoch and probe;
        the next use finds them again."""
        self.close()
        self._router = None
        self.epoch = EpochTracker(EpochRule.PCP)
        self.last_probe = None
        self._probed_at = 0.0

    @property
    def local_address(self) -> IPv6Address:
        """This host's global address toward the router: what pinholes open to."""
        address = global_address6(self.router)
        if address is None:
            raise NoGatewayError(f"this host has no global IPv6 address on {self.router.interface}")
        return address

    async def pcp(self) -> Pcp6Client:
        """The PCP client over IPv6 (opened once, kept for its unsolicited answers)."""
        if self._pcp is None:
            router = self.router
            client = Pcp6Client(
                router.address, local=self.local_address, scope=router.scope, port=self.pcp_port
            )
            client.on_unsolicited = self._unsolicited
            await client.open()
            self._pcp = client
            if self.listen:
                await self._listen(router)
        return self._pcp

    async def upnp(self, cutoff: asyncio.Event | None = None) -> UpnpFirewallClient:
        """The router's WANIPv6FirewallControl service, found by SSDP over IPv6."""
        if self._upnp is None:
            router = self.router
            replies = await ssdp_search6(
                router, local=self.local_address, budget=self.probe_timeout, cutoff=cutoff
            )
            errors = []
            for reply in replies[:3]:
                try:
                    self._upnp = await UpnpFirewallClient.connect(
                        reply.location, http_timeout=self.probe_timeout, server=reply.server
                    )
                    break
                except PortMappingError as exc:
                    errors.append(f"{reply.location}: {exc}")
            if self._upnp is None:
                found = "; ".join(errors) or "no IGD:2 answered SSDP on ff02::c"
                raise NoGatewayError(f"no UPnP pinhole service on {router.interface}: {found}")
        return self._upnp

    async def driver(self, mechanism: Mechanism) -> Driver:
        """The pinhole driver for `mechanism` (PCP or UPnP)."""
        if mechanism is Mechanism.PCP:
            return Pcp6Driver(await self.pcp())
        if mechanism is Mechanism.UPNP:
            await self.upnp()  # found now: a missing service fails the request at once
            return UpnpPinholeDriver(self.upnp)
        raise ValueError(f"{mechanism.value} cannot open IPv6 pinholes (PCP or UPnP can)")

    async def drivers(
        self, mechanisms: tuple[Mechanism, ...], via: Mechanism | None
    ) -> list[Driver]:
        """The drivers to try: `via`'s, else those of the mechanisms the probe found."""
        if via is not None:
            return [await self.driver(via)]
        report = await self.probe(mechanisms)
        if not report.mechanisms:
            raise NoGatewayError(
                f"the IPv6 router {report.router} opens no pinholes (PCP: "
                f"{report.pcp_error}; UPnP: {report.upnp_error})"
            )
        return [await self.driver(m) for m in report.mechanisms]

    async def probe(
        self, mechanisms: tuple[Mechanism, ...] = PINHOLE_MECHANISMS, *, refresh: bool = False
    ) -> Ipv6Report:
        """Ask PCP (ANNOUNCE over IPv6) and UPnP (SSDP on ff02::c, GetFirewallStatus) at once."""
        fresh = self.clock() - self._probed_at <= PROBE_MAX_AGE
        if self.last_probe is not None and fresh and not refresh:
            return self.last_probe
        started = time.monotonic()
        try:
            router, local = self.router, self.local_address
        except NoGatewayError as exc:
            return Ipv6Report(None, None, pcp_error=str(exc), upnp_error=str(exc))
        budget = self.probe_timeout
        cutoff = asyncio.Event()

        async def over_pcp() -> tuple[int | None, str | None]:
            if Mechanism.PCP not in mechanisms:
                return None, "disabled"
            try:
                answer = await (await self.pcp()).announce(waits=(budget / 3, budget * 2 / 3))
            except UnsupportedVersion as exc:
                return None, f"{exc} (NAT-PMP has no IPv6)"
            except PortMappingError as exc:
                return None, str(exc)
            self.observe(answer.epoch)
            asyncio.get_running_loop().call_later(UPNP_GRACE, cutoff.set)
            return answer.epoch, None

        async def over_upnp() -> tuple[
            UpnpFirewallClient | None, FirewallStatus | None, str | None
        ]:
            if Mechanism.UPNP not in mechanisms:
                return None, None, "disabled"
            try:
                client = await self.upnp(cutoff)
                return client, await client.firewall_status(), None
            except PortMappingError as exc:
                return self._upnp, None, str(exc)

        (epoch, pcp_error), (client, status, upnp_error) = await asyncio.gather(
            over_pcp(), over_upnp()
        )
        upnp_ok = status is not None and status.enabled and status.inbound_allowed
        if status is not None and not upnp_ok:
            upnp_error = "the firewall " + (
                "is disabled (nothing to open)" if not status.enabled else "allows no pinholes"
            )
        report = Ipv6Report(
            router.address, local, pcp_error is None, epoch, pcp_error, upnp_ok,
            client.location if client else None, upnp_error, status,
            time.monotonic() - started, client,
        )  # fmt: skip
        self.last_probe, self._probed_at = report, self.clock()
        return report

    def observe(self, epoch: int) -> None:
        """The epoch test (RFC 6887 §8.5) for the IPv6 server; a failure re-creates pinholes."""
        if not self.epoch.observe(epoch, now=self.clock()):
            log.warning("PCP epoch %d over IPv6: the router lost its state; re-opening pinholes",
                        epoch)  # fmt: skip
            self.restarted(Mechanism.PCP)

    def _unsolicited(self, response: PcpResponse) -> None:
        # RFC 6887 §14.2: a Mapping Update or unicast ANNOUNCE from the server itself.
        self.observe(response.epoch)

    async def _listen(self, router: Router6) -> None:
        """Hear multicast ANNOUNCEs on [ff02::1]:5350 on the router's interface."""
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((ALL_NODES, ANNOUNCE_PORT, 0, router.index))
                group = socket.inet_pton(socket.AF_INET6, ALL_NODES)
                mreq = group + struct.pack("@I", router.index)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            log.warning("cannot listen on [%s]:%d: %s", ALL_NODES, ANNOUNCE_PORT, exc)
            return
        loop = asyncio.get_running_loop()
        self._listener, _ = await loop.create_datagram_endpoint(
            lambda: _Heard(self._heard), sock=sock
        )

    def _heard(self, data: bytes) -> None:
        # The announcement comes from the router's link-local address, which we may not
        # know (its global address is the route's next hop): rather than trust any source,
        # take it as a hint and ask the server itself, whose answer goes through the epoch
        # test (RFC 6887 §14.1.3 re-creates mappings only for our own server's epoch).
        try:
            response = pcp.decode_response(data)
        except DecodeError:
            return
        if response.opcode is not PcpOpcode.ANNOUNCE or self._pcp is None:
            return
        now = self.clock()
        if (self._hint is not None and not self._hint.done()) or (
            now - self._hinted_at < HINT_INTERVAL
        ):
            return
        self._hinted_at = now
        self._hint = asyncio.get_running_loop().create_task(self._ask())

    async def _ask(self) -> None:
        if self._pcp is None:
            return
        try:
            answer = await self._pcp.announce()
        except PortMappingError as exc:
            log.info("no answer to the ANNOUNCE after an announcement: %s", exc)
            return
        self.observe(answer.epoch)

    def forget_upnp(self) -> None:
        """Find the UPnP service again on next use (the device restarted elsewhere)."""
        self._upnp = None

    def close(self) -> None:
        """Close the sockets."""
        if self._pcp is not None:
            self._pcp.close()
            self._pcp = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._hint is not None:
            self._hint.cancel()
        self._upnp = None


class _Heard(asyncio.DatagramProtocol):
    def __init__(self, callback: Callable[[bytes], None]) -> None:
        self.callback = callback

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.callback(data)
