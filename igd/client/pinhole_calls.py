"""`PortMapper`'s IPv6 calls: `pinhole()` (PCP over IPv6, then UPnP
WANIPv6FirewallControl), `probe_ipv6()`, and re-opening pinholes when the IPv6 router lost
its state. A mixin of `PortMapper`."""

from __future__ import annotations

import random
from ipaddress import IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Any

from igd.client.calls import MapCall, bounded
from igd.client.mapping import Mapping
from igd.client.mechanisms import Driver, MapSpec
from igd.client.pinholes import PINHOLE_MECHANISMS, Ipv6Gateway, Ipv6Report, Pinhole, remote_peers
from igd.model import Mechanism, Protocol

_rng = random.SystemRandom()  # recovery jitter; the OS source needs no seeding


class PinholeCalls:
    """The IPv6 half of `PortMapper` (see the module docstring)."""

    six: Ipv6Gateway
    mechanisms: tuple[Mechanism, ...]
    force: Mechanism | None
    mappings: list[Mapping[Any]]
    recovery_delay: float

    if TYPE_CHECKING:  # supplied by PortMapper

        async def _refresh_held(
            self,
            protocol: Protocol,
            internal_port: int,
            family: int,
            via: Mechanism | None,
            lifetime: int,
            description: str,
        ) -> Mapping[Any] | None: ...

        async def _resume_stored(
            self, spec: MapSpec, via: Mechanism | None
        ) -> Mapping[Any] | None: ...

        async def _first_grant(self, drivers: list[Driver], spec: MapSpec) -> Mapping[Any]: ...

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
    ) -> MapCall[Pinhole]:
        """Open an IPv6 pinhole to this host's global address and `internal_port` and keep it
        open (PCP over IPv6 first, then UPnP WANIPv6FirewallControl; `via` forces one).
        `remote` (an address, or a prefix over PCP) and `remote_port` let in only those
        peers: PCP FILTER, UPnP RemoteHost/RemotePort."""
        work = self._pinhole(
            internal_port, Protocol(protocol), lifetime, description,
            Mechanism(via) if via is not None else self.force, remote_peers(remote, remote_port),
        )  # fmt: skip
        return MapCall(bounded(work, timeout, f"pinhole {internal_port}/{protocol}"))

    def _pinhole_mechanisms(self) -> tuple[Mechanism, ...]:
        return tuple(m for m in self.mechanisms if m in PINHOLE_MECHANISMS)

    async def _pinhole(
        self,
        internal_port: int,
        protocol: Protocol,
        lifetime: int,
        description: str,
        via: Mechanism | None,
        remote: tuple[IPv6Network, int] | None = None,
    ) -> Pinhole:
        if not 0 < internal_port < 65536 or lifetime <= 0:
            raise ValueError("internal_port must be 1..65535 and lifetime positive")
        mechanisms = self._pinhole_mechanisms()
        if remote is not None and 0 < remote[0].prefixlen < 128:
            # WANIPv6FirewallControl's RemoteHost is one address or any: only PCP's FILTER
            # takes a prefix (RFC 6887 §13.3).
            mechanisms = tuple(m for m in mechanisms if m is Mechanism.PCP)
        if via is not None and via not in mechanisms:
            raise ValueError(f"{via.value} cannot open this pinhole on this PortMapper")
        held = await self._refresh_held(protocol, internal_port, 6, via, lifetime, description)
        if held is None:
            spec = MapSpec(
                protocol, internal_port, self.six.local_address, lifetime, None, True,
                description, remote=remote,
            )  # fmt: skip
            held = await self._resume_stored(spec, via)
        if held is None:
            drivers = await self.six.drivers(mechanisms, via)
            held = await self._first_grant(drivers, spec)
        assert isinstance(held, Pinhole)
        return held

    async def probe_ipv6(
        self, *, refresh: bool = False, timeout: float | None = None
    ) -> Ipv6Report:
        """What the IPv6 router offers for pinholes: PCP over IPv6, UPnP pinholes, the
        firewall's status (cached unless `refresh`)."""
        work = self.six.probe(self._pinhole_mechanisms(), refresh=refresh)
        return await bounded(work, timeout, "IPv6 probe")

    def _six_restarted(self, mechanism: Mechanism) -> None:
        for mapping in self.mappings:
            if mapping.mechanism is mechanism and mapping.family == 6:
                mapping.recover(_rng.uniform(0, self.recovery_delay))

    async def _move_pinholes(self, source: IPv6Address | None) -> None:
        """Re-open every pinhole from the IPv6 router and global address in use now (a new
        network, or the LAN renumbered), each over its own mechanism."""
        self.six.reset()
        if source is None:
            return  # no IPv6 route or address: renewals fail until the watcher sees one
        for pinhole in [m for m in self.mappings if m.family == 6]:
            # Its own mechanism (maybe forced by `via`): if the router does not offer it yet
            # (its UPnP still at the old address), the error makes the watch try again.
            pinhole.move(await self.six.driver(pinhole.mechanism), source)
