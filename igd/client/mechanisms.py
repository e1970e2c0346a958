"""One interface over the three mechanisms: create or renew a mapping, delete it, check it.
`PxpDriver` is the automatic choice on port 5351: PCP first on every request, NAT-PMP only
after an "unsupported version" naming version 0 (RFC 6886 §1.1, RFC 6887 §9)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Protocol as TypingProtocol

from igd.client.errors import (
    InvalidRequest,
    MappingRefused,
    NoSuchMapping,
    PortUnavailable,
    UnsupportedVersion,
)
from igd.client.natpmp import NatPmpClient
from igd.client.pcp import PcpClient, new_nonce
from igd.client.upnp import UpnpIgdClient, choose_port
from igd.model import Mechanism, Protocol
from igd.proto.pcp import PcpResult

# Suggested ports come from the OS's generator. SystemRandom keeps no state of its own, yet
# each instance carries Random's ~2.5 kB table: one for all drivers, since every mapping has a
# driver and a gateway may hold thousands (the double-NAT mirror, docs/performance.md).
SYSTEM_RANDOM = random.SystemRandom()

log = logging.getLogger("igd.client")


@dataclass(frozen=True, slots=True)
class MapSpec:
    """What the application asked for."""

    protocol: Protocol
    internal_port: int
    internal_address: IPv4Address | IPv6Address
    """This host's address: IPv4 for a mapping, IPv6 for a pinhole."""
    lifetime: int
    external_port: int | None = None
    exact: bool = False
    description: str = ""
    nonce: bytes | None = None
    """The PCP nonce a new mapping gets (None: a random one)."""
    remote: tuple[IPv6Network, int] | None = None
    """Pinholes: the only remote peers let in (prefix, port 0 for any); None lets in all."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What the gateway granted. `lifetime` 0 is a permanent UPnP lease. For a pinhole the
    external address and port are those reachable from outside (the internal ones)."""

    mechanism: Mechanism
    external_address: IPv4Address | IPv6Address
    external_port: int
    lifetime: int
    epoch: int | None = None
    nonce: bytes | None = None
    notes: tuple[str, ...] = field(default=())
    unique_id: int | None = None
    """UPnP pinholes: the UniqueID that UpdatePinhole and DeletePinhole take."""


class Driver(TypingProtocol):
    """A mechanism as the mapper uses it."""

    name: str

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        """Create the mapping, or renew `previous` (same port and nonce asked again)."""
        ...

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        """Delete the mapping."""
        ...

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        """Whether the gateway still holds the mapping as granted (when it can tell)."""
        ...


def _suggest(spec: MapSpec, previous: Grant | None, rng: random.Random) -> int:
    # Renewals ask for the port they hold (RFC 6886 §3.3, RFC 6887 §11.2.1). Never 0:
    # RouterOS refuses a NAT-PMP suggestion of 0 (Tailscale #13785).
    if previous is not None:
        return previous.external_port
    return choose_port(spec.internal_port, spec.external_port, rng)


class NatPmpDriver:
    """NAT-PMP only."""

    name = "natpmp"

    def __init__(self, client: NatPmpClient) -> None:
        self.client = client
        self.rng: random.Random = SYSTEM_RANDOM
        self.address: IPv4Address | None = None

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        port = _suggest(spec, previous, self.rng)
        got = await self.client.map(spec.protocol, spec.internal_port, port, spec.lifetime)
        if spec.exact and got.external_port != port:
            await self.client.unmap(spec.protocol, spec.internal_port)
            raise PortUnavailable(
                f"NAT-PMP gateway offered port {got.external_port}, not {port}",
                mechanism=Mechanism.NATPMP,
            )
        if self.address is None or previous is None:
            self.address = (await self.client.external_address()).address
        return Grant(Mechanism.NATPMP, self.address, got.external_port, got.lifetime, got.epoch)

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        await self.client.unmap(spec.protocol, spec.internal_port, attempts=4)

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        return True  # NAT-PMP cannot read a mapping back; the epoch tells of state loss


