"""UPnP IGD client on async-upnp-client: the WAN*Connection service picked by status and
external address, every port-mapping action including those its IGD profile lacks
(AddAnyPortMapping, DeletePortMappingRange, GetListOfPortMappings), leases sent whole,
and the router quirks of docs/client.md handled."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address
from typing import Any

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import (
    UpnpActionError,
    UpnpCommunicationError,
    UpnpError,
)
from defusedxml import DefusedXmlException, ElementTree  # type: ignore[import-untyped,unused-ignore]

from igd.client.errors import (
    GatewayTimeout,
    InvalidRequest,
    MappingRefused,
    NoSuchMapping,
    OutOfResources,
    PortMappingError,
    PortUnavailable,
    ProtocolError,
    Unsupported,
    upnp_error,
)
from igd.client.selection import AddressKind, classify
from igd.model import Mechanism, Protocol
from igd.proto.description import MAX_LEASE_V2

WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
SERVICE_TYPES = (WANIP2, WANIP1, WANPPP1)
MAX_LIST = 1024  # entries read by list_mappings(), a bound on a misbehaving router
MAX_PORT_TRIES = 8  # random ports tried after a conflict, when the caller left it open
LOW_PORTS = 1024


@dataclass(frozen=True, slots=True)
class UpnpEntry:
    """One port mapping as the router lists it."""

    remote_host: str
    external_port: int
    protocol: str
    internal_port: int
    internal_client: str
    enabled: bool
    description: str
    lease: int


@dataclass(frozen=True, slots=True)
class UpnpGrant:
    """What an add got: the external port and the lease actually requested (0: permanent)."""

    external_port: int
    lease: int
    notes: tuple[str, ...] = ()


def choose_port(internal_port: int, external_port: int | None, rng: random.Random) -> int:
    """The port to ask for: the caller's, else the internal port if >= 1024, else a random
    one >= 1024 (port 0 means "all ports" to IGD, and many routers refuse low ports)."""
    if external_port:
        return external_port
    if internal_port >= LOW_PORTS:
        return internal_port
    return rng.randrange(LOW_PORTS, 65536)


class UpnpIgdClient:
    """One WAN*Connection service of one IGD."""

    def __init__(self, service: Any, location: str, *, server: str = "") -> None:
        self.service = service
        self.location = location
        self.server = server
        self.rng = random.SystemRandom()

    @property
    def service_type(self) -> str:
        return str(self.service.service_type)

    @property
    def version(self) -> int:
        return 2 if self.service_type == WANIP2 else 1

    @property
    def udns(self) -> frozenset[str]:
        """The UDNs ("uuid:...") of the device tree holding the service, root included:
        what the USN of this device's SSDP messages starts with."""
        root = self.service.device.root_device
        return frozenset(str(d.udn) for d in (root, *root.all_devices))

    def has(self, action: str) -> bool:
        """Whether the service description lists `action`."""
        return bool(self.service.has_action(action))

    @classmethod
    async def connect(
        cls, location: str, *, http_timeout: float = 3.0, server: str = ""
    ) -> UpnpIgdClient:
        """Read the description at `location` and pick the best WAN*Connection service:
        connected with a public address, then connected, then the first (as miniupnpc)."""
        factory = UpnpFactory(AiohttpRequester(timeout=int(max(1, http_timeout))), non_strict=True)
        try:
            device = await factory.async_create_device(location)
        except (UpnpError, OSError, TimeoutError) as exc:
            raise GatewayTimeout(f"cannot read the IGD description at {location}: {exc}") from exc
        services = [s for s in device.all_services if s.service_type in SERVICE_TYPES]
        if not services:
            found = ", ".join(s.service_type for s in device.all_services) or "none"
            raise Unsupported(
                f"{location} has no WANIPConnection or WANPPPConnection service ({found})",
                mechanism=Mechanism.UPNP,
            )
        services.sort(key=lambda s: SERVICE_TYPES.index(s.service_type))
        scored: list[tuple[int, int, UpnpIgdClient]] = []
        for index, service in enumerate(services):
            client = cls(service, location, server=server)
            scored.append((await client._score(), index, client))
        return min(scored, key=lambda item: item[:2])[2]

    async def _score(self) -> int:
        try:
            up = (await self.status()) in ("Connected", "Up")
        except PortMappingError:
            up = True  # some routers lack GetStatusInfo; do not hold it against them
        try:
            kind = classify(await self.external_address())
        except PortMappingError:
            kind = AddressKind.UNSPECIFIED
        if up and kind is AddressKind.PUBLIC:
            return 0
        if up and kind is not AddressKind.UNSPECIFIED:
            return 1
        return 2 if up else 3

    async def call(self, action: str, **arguments: Any) -> Mapping[str, Any]:
        """Call an action; a typed error for a SOAP fault, GatewayTimeout if unreachable."""
        if not self.has(action):
            raise Unsupported(
                f"UPnP {action}: not offered by {self.service_type}", mechanism=Mechanism.UPNP
            )
        try:
            result: Mapping[str, Any] = await self.service.action(action).async_call(**arguments)
        except UpnpActionError as exc:
            raise upnp_error(exc.error_code, exc.error_desc, action) from exc
        except (UpnpCommunicationError, OSError, TimeoutError) as exc:
            raise GatewayTimeout(f"UPnP {action}: {exc}", mechanism=Mechanism.UPNP) from exc
        except UpnpError as exc:
            raise InvalidRequest(f"UPnP {action}: {exc}", mechanism=Mechanism.UPNP) from exc
        return result

    async def status(self) -> str:
        """GetStatusInfo's connection status ("Connected", ...)."""
        return str((await self.call("GetStatusInfo")).get("NewConnectionStatus", ""))

    async def external_address(self) -> IPv4Address:
        """GetExternalIPAddress; an empty or malformed answer counts as 0.0.0.0."""
        text = (await self.call("GetExternalIPAddress")).get("NewExternalIPAddress") or ""
        try:
            return IPv4Address(str(text).strip())
        except AddressValueError:
            return IPv4Address(0)

    def _lease(self, lease: int) -> int:
        return min(lease, MAX_LEASE_V2) if self.version == 2 else lease

    def _mapping_args(
        self,
        external_port: int,
        protocol: Protocol,
        internal_port: int,
        internal_client: IPv4Address,
        lease: int,
        description: str,
        remote_host: str,
    ) -> dict[str, object]:
        """The arguments AddPortMapping and AddAnyPortMapping share."""
        return {
            "NewRemoteHost": remote_host,
            "NewExternalPort": external_port,
            "NewProtocol": protocol.value.upper(),  # some routers reject "udp" (Tailscale #7377)
            "NewInternalPort": internal_port,
            "NewInternalClient": str(internal_client),
            "NewEnabled": True,
            "NewPortMappingDescription": description,
            "NewLeaseDuration": self._lease(lease),
        }

    async def add_port_mapping(
        self,
        external_port: int,
        protocol: Protocol,
        internal_port: int,
        internal_client: IPv4Address,
        *,
        lease: int,
        description: str = "",
        remote_host: str = "",
    ) -> None:
        """AddPortMapping, the lease sent as whole seconds (no timedelta.seconds day loss)."""
        await self.call(
            "AddPortMapping",
            **self._mapping_args(
                external_port, protocol, internal_port, internal_client, lease, description,
                remote_host,
            ),
        )  # fmt: skip

    async def add_any_port_mapping(
        self,
        external_port: int,
        protocol: Protocol,
        internal_port: int,
        internal_client: IPv4Address,
        *,
        lease: int,
        description: str = "",
        remote_host: str = "",
    ) -> int:
        """AddAnyPortMapping (IGD2): the router picks another port on conflict; the port."""
        result = await self.call(
            "AddAnyPortMapping",
            **self._mapping_args(
                external_port, protocol, internal_port, internal_client, lease, description,
                remote_host,
            ),
        )  # fmt: skip
        return int(result.get("NewReservedPort") or external_port)

    async def delete_port_mapping(
        self, external_port: int, protocol: Protocol, remote_host: str = ""
    ) -> None:
        """DeletePortMapping."""
        await self.call(
            "DeletePortMapping",
            NewRemoteHost=remote_host,
            NewExternalPort=external_port,
            NewProtocol=protocol.value.upper(),
        )

    async def delete_port_mapping_range(
        self, start: int, end: int, protocol: Protocol, *, manage: bool = False
    ) -> None:
        """DeletePortMappingRange (IGD2): this host's mappings in [start, end]."""
        await self.call(
            "DeletePortMappingRange",
            NewStartPort=start,
            NewEndPort=end,
            NewProtocol=protocol.value.upper(),
            NewManage=manage,
        )

    async def get_specific_port_mapping_entry(
        self, external_port: int, protocol: Protocol, remote_host: str = ""
    ) -> UpnpEntry:
        """GetSpecificPortMappingEntry; NoSuchMapping (714) if the router has none."""
        result = await self.call(
            "GetSpecificPortMappingEntry",
            NewRemoteHost=remote_host,
            NewExternalPort=external_port,
            NewProtocol=protocol.value.upper(),
        )
        fields = {"NewRemoteHost": remote_host, "NewExternalPort": external_port}
        return _entry({**result, **fields, "NewProtocol": protocol.value})

    async def get_generic_port_mapping_entry(self, index: int) -> UpnpEntry:
        """GetGenericPortMappingEntry; NoSuchMapping (713) past the end."""
        return _entry(await self.call("GetGenericPortMappingEntry", NewPortMappingIndex=index))

    async def get_list_of_port_mappings(
        self, start: int, end: int, protocol: Protocol, *, manage: bool = False, number: int = 1000
    ) -> list[UpnpEntry]:
        """GetListOfPortMappings (IGD2), the PortMappingList XML parsed with defusedxml."""
        result = await self.call(
            "GetListOfPortMappings",
            NewStartPort=start,
            NewEndPort=end,
            NewProtocol=protocol.value.upper(),
            NewManage=manage,
            NewNumberOfPorts=number,
        )
        return parse_port_listing(str(result.get("NewPortListing") or ""))

    async def list_mappings(self) -> list[UpnpEntry]:
        """Every mapping the router lists (up to MAX_LIST)."""
        if self.has("GetListOfPortMappings"):
            entries: list[UpnpEntry] = []
            for protocol in Protocol:
                try:
                    entries += await self.get_list_of_port_mappings(
                        0, 65535, protocol, manage=True, number=MAX_LIST
                    )
                except NoSuchMapping:
                    continue  # 730: none of this protocol
            return entries[:MAX_LIST]
        walked: list[UpnpEntry] = []
        for index in range(MAX_LIST):
            try:
                walked.append(await self.get_generic_port_mapping_entry(index))
            except (NoSuchMapping, InvalidRequest):
                break  # 713 (or 402 on some routers) ends the list
        return walked

    async def add_mapping(
        self,
        protocol: Protocol,
        internal_port: int,
        internal_client: IPv4Address,
        *,
        external_port: int | None,
        lease: int,
        description: str = "",
        exact: bool = False,
    ) -> UpnpGrant:
        """Add a mapping with the quirk handling of docs/client.md: AddAnyPortMapping on IGD2
        when the port is open, another random port after a conflict, permanent lease after
        725 (or 402 caused by the lease), same ports after 724. `external_port` is a
        suggestion unless `exact`."""
        port = choose_port(internal_port, external_port, self.rng)
        notes: list[str] = []
        if not exact and self.has("AddAnyPortMapping"):
            try:
                got = await self.add_any_port_mapping(
                    port, protocol, internal_port, internal_client,
                    lease=lease, description=description,
                )  # fmt: skip
                return UpnpGrant(got, self._lease(lease), ("AddAnyPortMapping",))
            except (InvalidRequest, Unsupported, OutOfResources) as exc:
                # miniupnpd answers 728 NoPortMapsAvailable when its permission rules deny
                # the internal port; AddPortMapping below then tells the real reason (606).
                if lease and exc.code in (402, 725):
                    return await self._add_permanent(
                        protocol, internal_port, internal_client, exact, port, description, exc
                    )
                notes.append(f"AddAnyPortMapping failed ({exc}); AddPortMapping instead")
        for attempt in range(MAX_PORT_TRIES):
            try:
                await self.add_port_mapping(
                    port, protocol, internal_port, internal_client,
                    lease=lease, description=description,
                )  # fmt: skip
                return UpnpGrant(port, self._lease(lease), tuple(notes))
            except PortUnavailable:
                if exact or attempt == MAX_PORT_TRIES - 1:
                    raise
                port = self.rng.randrange(LOW_PORTS, 65536)
                notes.append(f"conflict: trying port {port}")
            except InvalidRequest as exc:
                if exc.code == 724 and not exact and port != internal_port:
                    port = internal_port  # SamePortValuesRequired
                    notes.append("724: same external and internal port")
                    continue
                if lease and exc.code in (402, 725):
                    return await self._add_permanent(
                        protocol, internal_port, internal_client, exact, port, description, exc
                    )
                raise
        raise ProtocolError("unreachable")  # pragma: no cover

    async def _add_permanent(
        self,
        protocol: Protocol,
        internal_port: int,
        internal_client: IPv4Address,
        exact: bool,
        port: int,
        description: str,
        cause: MappingRefused,
    ) -> UpnpGrant:
        # 725 OnlyPermanentLeasesSupported, or 402 for any lease (ARRIS, Tailscale #15223):
        # a permanent lease, which the caller refreshes on its own timer.
        try:
            await self.add_port_mapping(
                port, protocol, internal_port, internal_client, lease=0, description=description
            )
        except PortMappingError:
            raise cause from None
        return UpnpGrant(port, 0, (f"error {cause.code}: permanent lease",))


