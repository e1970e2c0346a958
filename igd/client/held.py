"""What earlier runs left in the state file, as `PortMapper` uses it: refreshing a mapping
or pinhole an earlier run made (same mechanism, port and PCP nonce or UniqueID), deleting
one, `stored()` and `unmap()`. A mixin of `PortMapper`, which supplies the drivers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from igd.client.calls import bounded
from igd.client.errors import (
    GatewayTimeout,
    MappingRefused,
    NoGatewayError,
    NoSuchMapping,
    PortMappingError,
)
from igd.client.mapping import Mapping
from igd.client.mechanisms import Driver, Grant, MapSpec
from igd.client.pinholes import Ipv6Gateway
from igd.client.state import Memory, Record
from igd.model import Mechanism, Protocol

log = logging.getLogger("igd.client")

REFRESHED = "refreshed the mapping of an earlier run (state file)"


class EarlierRuns:
    """The state-file half of `PortMapper` (see the module docstring)."""

    memory: Memory
    six: Ipv6Gateway
    request_timeout: float
    mappings: list[Mapping[Any]]

    if TYPE_CHECKING:  # supplied by PortMapper

        @property
        def gateway(self) -> IPv4Address: ...

        async def local_address(self) -> IPv4Address: ...

        async def driver(self, mechanism: Mechanism, *, fallback: bool = True) -> Driver: ...

        async def _create(self, driver: Driver, spec: MapSpec, previous: Grant | None) -> Grant: ...

        async def _adopt(self, driver: Driver, spec: MapSpec, grant: Grant) -> Mapping[Any]: ...

    async def _resume_stored(self, spec: MapSpec, via: Mechanism | None) -> Mapping[Any] | None:
        stored = self.memory.find(self._gateway_of(spec), spec)
        if stored is None:
            return None
        if via is None or via is stored.mechanism:
            return await self._resume(spec, stored)
        await self._delete_stored(spec, stored)
        return None

    def _gateway_of(self, spec: MapSpec) -> str:
        """The state file's name for the gateway of a mapping (IPv4) or a pinhole (IPv6)."""
        if spec.internal_address.version == 6:
            return str(self.six.router.address)
        return str(self.gateway)

    async def _resume(self, spec: MapSpec, record: Record) -> Mapping[Any] | None:
        """Refresh a mapping an earlier run made (same mechanism, port and PCP nonce)."""
        try:
            driver = await self._driver_for(spec, record.mechanism)
            grant = await self._create(driver, spec, record.grant())
        except GatewayTimeout:
            raise
        except (MappingRefused, NoGatewayError) as exc:
            log.info(
                "cannot refresh %s %d/%s of an earlier run (%s); mapping afresh",
                record.mechanism.value, spec.internal_port, spec.protocol.value, exc,
            )  # fmt: skip
            return None
        return await self._adopt(driver, spec, replace(grant, notes=(*grant.notes, REFRESHED)))

    async def _delete_stored(self, spec: MapSpec, record: Record, *, strict: bool = False) -> None:
        """Delete a mapping an earlier run made, and its record. `strict`: a failure is
        raised and the record kept (unmap); otherwise it is logged (a mapping replaced)."""
        try:
            driver = await self._driver_for(spec, record.mechanism)
            try:
                async with asyncio.timeout(self.request_timeout):
                    await driver.delete(spec, record.grant())
            except TimeoutError:
                raise GatewayTimeout(f"no answer to the delete over {driver.name}") from None
            except NoSuchMapping:
                pass  # gone already (expired, or the gateway restarted): what we wanted
        except PortMappingError as exc:
            if strict:
                raise
            log.info("could not delete the %s mapping of an earlier run: %s",
                     record.mechanism.value, exc)  # fmt: skip
        self.memory.forget(record.key)

    async def _driver_for(self, spec: MapSpec, mechanism: Mechanism) -> Driver:
        if spec.internal_address.version == 6:
            return await self.six.driver(mechanism)
        return await self.driver(mechanism, fallback=False)

    def stored(self) -> list[Record]:
        """This gateway's records in the state file (every mechanism, live leases only),
        and the IPv6 router's pinholes."""
        gateways = {str(self.gateway)}
        with contextlib.suppress(NoGatewayError):
            gateways.add(str(self.six.router.address))
        return self.memory.records(gateways)

    async def unmap(
        self,
        internal_port: int,
        protocol: Protocol | str = Protocol.TCP,
        *,
        timeout: float | None = None,
        family: int = 4,
    ) -> bool:
        """Delete the mapping of `internal_port` this mapper holds, or the one an earlier
        run left in the state file; False if neither knew one. `family=6`: the pinhole."""
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        work = self._unmap(internal_port, Protocol(protocol), family)
        return await bounded(work, timeout, "unmap")

    async def _unmap(self, internal_port: int, protocol: Protocol, family: int) -> bool:
        for mapping in self.mappings:
            if (mapping.protocol, mapping.internal_port, mapping.family) == (
                protocol, internal_port, family,
            ):  # fmt: skip
                await mapping.release()
                return True
        local = self.six.local_address if family == 6 else await self.local_address()
        spec = MapSpec(protocol, internal_port, local, 1)
        record = self.memory.find(self._gateway_of(spec), spec)
        if record is None:
            return False
        await self._delete_stored(spec, record, strict=True)
        return True
