"""The control point's view of the gateway: action dispatch with argument checking, the
status actions of WANIPConnection, WANCommonInterfaceConfig and Layer3Forwarding,
QueryStateVariable, and the values of evented variables."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from igd.proto import description
from igd.proto.description import ArgumentValue, DeviceTree, ServiceKind, format_value
from igd.proto.soap import CONTROL_NS, QUERY_STATE_VARIABLE, SoapRequest, SoapResponse
from igd.server.interfaces import ExternalAddress
from igd.server.service import Service
from igd.server.upnp import errors, link
from igd.server.upnp.errors import UpnpError
from igd.server.upnp.mappings import MappingActions, Out
from igd.server.upnp.pinholes import PinholeActions

WAN_IP = ServiceKind.WAN_IP_CONNECTION
L3F = ServiceKind.LAYER3_FORWARDING
FIREWALL = ServiceKind.WAN_IPV6_FIREWALL_CONTROL
CONNECTION_TYPE = "IP_Routed"
MAPPING_ACTIONS = frozenset({
    "AddPortMapping", "AddAnyPortMapping", "DeletePortMapping", "DeletePortMappingRange",
    "GetGenericPortMappingEntry", "GetSpecificPortMappingEntry", "GetListOfPortMappings",
})  # fmt: skip


class Actions:
    """Runs SOAP actions for LAN clients against the gateway service."""

    def __init__(
        self,
        service: Service,
        external: ExternalAddress,
        external_interface: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        pinholes: PinholeActions | None = None,
    ) -> None:
        self.service = service
        self.pinholes = pinholes
        self.external = external
        self.external_interface = external_interface
        self.clock = clock
        self.started = clock()
        self.mappings = MappingActions(service, external)

    async def invoke(
        self,
        tree: DeviceTree,
        kind: ServiceKind,
        version: int,
        request: SoapRequest,
        client: IPv4Address | IPv6Address,
    ) -> SoapResponse:
        """Run one action of a service version (in `tree`); UpnpError for every refusal."""
        if request.action == QUERY_STATE_VARIABLE and request.service_type == CONTROL_NS:
            name = request.argument_dict().get("varName")
            if name is None:
                raise UpnpError(errors.INVALID_ARGS, "varName missing")
            value = self.query(tree, kind, version, name.strip())
            return SoapResponse(CONTROL_NS, QUERY_STATE_VARIABLE, (("return", value),))
        spec = description.actions(kind, version).get(request.action)
        if spec is None:
            raise UpnpError(errors.INVALID_ACTION, f"{kind}:{version} has no {request.action}")
        state = description.variables(kind, version)
        given = request.argument_dict()
        args: dict[str, ArgumentValue] = {}
        for argument in spec.inputs:
            if argument.name not in given:
                # Every argument is required (the missing-argument CVEs in miniupnpd).
                raise UpnpError(errors.INVALID_ARGS, f"{argument.name} missing")
            try:
                args[argument.name] = description.convert(
                    state[argument.variable], given[argument.name]
                )
            except ValueError as error:
                raise UpnpError(errors.INVALID_ARGS, str(error)) from None
        out = await self._run(tree, kind, version, request.action, args, client)
        names = [argument.name for argument in spec.outputs]
        assert [name for name, _ in out] == names, f"{request.action} answered {out}"
        values = tuple((name, format_value(value)) for name, value in out)
        cdata = frozenset({"NewPortListing"} & set(names))
        return SoapResponse(request.service_type, request.action, values, cdata)

    async def _run(
        self,
        tree: DeviceTree,
        kind: ServiceKind,
        version: int,
        action: str,
        args: dict[str, ArgumentValue],
        client: IPv4Address | IPv6Address,
    ) -> Out:
        maps = self.mappings
        if kind is FIREWALL:
            if self.pinholes is None:  # pragma: no cover - only described with pinholes
                raise UpnpError(errors.INVALID_ACTION, action)
            return await self.pinholes.run(action, args, client)
        if kind is WAN_IP and action in MAPPING_ACTIONS:
            if not isinstance(client, IPv4Address):
                # An IPv4 port mapping names an IPv4 internal client: asked over IPv4 only.
                raise UpnpError(errors.NOT_AUTHORIZED, "IPv4 port mappings are asked over IPv4")
            match action:
                case "AddPortMapping":
                    await maps.add(args, client, version, any_port=False)
                    return []
                case "AddAnyPortMapping":
                    port = await maps.add(args, client, version, any_port=True)
                    return [("NewReservedPort", port)]
                case "DeletePortMapping":
                    await maps.delete(args, client, version)
                    return []
                case "DeletePortMappingRange":
                    await maps.delete_range(args, client)
                    return []
                case "GetGenericPortMappingEntry":
                    return maps.generic_entry(int(args["NewPortMappingIndex"]), client)
                case "GetSpecificPortMappingEntry":
                    return maps.specific_entry(args, client)
                case "GetListOfPortMappings":
                    return [("NewPortListing", maps.listing(args, client))]
        return self._status(tree, kind, action, args)

    def _status(
        self, tree: DeviceTree, kind: ServiceKind, action: str, args: dict[str, ArgumentValue]
    ) -> Out:
        match action:
            case "GetExternalIPAddress":
                current = self.external.reported
                return [("NewExternalIPAddress", str(current) if current else "")]
            case "GetStatusInfo":
                return [
                    ("NewConnectionStatus", self.connection_status()),
                    ("NewLastConnectionError", "ERROR_NONE"),
                    ("NewUptime", self.uptime()),
                ]
            case "GetConnectionTypeInfo":
                return [
                    ("NewConnectionType", CONNECTION_TYPE),
                    ("NewPossibleConnectionTypes", CONNECTION_TYPE),
                ]
            case "SetConnectionType":
                if args["NewConnectionType"] != CONNECTION_TYPE:
                    raise UpnpError(errors.NOT_AUTHORIZED, "the connection type is fixed")
                return []
            case "RequestConnection" | "ForceTermination":
                # The WAN connection belongs to the administrator, not to LAN clients.
                raise UpnpError(errors.NOT_AUTHORIZED, "the WAN connection is not controllable")
            case "GetNATRSIPStatus":
                return [("NewRSIPAvailable", False), ("NewNATEnabled", True)]
            case "GetCommonLinkProperties":
                rate = link.max_bit_rate(self.external_interface)
                return [
                    ("NewWANAccessType", "Ethernet"),
                    ("NewLayer1UpstreamMaxBitRate", rate),
                    ("NewLayer1DownstreamMaxBitRate", rate),
                    ("NewPhysicalLinkStatus", self.physical_link_status()),
                ]
            case "GetTotalBytesSent":
                return [("NewTotalBytesSent", self._counters().bytes_sent)]
            case "GetTotalBytesReceived":
                return [("NewTotalBytesReceived", self._counters().bytes_received)]
            case "GetTotalPacketsSent":
                return [("NewTotalPacketsSent", self._counters().packets_sent)]
            case "GetTotalPacketsReceived":
                return [("NewTotalPacketsReceived", self._counters().packets_received)]
            case "GetDefaultConnectionService":
                return [("NewDefaultConnectionService", tree.default_connection_service())]
        raise UpnpError(errors.INVALID_ACTION, action)  # pragma: no cover - spec lists all

    # -- state variables ---------------------------------------------------------------------

    def query(self, tree: DeviceTree, kind: ServiceKind, version: int, name: str) -> str:
        """QueryStateVariable (UDA 1.0 §3.3, deprecated but still sent by old clients)."""
        state = description.variables(kind, version)
        if name not in state or name.startswith("A_ARG_TYPE_"):
            raise UpnpError(errors.INVALID_VAR, name[:64])
        value = self.value(tree, name)
        if value is None:
            raise UpnpError(errors.INVALID_VAR, name[:64])
        return value

    def value(self, tree: DeviceTree, name: str) -> str | None:
        """A state variable's current wire value, None if it has no standing value."""
        current = self.external.reported
        values: dict[str, Callable[[], ArgumentValue]] = {
            "ConnectionType": lambda: CONNECTION_TYPE,
            "PossibleConnectionTypes": lambda: CONNECTION_TYPE,
            "ConnectionStatus": self.connection_status,
            "Uptime": self.uptime,
            "LastConnectionError": lambda: "ERROR_NONE",
            "RSIPAvailable": lambda: False,
            "NATEnabled": lambda: True,
            "ExternalIPAddress": lambda: str(current) if current else "",
            "PortMappingNumberOfEntries": lambda: min(0xFFFF, self.service.count()),
            "SystemUpdateID": lambda: self.system_update_id,
            "WANAccessType": lambda: "Ethernet",
            "PhysicalLinkStatus": self.physical_link_status,
            "DefaultConnectionService": tree.default_connection_service,
        }
        if self.pinholes is not None:
            pinholes = self.pinholes
            values["FirewallEnabled"] = lambda: True
            values["InboundPinholeAllowed"] = lambda: pinholes.inbound_allowed
        getter = values.get(name)
        return None if getter is None else format_value(getter())

    def evented(self, kind: ServiceKind, version: int) -> list[str]:
        """The names of a service version's evented variables."""
        return [v.name for v in description.variables(kind, version).values() if v.evented]

    def connection_status(self) -> str:
        return "Connected" if self.external.current else "Disconnected"

    def physical_link_status(self) -> str:
        return "Up" if link.link_up(self.external_interface) else "Down"

    def uptime(self) -> int:
        return int(self.clock() - self.started) & 0xFFFFFFFF

    @property
    def system_update_id(self) -> int:
        """WANIPConnection:2 SystemUpdateID: changes whenever the mapping table changes."""
        return self.service.changes % 0xFFFFFFFF + 1

    def _counters(self) -> link.Counters:
        return link.counters(self.external_interface)