class PcpDriver:
    """PCP only; one nonce per mapping, kept across renewals (RFC 6887 §11.2.1)."""

    name = "pcp"

    def __init__(self, client: PcpClient) -> None:
        self.client = client
        self.rng: random.Random = SYSTEM_RANDOM
        self.pad_description = False

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        nonce = previous.nonce if previous and previous.nonce else spec.nonce or new_nonce()
        description = spec.description or None
        if description and self.pad_description:
            description = padded(description)
        try:
            return await self._map(spec, previous, nonce, description)
        except InvalidRequest as exc:
            # miniupnpd 2.3.1 answers MALFORMED_OPTION to a DESCRIPTION whose length is not
            # a multiple of 4 (it counts the padding); pad the text with spaces instead.
            if exc.code != PcpResult.MALFORMED_OPTION or not description:
                raise
            if padded(description) == description:
                raise
            self.pad_description = True
            return await self._map(spec, previous, nonce, padded(description))

    async def _map(
        self, spec: MapSpec, previous: Grant | None, nonce: bytes, description: str | None
    ) -> Grant:
        got = await self.client.map(
            spec.protocol,
            spec.internal_port,
            spec.lifetime,
            nonce=nonce,
            external_port=_suggest(spec, previous, self.rng),
            external_address=_v4(previous.external_address) if previous else None,
            prefer_failure=spec.exact,
            description=description,
        )
        return Grant(
            Mechanism.PCP, got.external_address, got.external_port, got.lifetime, got.epoch, nonce
        )

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        assert grant.nonce is not None
        await self.client.unmap(spec.protocol, spec.internal_port, nonce=grant.nonce)

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        return True  # the epoch and Mapping Updates tell of state loss


class PxpDriver:
    """PCP, falling back to NAT-PMP per request when the server names version 0."""

    name = "pcp/natpmp"

    def __init__(self, pcp: PcpDriver, natpmp: NatPmpDriver) -> None:
        self.pcp = pcp
        self.natpmp = natpmp

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        try:
            return await self.pcp.create(
                spec, previous if previous and previous.mechanism is Mechanism.PCP else None
            )
        except UnsupportedVersion as exc:
            if exc.version != 0:
                raise
        except MappingRefused:
            if previous is None or previous.mechanism is not Mechanism.NATPMP:
                raise
            # The server now speaks PCP but will not take over our NAT-PMP mapping (nonce
            # rules differ): keep renewing it over NAT-PMP.
            log.debug("PCP refused to take over a NAT-PMP mapping; renewing over NAT-PMP")
        held = previous if previous and previous.mechanism is Mechanism.NATPMP else None
        return await self.natpmp.create(spec, held)

    def _driver(self, grant: Grant) -> PcpDriver | NatPmpDriver:
        return self.pcp if grant.mechanism is Mechanism.PCP else self.natpmp

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        await self._driver(grant).delete(spec, grant)

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        return await self._driver(grant).verify(spec, grant)


class UpnpDriver:
    """UPnP IGD; renewals re-add the same port, and the entry is read back before."""

    name = "upnp"

    def __init__(self, client: UpnpIgdClient) -> None:
        self.client = client

    async def create(self, spec: MapSpec, previous: Grant | None) -> Grant:
        if previous is not None:
            await self.client.add_port_mapping(
                previous.external_port,
                spec.protocol,
                spec.internal_port,
                ipv4(spec),
                lease=previous.lifetime,
                description=spec.description,
            )
            port, lease, notes = previous.external_port, previous.lifetime, previous.notes
        else:
            got = await self.client.add_mapping(
                spec.protocol,
                spec.internal_port,
                ipv4(spec),
                external_port=spec.external_port,
                lease=spec.lifetime,
                description=spec.description,
                exact=spec.exact,
            )
            port, lease, notes = got.external_port, got.lease, got.notes
        address = await self.client.external_address()
        return Grant(Mechanism.UPNP, address, port, lease, notes=notes)

    async def delete(self, spec: MapSpec, grant: Grant) -> None:
        try:
            await self.client.delete_port_mapping(grant.external_port, spec.protocol)
        except NoSuchMapping:
            pass  # gone already: what we wanted

    async def verify(self, spec: MapSpec, grant: Grant) -> bool:
        try:
            entry = await self.client.get_specific_port_mapping_entry(
                grant.external_port, spec.protocol
            )
        except NoSuchMapping:
            return False
        return (entry.internal_client, entry.internal_port) == (
            str(spec.internal_address), spec.internal_port,
        )  # fmt: skip


def ipv4(spec: MapSpec) -> IPv4Address:
    """The internal address of a mapping (IPv4 drivers are never given a pinhole)."""
    if not isinstance(spec.internal_address, IPv4Address):
        raise TypeError(f"an IPv4 mechanism was asked for {spec.internal_address}")
    return spec.internal_address


def _v4(address: IPv4Address | IPv6Address) -> IPv4Address | None:
    return address if isinstance(address, IPv4Address) else None


def padded(text: str) -> str:
    """`text` padded with spaces to a multiple of 4 octets."""
    return text + " " * (-len(text.encode()) % 4)
