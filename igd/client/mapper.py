"""`PortMapper`: one call gets a working mapping over PCP, NAT-PMP or UPnP, and a `Mapping`
(mapping.py) that keeps working. The mapper owns what is shared by every mapping on one
gateway: the sockets, the drivers, and the restart detection that re-creates them all (the
PCP/NAT-PMP epoch rule, announcements on 224.0.0.1:5350, the UPnP BOOTID in SSDP NOTIFY)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from ipaddress import AddressValueError, IPv4Address
from types import TracebackType
from urllib.parse import urlsplit

from igd.client.announce import (
    Announcement,
    AnnouncementListener,
    SsdpNotify,
    SsdpNotifyListener,
)
from igd.client.discovery import default_gateway, ssdp_search
from igd.client.errors import GatewayTimeout, MappingRefused, NoGatewayError, PortMappingError
from igd.client.mapping import REQUEST_TIMEOUT, EventKind, Mapping
from igd.client.mechanisms import (
    Driver,
    Grant,
    MapSpec,
    NatPmpDriver,
    PcpDriver,
    PxpDriver,
    UpnpDriver,
)
from igd.client.natpmp import NatPmpClient
from igd.client.pcp import PcpClient
from igd.client.probe import ProbeResult, probe, require_gateway
from igd.client.selection import DEFAULT_PREFERENCE
from igd.client.timing import EpochRule, EpochTracker
from igd.client.upnp import UpnpEntry, UpnpIgdClient
from igd.model import Mechanism, Protocol
from igd.proto.pcp import PcpResponse

log = logging.getLogger("igd.client")

_rng = random.SystemRandom()  # recovery jitter; the OS source needs no seeding
MAX_MAPPINGS = 256  # per PortMapper: each holds a timer task
MAX_RECOVERIES = 4  # UPnP restart recoveries pending at once; more restarts are coalesced


class PortMapper:
    """Finds the gateway, picks the mechanism, makes and keeps mappings.

    `async with PortMapper() as pm: m = await pm.map(8080, "tcp")`. Every mapping still
    held is released when the block ends.
    """

    def __init__(
        self,
        gateway: IPv4Address | str | None = None,
        *,
        prefer: Sequence[Mechanism | str] = DEFAULT_PREFERENCE,
        probe_timeout: float = 2.0,
        recovery_delay: float = 5.0,
        listen: bool = True,
    ) -> None:
        self._gateway = IPv4Address(gateway) if gateway else None
        self.prefer = tuple(Mechanism(m) for m in prefer)
        self.probe_timeout = probe_timeout
        self.recovery_delay = recovery_delay
        """RFC 6887 §14.1.3 and RFC 6886 §3.7: wait a random 0..this many seconds."""
        self.listen = listen
        self.clock: Callable[[], float] = lambda: asyncio.get_running_loop().time()
        self.mappings: list[Mapping] = []
        self.last_probe: ProbeResult | None = None
        self._natpmp: NatPmpClient | None = None
        self._pcp: PcpClient | None = None
        self._upnp: UpnpIgdClient | None = None
        self._upnp_driver: UpnpDriver | None = None
        self._upnp_boot: int | None = None
        self._upnp_seen_at = ""  # the LOCATION of the last ssdp:alive, if it moved
        self._listener: AnnouncementListener | None = None
        self._ssdp_listener: SsdpNotifyListener | None = None
        self._recoveries: set[asyncio.Task[None]] = set()
        self._epochs = {
            Mechanism.PCP: EpochTracker(EpochRule.PCP),
            Mechanism.NATPMP: EpochTracker(EpochRule.NATPMP),
        }
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> PortMapper:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def gateway(self) -> IPv4Address:
        """The gateway in use (the default route's unless one was given)."""
        if self._gateway is None:
            self._gateway = default_gateway()
        return self._gateway

    async def _clients(self) -> tuple[NatPmpClient, PcpClient]:
        if self._natpmp is None or self._pcp is None:
            self._natpmp = NatPmpClient(self.gateway)
            self._pcp = PcpClient(self.gateway)
            self._pcp.on_unsolicited = self._pcp_unsolicited
            await self._pcp.open()
            await self._natpmp.open()
            if self.listen:
                listener = AnnouncementListener(
                    self.gateway, self._pcp.local_address, self._announced
                )
                if await listener.start():
                    self._listener = listener
        return self._natpmp, self._pcp

    async def probe(self, *, refresh: bool = False) -> ProbeResult:
        """Probe every preferred mechanism at once (cached unless `refresh`)."""
        async with self._lock:
            if self.last_probe is None or refresh:
                natpmp, pcp = await self._clients()
                result = await probe(
                    self.gateway, natpmp=natpmp, pcp=pcp, mechanisms=self.prefer,
                    budget=self.probe_timeout,
                )  # fmt: skip
                for report in result.reports:
                    if report.epoch is not None and report.mechanism in self._epochs:
                        # Through the epoch test: a probe that finds the gateway restarted
                        # re-creates the mappings, as an answer or announcement would.
                        self._epoch(report.mechanism, report.epoch)
                if result.upnp is not None and self._upnp is None:
                    boot = (r.boot_id for r in result.ssdp if r.location == result.upnp.location)
                    self._use_upnp(result.upnp, next(boot, None))
                self.last_probe = result
            return self.last_probe

    async def external_address(self) -> IPv4Address:
        """The external address of the chosen mechanism."""
        result = await self.probe()
        require_gateway(result)
        address = result.choice.external_address
        if address is None:
            raise NoGatewayError("the gateway did not say its external address")
        return address

    async def local_address(self) -> IPv4Address:
        """This host's address toward the gateway."""
        return (await self._clients())[1].local_address

    async def upnp(self) -> UpnpIgdClient:
        """The gateway's UPnP IGD client (found by SSDP once, then kept)."""
        if self._upnp is None:
            _, pcp = await self._clients()
            replies = await ssdp_search(
                self.gateway, local=pcp.local_address, budget=self.probe_timeout
            )
            if not replies:
                raise NoGatewayError(f"no UPnP IGD answered SSDP (gateway {self.gateway})")
            client = await UpnpIgdClient.connect(replies[0].location, server=replies[0].server)
            self._use_upnp(client, replies[0].boot_id)
        assert self._upnp is not None
        return self._upnp

    def _use_upnp(self, client: UpnpIgdClient, boot_id: int | None) -> None:
        self._upnp, self._upnp_boot = client, boot_id
        if self._upnp_driver is not None:
            self._upnp_driver.client = client  # mappings made before keep working

    async def driver(self, mechanism: Mechanism, *, fallback: bool = True) -> Driver:
        """The driver for `mechanism`; PCP falls back to NAT-PMP per request if `fallback`."""
        natpmp, pcp = await self._clients()
        if mechanism is Mechanism.UPNP:
            client = await self.upnp()
            if self._upnp_driver is None:
                self._upnp_driver = UpnpDriver(client)
            return self._upnp_driver
        if mechanism is Mechanism.NATPMP and not fallback:
            return NatPmpDriver(natpmp)
        if mechanism is Mechanism.PCP and not fallback:
            return PcpDriver(pcp)
        return PxpDriver(PcpDriver(pcp), NatPmpDriver(natpmp))

    async def map(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        external_port: int | None = None,
        lifetime: int = 7200,
        description: str = "",
        via: Mechanism | str | None = None,
        exact: bool = False,
    ) -> Mapping:
        """Get a mapping and keep it alive. `external_port` is a suggestion unless `exact`;
        `via` forces a mechanism (otherwise the probe's choice, then the others ranked)."""
        if len(self.mappings) >= MAX_MAPPINGS:
            raise ValueError(f"a PortMapper holds at most {MAX_MAPPINGS} mappings")
        if not 0 < internal_port < 65536 or lifetime <= 0:
            raise ValueError("internal_port must be 1..65535 and lifetime positive")
        if via is not None:
            order: list[Mechanism] = [Mechanism(via)]
            drivers = [await self.driver(order[0], fallback=False)]
        else:
            result = await self.probe()
            require_gateway(result)
            order = list(result.choice.ranked)
            if Mechanism.PCP in order and Mechanism.NATPMP in order:
                order.remove(Mechanism.NATPMP)  # the PCP driver falls back to it
            drivers = [await self.driver(m) for m in order]
        _, pcp = await self._clients()
        spec = MapSpec(
            Protocol(protocol), internal_port, pcp.local_address, lifetime,
            external_port, exact, description,
        )  # fmt: skip
        error: PortMappingError | None = None
        for driver in drivers:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    grant = await driver.create(spec, None)
            except TimeoutError:
                error = GatewayTimeout(f"no answer over {driver.name}")
                continue
            except MappingRefused as exc:
                if exc.advice.value in ("other-mechanism",):
                    error = exc
                    continue
                raise  # the gateway answered no: its policy holds whatever the mechanism
            except PortMappingError as exc:
                error = exc
                continue
            self.note_epoch(grant)
            if grant.mechanism is Mechanism.UPNP:
                await self._watch_upnp()
            mapping = Mapping(self, driver, spec, grant)
            self.mappings.append(mapping)
            mapping._start()
            mapping._emit(EventKind.CREATED)
            return mapping
        raise error or NoGatewayError("no mechanism available")

    async def list(self) -> list[UpnpEntry]:
        """The router's UPnP mapping list (all hosts)."""
        return await (await self.upnp()).list_mappings()

    def forget(self, mapping: Mapping) -> None:
        with contextlib.suppress(ValueError):
            self.mappings.remove(mapping)

    def note_epoch(self, grant: Grant) -> None:
        if grant.epoch is not None and grant.mechanism in self._epochs:
            self._epoch(grant.mechanism, grant.epoch)

    def _epoch(self, mechanism: Mechanism, epoch: int) -> None:
        tracker = self._epochs[mechanism]
        if tracker.server is None:
            # No baseline over this mechanism yet (a PCP mapping, then a NAT-PMP address
            # announcement): NAT-PMP and PCP on one port share the server's epoch in practice
            # (RFC 6887 appendix A), so start from the other mechanism's last observation.
            other = next(t for m, t in self._epochs.items() if m is not mechanism)
            tracker.server, tracker.client = other.server, other.client
        if tracker.observe(epoch, now=self.clock()):
            return
        log.warning("%s epoch %d: the gateway lost its state; re-creating mappings",
                    mechanism.value, epoch)  # fmt: skip
        for mapping in self.mappings:
            if mapping.mechanism in (Mechanism.PCP, Mechanism.NATPMP):
                mapping.recover(_rng.uniform(0, self.recovery_delay))

    async def _watch_upnp(self) -> None:
        """Listen for the IGD's SSDP NOTIFY once a UPnP mapping exists."""
        if not self.listen or self._ssdp_listener is not None or self._upnp is None:
            return
        try:
            host = IPv4Address(urlsplit(self._upnp.location).hostname or "")
        except AddressValueError:
            return  # a host name in LOCATION: sources cannot be checked, so do not listen
        _, pcp = await self._clients()
        listener = SsdpNotifyListener(host, pcp.local_address, self._ssdp_notified)
        if await listener.start():
            self._ssdp_listener = listener

    def _ssdp_notified(self, notify: SsdpNotify) -> None:
        client = self._upnp
        if client is None or notify.usn.split("::", 1)[0] not in client.udns:
            return  # another device on the same host (a media server on the router)
        if notify.nts == "ssdp:alive" and notify.location != client.location:
            self._upnp_seen_at = notify.location
        previous, self._upnp_boot = self._upnp_boot, notify.boot_id
        if previous is None or previous == notify.boot_id:
            return
        # UDA 1.1 §1.2.2: a new BOOTID means the device restarted, and an IGD that restarts
        # may have lost its mappings; the entry check at renewal would find out too late.
        log.warning("UPnP BOOTID %d -> %d: the gateway restarted; re-creating mappings",
                    previous, notify.boot_id)  # fmt: skip
        if len(self._recoveries) < MAX_RECOVERIES:
            task = asyncio.get_running_loop().create_task(self._recover_upnp())
            self._recoveries.add(task)
            task.add_done_callback(self._recoveries.discard)

    async def _recover_upnp(self) -> None:
        # The same random wait as for PCP (RFC 6887 §14.1.3): every client on the LAN heard
        # the same NOTIFY. The alive that follows a byebye arrives meanwhile, with LOCATION.
        await asyncio.sleep(_rng.uniform(0, self.recovery_delay))
        moved, self._upnp_seen_at = self._upnp_seen_at, ""
        if moved:
            try:  # the control URL changed with the restart (miniupnpd picks a new port)
                self._use_upnp(await UpnpIgdClient.connect(moved), self._upnp_boot)
            except PortMappingError as exc:
                log.warning("cannot read the restarted IGD at %s: %s", moved, exc)
        for mapping in self.mappings:
            if mapping.mechanism is Mechanism.UPNP:
                mapping.recover()

    def _announced(self, announcement: Announcement) -> None:
        log.debug("announcement from %s: %s", self.gateway, announcement)
        self._epoch(announcement.mechanism, announcement.epoch)

    def _pcp_unsolicited(self, response: PcpResponse) -> None:
        # RFC 6887 §14.2 Mapping Update or unicast ANNOUNCE: the epoch tells of a restart;
        # a new external address shows at the next renewal, which we bring forward.
        self._epoch(Mechanism.PCP, response.epoch)

    async def close(self) -> None:
        """Release every mapping, close the sockets."""
        await asyncio.gather(*(m.release() for m in list(self.mappings)), return_exceptions=True)
        for client in (self._natpmp, self._pcp):
            if client is not None:
                client.close()
        for task in list(self._recoveries):
            task.cancel()
        for listener in (self._listener, self._ssdp_listener):
            if listener is not None:
                listener.close()
        self._natpmp = self._pcp = None
        self._listener = self._ssdp_listener = None