def _entry(result: Mapping[str, Any]) -> UpnpEntry:
    return UpnpEntry(
        remote_host=str(result.get("NewRemoteHost") or ""),
        external_port=int(result.get("NewExternalPort") or 0),
        protocol=str(result.get("NewProtocol") or "").lower(),
        internal_port=int(result.get("NewInternalPort") or 0),
        internal_client=str(result.get("NewInternalClient") or ""),
        enabled=bool(result.get("NewEnabled", True)),
        description=str(result.get("NewPortMappingDescription") or ""),
        lease=int(result.get("NewLeaseDuration") or 0),
    )


def parse_port_listing(text: str) -> list[UpnpEntry]:
    """Parse GetListOfPortMappings' PortMappingList (any namespace prefix)."""
    if not text.strip():
        return []
    try:
        root = ElementTree.fromstring(text)
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        raise ProtocolError(f"bad PortMappingList: {exc}", mechanism=Mechanism.UPNP) from exc
    entries = []
    for element in root.iter():
        if _local(element.tag) != "PortMappingEntry":
            continue
        fields = {_local(child.tag): (child.text or "").strip() for child in element}
        entries.append(
            UpnpEntry(
                remote_host=fields.get("NewRemoteHost", ""),
                external_port=_number(fields, "NewExternalPort"),
                protocol=fields.get("NewProtocol", "").lower(),
                internal_port=_number(fields, "NewInternalPort"),
                internal_client=fields.get("NewInternalClient", ""),
                enabled=fields.get("NewEnabled", "1") in ("1", "true", "yes"),
                description=fields.get("NewDescription", ""),
                lease=_number(fields, "NewLeaseTime"),
            )
        )
        if len(entries) >= MAX_LIST:
            break
    return entries


def _number(fields: dict[str, str], name: str) -> int:
    """An unsigned field of a PortMappingEntry (absent or empty: 0); ProtocolError if not one."""
    text = fields.get(name) or "0"
    if not (text.isascii() and text.isdigit()):
        raise ProtocolError(
            f"bad {name} {text[:20]!r} in PortMappingList", mechanism=Mechanism.UPNP
        )
    return int(text)


def _local(tag: object) -> str:
    return str(tag).rsplit("}", 1)[-1].rsplit(":", 1)[-1]
