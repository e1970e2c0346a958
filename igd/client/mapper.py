"""`PortMapper`: one call gets a working mapping over PCP, NAT-PMP or UPnP, and a `Mapping`
(mapping.py) that keeps working; or an IPv6 pinhole (pinholes.py) over PCP or UPnP. The
mapper owns what is shared by every mapping on one gateway: the sockets, the drivers, and
the restart detection that re-creates them all (the PCP/NAT-PMP epoch rule, announcements
on 224.0.0.1:5350, the UPnP BOOTID in SSDP NOTIFY); the IPv6 side is `Ipv6Gateway`'s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType
from typing import Any, TypeVar

from igd.client.announce import Announcement, AnnouncementListener
from igd.client.calls import Exposed, MapCall, bounded, expose
from igd.client.discovery import default_gateway, default_routes, ssdp_search
from igd.client.errors import (
    GatewayTimeout,
    MappingRefused,
    NoGatewayError,
    PortMappingError,
)
from igd.client.held import EarlierRuns
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
from igd.client.network import NETWORK_CHECK, NetworkView, NetworkWatch, look
from igd.client.pcp import PcpClient
from igd.client.pinhole_calls import PinholeCalls
from igd.client.pinholes import (
    Ipv6Gateway,
    Pinhole,
)
from igd.client.probe import ProbeResult, probe, probe_routes, require_gateway
from igd.client.restart import UpnpRestartWatch
from igd.client.selection import DEFAULT_PREFERENCE
from igd.client.state import Memory, StateFile
from igd.client.timing import EpochRule, EpochTracker
from igd.client.upnp import UpnpEntry, UpnpIgdClient
from igd.model import Mechanism, Protocol
from igd.proto.pcp import NONCE_SIZE as PCP_NONCE_SIZE
from igd.proto.pcp import PcpResponse

log = logging.getLogger("igd.client")
T = TypeVar("T")

_rng = random.SystemRandom()  # recovery jitter; the OS source needs no seeding
MAX_MAPPINGS = 256  # per PortMapper by default (`max_mappings`): each holds a timer task
# Probe again after this long: RFC 6887 §9 retries a server of another PCP version after
# 30 minutes (it may have been upgraded), and other mechanisms may have come up meanwhile.
PROBE_MAX_AGE = 1800.0


class PortMapper(EarlierRuns, PinholeCalls):
    """Finds the gateway, picks the mechanism, makes and keeps mappings.

    `async with PortMapper() as pm: m = await pm.map(8080, "tcp")`. Every mapping still
    held is released when the block ends. A named `gateway` is the only one used; `prefer`
    orders the mechanisms, `disable` turns some off, `force` uses one without probing;
    `state` remembers mappings across runs (state.py). `gateway6` names the router asked
    for IPv6 pinholes (default: the IPv6 default route's).
    """

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
        max_mappings: int = MAX_MAPPINGS,
        gateway6: IPv6Address | str | None = None,
    ) -> None:
        if max_mappings < 1:
            raise ValueError("max_mappings must be positive")
        self.max_mappings = max_mappings
        """How many mappings this mapper holds at most (each one a renewal timer)."""
        self._by_port: dict[tuple[Protocol, int, int], Mapping[Any]] = {}
        """Held mappings and pinholes by (protocol, internal port, address family)."""
        self._gateway = IPv4Address(gateway) if gateway else None
        self.named_gateway = self._gateway is not None
        """True if the caller named the gateway: then no other device is used (SSDP)."""
        self.prefer = tuple(Mechanism(m) for m in prefer)
        off = {Mechanism(m) for m in disable}
        self.force = Mechanism(force) if force is not None else None
        if self.force is not None:
            if self.force in off:
                raise ValueError(f"{self.force.value} is both forced and disabled")
            self.mechanisms: tuple[Mechanism, ...] = (self.force,)
        else:
            self.mechanisms = tuple(m for m in self.prefer if m not in off)
        """The mechanisms this mapper may use, in order of preference."""
        if not self.mechanisms:
            raise ValueError("every mechanism is disabled")
        self.probe_timeout = probe_timeout
        self.request_timeout = request_timeout
        """Bound on one create or renewal, retransmissions included."""
        if state is None or isinstance(state, StateFile):
            self.state = state
        else:
            self.state = StateFile(state)
        self.wall_clock: Callable[[], float] = time.time
        self.network_check = network_check
        self.pcp_addresses = tuple(IPv4Address(a) for a in pcp_addresses)
        """The PCP server's other addresses (RFC 7488 §3), tried when one does not answer."""
        """Seconds between checks for a new default route or local address (None: never)."""
        self._watcher: NetworkWatch | None = None
        self._probed_at = 0.0
        self.recovery_delay = recovery_delay
        """RFC 6887 §14.1.3 and RFC 6886 §3.7: wait a random 0..this many seconds."""
        self.listen = listen
        self.clock: Callable[[], float] = lambda: asyncio.get_running_loop().time()
        self.mappings: list[Mapping[Any]] = []
        self.last_probe: ProbeResult | None = None
        self._natpmp: NatPmpClient | None = None
        self._pcp: PcpClient | None = None
        self._upnp: UpnpIgdClient | None = None
        self._upnp_driver: UpnpDriver | None = None
        self._listener: AnnouncementListener | None = None
        self._restarts = UpnpRestartWatch(
            client=lambda: self._upnp, reconnect=self._reconnect_upnp,
            recover=self._recover_upnp, delay=lambda: _rng.uniform(0, self.recovery_delay),
        )  # fmt: skip
        self._epochs = {
            Mechanism.PCP: EpochTracker(EpochRule.PCP),
            Mechanism.NATPMP: EpochTracker(EpochRule.NATPMP),
        }
        self._lock = asyncio.Lock()
        self.six = Ipv6Gateway(
            gateway6, restarted=self._six_restarted, clock=lambda: self.clock(), listen=listen,
            probe_timeout=probe_timeout,
        )  # fmt: skip
        """The IPv6 side: the router pinholes are asked of, its clients and epoch."""
        self.memory = Memory(self.state, lambda: self.wall_clock())

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
            self._pcp = PcpClient(self.gateway, also=self.pcp_addresses)
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

    async def probe(self, *, refresh: bool = False, timeout: float | None = None) -> ProbeResult:
        """Probe every enabled mechanism at once (cached unless `refresh`)."""
        return await bounded(self._probe(refresh, timeout), timeout, "probe")

    async def _probe(self, refresh: bool, timeout: float | None) -> ProbeResult:
        budget = self.probe_timeout if timeout is None else min(self.probe_timeout, timeout)
        async with self._lock:
            stale = self.clock() - self._probed_at > PROBE_MAX_AGE
            if self.last_probe is None or refresh or stale:
                result = None
                if not self.named_gateway and not self.mappings:
                    result = await self._probe_default_routes(budget)
                if result is None:
                    natpmp, pcp = await self._clients()
                    result = await probe(
                        self.gateway, natpmp=natpmp, pcp=pcp, mechanisms=self.mechanisms,
                        budget=budget, only_gateway=self.named_gateway,
                    )  # fmt: skip
                for report in result.reports:
                    if report.epoch is not None and report.mechanism in self._epochs:
                        # Through the epoch test: a probe that finds the gateway restarted
                        # re-creates the mappings, as an answer or announcement would.
                        self._epoch(report.mechanism, report.epoch)
                if result.upnp is not None and self._upnp is None:
                    boot = (r.boot_id for r in result.ssdp if r.location == result.upnp.location)
                    self._use_upnp(result.upnp, next(boot, None))
                self.last_probe, self._probed_at = result, self.clock()
            return self.last_probe

    async def _probe_default_routes(self, budget: float) -> ProbeResult | None:
        """With several default routes, probe every route's gateway and switch to the best."""
        routes = list(dict.fromkeys(c.address for c in default_routes()))
        if len(routes) < 2:
            return None
        best = await probe_routes(routes, self.mechanisms, budget)
        if best is not None and best.gateway != self._gateway:
            self._switch(best.gateway)
        return best

    def _switch(self, gateway: IPv4Address | None) -> None:
        """Drop what belongs to the current gateway and local address (sockets, listeners,
        the UPnP device, epochs, the probe); the next call opens them again for `gateway`."""
        for client in (self._natpmp, self._pcp):
            if client is not None:
                client.close()
        if self._listener is not None:
            self._listener.close()
        self._natpmp = self._pcp = None
        self._listener = None
        self._upnp = self._upnp_driver = None
        self._restarts.reset()
        for tracker in self._epochs.values():
            tracker.server = tracker.client = None
        self.last_probe = None
        self._gateway = gateway

    # -- a change of network ---------------------------------------------------------------

    def _look(self) -> NetworkView:
        view = look(self._gateway if self.named_gateway else None)
        if any(m.family == 6 for m in self.mappings):
            router6, source6 = self.six.look()
            view = replace(view, router6=router6, source6=source6)
        return view

    def _watch_network(self) -> None:
        if self.network_check is not None and self._watcher is None:
            self._watcher = NetworkWatch(
                self._look, self._moved, lambda: bool(self.mappings), self.network_check
            )
        if self._watcher is not None:
            self._watcher.start()

    async def _moved(self, before: NetworkView, now: NetworkView) -> None:
        """Re-make what the change concerns: pinholes for a new IPv6 router or address (not
        for the first pinhole after IPv4 mappings alone), mappings for a new IPv4 view."""
        if before.router6 is not None and (before.router6, before.source6) != (
            now.router6, now.source6,
        ):  # fmt: skip
            await self._move_pinholes(now.source6)
        if (before.route, before.source) != (now.route, now.source):
            await self._move_mappings(now)

    async def _move_mappings(self, now: NetworkView) -> None:
        """Re-make every mapping over the gateway and local address in use now."""
        async with self._lock:
            self._switch(self._gateway if self.named_gateway else now.route)
        if self._gateway is None:
            return  # no route: the keepers' renewals fail until the watcher sees one
        result = await self.probe()
        require_gateway(result)
        local = await self.local_address()
        for mapping in list(self.mappings):
            if mapping.family == 4:  # pinholes move with the IPv6 view (_move_pinholes)
                driver = await self.driver(result.choice.mechanism or mapping.mechanism)
                mapping.move(driver, local)

    async def external_address(self, *, timeout: float | None = None) -> IPv4Address:
        """The external address of the chosen mechanism."""
        result = await self.probe(timeout=timeout)
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
                self.gateway, local=pcp.local_address, budget=self.probe_timeout,
                only_gateway=self.named_gateway,
            )  # fmt: skip
            if not replies:
                raise NoGatewayError(f"no UPnP IGD answered SSDP (gateway {self.gateway})")
            client = await UpnpIgdClient.connect(replies[0].location, server=replies[0].server)
            self._use_upnp(client, replies[0].boot_id)
        assert self._upnp is not None
        return self._upnp

    def _use_upnp(self, client: UpnpIgdClient, boot_id: int | None) -> None:
        self._upnp, self._restarts.boot = client, boot_id
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
        if mechanism is Mechanism.PCP and (not fallback or Mechanism.NATPMP not in self.mechanisms):
            return PcpDriver(pcp)
        return PxpDriver(PcpDriver(pcp), NatPmpDriver(natpmp))

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
        nonce: bytes | None = None,
    ) -> MapCall[Mapping[IPv4Address]]:
        """Get a mapping and keep it alive. `external_port` is a suggestion unless `exact`;
        `via` forces a mechanism (otherwise the probe's choice, then the others ranked);
        `timeout` bounds the whole call; `nonce` (12 bytes) is the PCP nonce of a new
        mapping (default: random), so a caller that kept it renews an earlier run's mapping.
        Mapping an internal port this mapper (or, with a state file, an earlier run) already
        maps refreshes and returns that mapping."""
        if nonce is not None and len(nonce) != PCP_NONCE_SIZE:
            raise ValueError(f"a PCP nonce is {PCP_NONCE_SIZE} bytes")
        work = self._map(
            internal_port, Protocol(protocol), external_port, lifetime, description,
            Mechanism(via) if via is not None else self.force, exact, nonce,
        )  # fmt: skip
        return MapCall(bounded(work, timeout, f"map {internal_port}/{protocol}"))

    async def _map(
        self,
        internal_port: int,
        protocol: Protocol,
        external_port: int | None,
        lifetime: int,
        description: str,
        via: Mechanism | None,
        exact: bool,
        nonce: bytes | None = None,
    ) -> Mapping[IPv4Address]:
        if not 0 < internal_port < 65536 or lifetime <= 0:
            raise ValueError("internal_port must be 1..65535 and lifetime positive")
        if via is not None and via not in self.mechanisms:
            raise ValueError(f"{via.value} is disabled on this PortMapper")
        # One mapping per internal port: a second PCP request with a new nonce is refused
        # (RFC 6887 §11.1 ties the mapping to its nonce), so refresh the one held instead.
        held = await self._refresh_held(protocol, internal_port, 4, via, lifetime, description)
        if held is not None:
            return held
        _, pcp = await self._clients()
        spec = MapSpec(
            protocol, internal_port, pcp.local_address, lifetime,
            external_port, exact, description, nonce,
        )  # fmt: skip
        resumed = await self._resume_stored(spec, via)
        if resumed is not None:
            return resumed
        if via is not None:
            drivers = [await self.driver(via, fallback=False)]
        else:
            result = await self.probe()
            require_gateway(result)
            order = list(result.choice.ranked)
            if Mechanism.PCP in order and Mechanism.NATPMP in order:
                order.remove(Mechanism.NATPMP)  # the PCP driver falls back to it
            drivers = [await self.driver(m) for m in order]
        return await self._first_grant(drivers, spec)

    async def expose(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        lifetime: int = 7200,
        description: str = "",
        timeout: float | None = None,
    ) -> Exposed:
        """Both families at once: a mapping (IPv4) and a pinhole (IPv6) to `internal_port`.
        A family that fails is left out, its error in `errors`; raises only if both fail."""
        return await expose(
            self.map(internal_port, protocol, lifetime=lifetime, description=description),
            self.pinhole(internal_port, protocol, lifetime=lifetime, description=description),
            timeout,
        )

    async def _refresh_held(
        self,
        protocol: Protocol,
        internal_port: int,
        family: int,
        via: Mechanism | None,
        lifetime: int,
        description: str,
    ) -> Mapping[Any] | None:
        """The mapping (or pinhole) of this internal port held already, refreshed."""
        # One mapping per internal port: a second PCP request with a new nonce is refused
        # (RFC 6887 §11.1 ties the mapping to its nonce), so refresh the one held instead.
        held = self._by_port.get((protocol, internal_port, family))
        if held is not None:
            if via is None or via is held.mechanism:
                held.spec = replace(held.spec, lifetime=lifetime, description=description)
                await held.renew()
                return held
            await held.release()
        if len(self.mappings) >= self.max_mappings:
            raise ValueError(f"a PortMapper holds at most {self.max_mappings} mappings")
        return None

    async def _first_grant(self, drivers: list[Driver], spec: MapSpec) -> Mapping[Any]:
        error: PortMappingError | None = None
        for driver in drivers:
            try:
                grant = await self._create(driver, spec, None)
            except MappingRefused as exc:
                if exc.advice.value in ("other-mechanism",):
                    error = exc
                    continue
                raise  # the gateway answered no: its policy holds whatever the mechanism
            except PortMappingError as exc:
                error = exc
                continue
            return await self._adopt(driver, spec, grant)
        raise error or NoGatewayError("no mechanism available")

    async def _create(self, driver: Driver, spec: MapSpec, previous: Grant | None) -> Grant:
        try:
            async with asyncio.timeout(self.request_timeout):
                return await driver.create(spec, previous)
        except TimeoutError:
            raise GatewayTimeout(f"no answer over {driver.name}") from None

    async def _adopt(self, driver: Driver, spec: MapSpec, grant: Grant) -> Mapping[Any]:
        self.note_epoch(grant)
        if grant.mechanism is Mechanism.UPNP and spec.internal_address.version == 4:
            if self.listen:  # listen for the IGD's NOTIFY once a UPnP mapping exists
                await self._restarts.start(await self.local_address())
        kind = Pinhole if spec.internal_address.version == 6 else Mapping
        mapping = kind(self, driver, spec, grant)
        self.mappings.append(mapping)
        self._by_port[mapping.protocol, mapping.internal_port, mapping.family] = mapping
        if self.state is not None:
            gateway = self._gateway_of(spec)
            mapping.subscribe(lambda event: self.memory.remember(gateway, mapping, event))
        mapping._start()
        mapping._emit(EventKind.CREATED)
        self._watch_network()
        return mapping

    async def list(self, *, timeout: float | None = None) -> list[UpnpEntry]:
        """The router's UPnP mapping list (all hosts)."""

        async def work() -> list[UpnpEntry]:
            return await (await self.upnp()).list_mappings()

        return await bounded(work(), timeout, "UPnP list")

    def forget(self, mapping: Mapping[Any]) -> None:
        with contextlib.suppress(ValueError):
            self.mappings.remove(mapping)
        key = (mapping.protocol, mapping.internal_port, mapping.family)
        if self._by_port.get(key) is mapping:
            del self._by_port[key]

    def note_epoch(self, grant: Grant) -> None:
        if grant.epoch is None:
            return
        if grant.external_address.version == 6:
            self.six.observe(grant.epoch)  # the IPv6 server's epoch, apart from the IPv4 one
        elif grant.mechanism in self._epochs:
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
            if mapping.mechanism in (Mechanism.PCP, Mechanism.NATPMP) and mapping.family == 4:
                mapping.recover(_rng.uniform(0, self.recovery_delay))

    async def _reconnect_upnp(self, location: str) -> None:
        self._use_upnp(await UpnpIgdClient.connect(location), self._restarts.boot)

    def _recover_upnp(self) -> None:
        """The IGD restarted: re-create every UPnP mapping and pinhole."""
        self.six.forget_upnp()  # its IPv6 control URL may have moved too
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
        self._restarts.close()
        if self._watcher is not None:
            await self._watcher.close()
        if self._listener is not None:
            self._listener.close()
        self._natpmp = self._pcp = None
        self._listener = None
        self.six.close()
