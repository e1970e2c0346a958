"""UPnP device and service descriptions for IGD v1 and v2: the device tree, the SCPDs, and
the action and state-variable tables the SOAP layer validates arguments against.

Pure: the adapter supplies identities (UUIDs) and URLs; nothing here reads a clock or a socket.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from xml.sax.saxutils import escape

UPNP_SCHEMA = "urn:schemas-upnp-org"
DEVICE_NS = "urn:schemas-upnp-org:device-1-0"
SERVICE_NS = "urn:schemas-upnp-org:service-1-0"
# UDA 1.1 §2.1: every description states the architecture version it follows.
SPEC_VERSION = (1, 1)
MAX_LEASE_V2 = 604800
"""WANIPConnection:2 §2.3.13: the longest lease, in seconds (a week); 0 asks for it."""


class ServiceKind(enum.StrEnum):
    """The services this gateway offers (their type name without version)."""

    WAN_IP_CONNECTION = "WANIPConnection"
    WAN_COMMON_INTERFACE_CONFIG = "WANCommonInterfaceConfig"
    LAYER3_FORWARDING = "Layer3Forwarding"
    WAN_IPV6_FIREWALL_CONTROL = "WANIPv6FirewallControl"


SERVICE_IDS = {
    ServiceKind.WAN_IP_CONNECTION: "urn:upnp-org:serviceId:WANIPConn1",
    ServiceKind.WAN_COMMON_INTERFACE_CONFIG: "urn:upnp-org:serviceId:WANCommonIFC1",
    ServiceKind.LAYER3_FORWARDING: "urn:upnp-org:serviceId:L3Forwarding1",
    ServiceKind.WAN_IPV6_FIREWALL_CONTROL: "urn:upnp-org:serviceId:WANIPv6Firewall1",
}
PATH_NAMES = {
    ServiceKind.WAN_IP_CONNECTION: "WANIPConn",
    ServiceKind.WAN_COMMON_INTERFACE_CONFIG: "WANCommonIFC",
    ServiceKind.LAYER3_FORWARDING: "L3F",
    ServiceKind.WAN_IPV6_FIREWALL_CONTROL: "WANIPv6FC",
}


def device_type(name: str, version: int) -> str:
    """`urn:schemas-upnp-org:device:<name>:<version>`."""
    return f"{UPNP_SCHEMA}:device:{name}:{version}"


def service_type(kind: ServiceKind, version: int) -> str:
    """`urn:schemas-upnp-org:service:<kind>:<version>`."""
    return f"{UPNP_SCHEMA}:service:{kind}:{version}"


def service_version(kind: ServiceKind, igd_version: int) -> int:
    """The version of a service inside an IGD of this version."""
    # Layer3Forwarding, WANCommonInterfaceConfig and WANIPv6FirewallControl exist only as
    # version 1 (also in IGD:2).
    return igd_version if kind is ServiceKind.WAN_IP_CONNECTION else 1


# -- state variables and actions --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateVariable:
    """One entry of a service state table."""

    name: str
    data_type: str
    """UPnP data type: string, boolean, ui2 or ui4."""
    evented: bool = False
    allowed: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    since: int = 1
    """First service version that has it."""


@dataclass(frozen=True, slots=True)
class Argument:
    """One argument of an action and the state variable that gives its type."""

    name: str
    variable: str


@dataclass(frozen=True, slots=True)
class Action:
    """One action: its in and out arguments, in wire order."""

    name: str
    inputs: tuple[Argument, ...] = ()
    outputs: tuple[Argument, ...] = ()
    since: int = 1


def _args(pairs: str) -> tuple[Argument, ...]:
    """Arguments from "Name:Variable Name:Variable ..."."""
    return tuple(Argument(*pair.split(":")) for pair in pairs.split())


_MAPPING_KEY = _args(
    "NewRemoteHost:RemoteHost NewExternalPort:ExternalPort NewProtocol:PortMappingProtocol"
)
_MAPPING_BODY = _args(
    "NewInternalPort:InternalPort NewInternalClient:InternalClient "
    "NewEnabled:PortMappingEnabled "
    "NewPortMappingDescription:PortMappingDescription "
    "NewLeaseDuration:PortMappingLeaseDuration"
)
_RANGE = _args(
    "NewStartPort:ExternalPort NewEndPort:ExternalPort "
    "NewProtocol:PortMappingProtocol NewManage:A_ARG_TYPE_Manage"
)

WAN_IP_VARIABLES = (
    StateVariable("ConnectionType", "string"),
    StateVariable(
        "PossibleConnectionTypes", "string", True, ("Unconfigured", "IP_Routed", "IP_Bridged")
    ),
    StateVariable(
        "ConnectionStatus",
        "string",
        True,
        (
            "Unconfigured",
            "Connecting",
            "Connected",
            "PendingDisconnect",
            "Disconnecting",
            "Disconnected",
        ),
    ),
    StateVariable("Uptime", "ui4"),
    StateVariable("LastConnectionError", "string", allowed=("ERROR_NONE", "ERROR_UNKNOWN")),
    StateVariable("RSIPAvailable", "boolean"),
    StateVariable("NATEnabled", "boolean"),
    StateVariable("ExternalIPAddress", "string", True),
    StateVariable("PortMappingNumberOfEntries", "ui2", True),
    StateVariable("PortMappingEnabled", "boolean"),
    StateVariable("PortMappingLeaseDuration", "ui4"),
    StateVariable("RemoteHost", "string"),
    StateVariable("ExternalPort", "ui2"),
    StateVariable("InternalPort", "ui2"),
    StateVariable("PortMappingProtocol", "string", allowed=("TCP", "UDP")),
    StateVariable("InternalClient", "string"),
    StateVariable("PortMappingDescription", "string"),
    StateVariable("SystemUpdateID", "ui4", True, since=2),
    StateVariable("A_ARG_TYPE_Manage", "boolean", since=2),
    StateVariable("A_ARG_TYPE_PortListing", "string", since=2),
)
WAN_IP_ACTIONS = (
    Action("SetConnectionType", _args("NewConnectionType:ConnectionType")),
    Action(
        "GetConnectionTypeInfo",
        outputs=_args(
            "NewConnectionType:ConnectionType NewPossibleConnectionTypes:PossibleConnectionTypes"
        ),
    ),
    Action("RequestConnection"),
    Action("ForceTermination"),
    Action(
        "GetStatusInfo",
        outputs=_args(
            "NewConnectionStatus:ConnectionStatus "
            "NewLastConnectionError:LastConnectionError NewUptime:Uptime"
        ),
    ),
    Action(
        "GetNATRSIPStatus",
        outputs=_args("NewRSIPAvailable:RSIPAvailable NewNATEnabled:NATEnabled"),
    ),
    Action(
        "GetGenericPortMappingEntry",
        _args("NewPortMappingIndex:PortMappingNumberOfEntries"),
        _MAPPING_KEY + _MAPPING_BODY,
    ),
    Action("GetSpecificPortMappingEntry", _MAPPING_KEY, _MAPPING_BODY),
    Action("AddPortMapping", _MAPPING_KEY + _MAPPING_BODY),
    Action("DeletePortMapping", _MAPPING_KEY),
    Action("GetExternalIPAddress", outputs=_args("NewExternalIPAddress:ExternalIPAddress")),
    Action("DeletePortMappingRange", _RANGE, since=2),
    Action(
        "GetListOfPortMappings",
        _RANGE + _args("NewNumberOfPorts:PortMappingNumberOfEntries"),
        _args("NewPortListing:A_ARG_TYPE_PortListing"),
        since=2,
    ),
    Action(
        "AddAnyPortMapping",
        _MAPPING_KEY + _MAPPING_BODY,
        _args("NewReservedPort:ExternalPort"),
        since=2,
    ),
)
COMMON_IFC_VARIABLES = (
    StateVariable("WANAccessType", "string", allowed=("DSL", "POTS", "Cable", "Ethernet")),
    StateVariable("Layer1UpstreamMaxBitRate", "ui4"),
    StateVariable("Layer1DownstreamMaxBitRate", "ui4"),
    StateVariable(
        "PhysicalLinkStatus", "string", True, ("Up", "Down", "Initializing", "Unavailable")
    ),
    StateVariable("TotalBytesSent", "ui4"),
    StateVariable("TotalBytesReceived", "ui4"),
    StateVariable("TotalPacketsSent", "ui4"),
    StateVariable("TotalPacketsReceived", "ui4"),
)
COMMON_IFC_ACTIONS = (
    Action(
        "GetCommonLinkProperties",
        outputs=_args(
            "NewWANAccessType:WANAccessType "
            "NewLayer1UpstreamMaxBitRate:Layer1UpstreamMaxBitRate "
            "NewLayer1DownstreamMaxBitRate:Layer1DownstreamMaxBitRate "
            "NewPhysicalLinkStatus:PhysicalLinkStatus"
        ),
    ),
    Action("GetTotalBytesSent", outputs=_args("NewTotalBytesSent:TotalBytesSent")),
    Action("GetTotalBytesReceived", outputs=_args("NewTotalBytesReceived:TotalBytesReceived")),
    Action("GetTotalPacketsSent", outputs=_args("NewTotalPacketsSent:TotalPacketsSent")),
    Action(
        "GetTotalPacketsReceived", outputs=_args("NewTotalPacketsReceived:TotalPacketsReceived")
    ),
)
L3F_VARIABLES = (StateVariable("DefaultConnectionService", "string", True),)
L3F_ACTIONS = (
    Action(
        "GetDefaultConnectionService",
        outputs=_args("NewDefaultConnectionService:DefaultConnectionService"),
    ),
)

# WANIPv6FirewallControl:1 §2.3, §2.4: no "New" prefix on its argument names.
_PINHOLE_TUPLE = _args(
    "RemoteHost:A_ARG_TYPE_IPv6Address RemotePort:A_ARG_TYPE_Port "
    "InternalClient:A_ARG_TYPE_IPv6Address InternalPort:A_ARG_TYPE_Port "
    "Protocol:A_ARG_TYPE_Protocol"
)
_UNIQUE_ID = _args("UniqueID:A_ARG_TYPE_UniqueID")
MAX_PINHOLE_LEASE = 86400
"""WANIPv6FirewallControl:1 §2.3.7: LeaseTime is 1..86400 seconds."""
FIREWALL_VARIABLES = (
    StateVariable("FirewallEnabled", "boolean", True),
    StateVariable("InboundPinholeAllowed", "boolean", True),
    StateVariable("A_ARG_TYPE_OutboundPinholeTimeout", "ui4"),
    StateVariable("A_ARG_TYPE_IPv6Address", "string"),
    StateVariable("A_ARG_TYPE_Port", "ui2"),
    StateVariable("A_ARG_TYPE_Protocol", "ui2"),
    StateVariable("A_ARG_TYPE_LeaseTime", "ui4", minimum=1, maximum=MAX_PINHOLE_LEASE),
    StateVariable("A_ARG_TYPE_UniqueID", "ui2"),
    StateVariable("A_ARG_TYPE_PinholePackets", "ui4"),
    StateVariable("A_ARG_TYPE_Boolean", "boolean"),
)
FIREWALL_ACTIONS = (
    Action(
        "GetFirewallStatus",
        outputs=_args(
            "FirewallEnabled:FirewallEnabled InboundPinholeAllowed:InboundPinholeAllowed"
        ),
    ),
    Action(
        "GetOutboundPinholeTimeout",
        _PINHOLE_TUPLE,
        _args("OutboundPinholeTimeout:A_ARG_TYPE_OutboundPinholeTimeout"),
    ),
    Action("AddPinhole", _PINHOLE_TUPLE + _args("LeaseTime:A_ARG_TYPE_LeaseTime"), _UNIQUE_ID),
    Action("UpdatePinhole", _UNIQUE_ID + _args("NewLeaseTime:A_ARG_TYPE_LeaseTime")),
    Action("DeletePinhole", _UNIQUE_ID),
    Action("GetPinholePackets", _UNIQUE_ID, _args("PinholePackets:A_ARG_TYPE_PinholePackets")),
    Action("CheckPinholeWorking", _UNIQUE_ID, _args("IsWorking:A_ARG_TYPE_Boolean")),
)

_TABLES = {
    ServiceKind.WAN_IP_CONNECTION: (WAN_IP_ACTIONS, WAN_IP_VARIABLES),
    ServiceKind.WAN_COMMON_INTERFACE_CONFIG: (COMMON_IFC_ACTIONS, COMMON_IFC_VARIABLES),
    ServiceKind.LAYER3_FORWARDING: (L3F_ACTIONS, L3F_VARIABLES),
    ServiceKind.WAN_IPV6_FIREWALL_CONTROL: (FIREWALL_ACTIONS, FIREWALL_VARIABLES),
}


def actions(kind: ServiceKind, version: int) -> dict[str, Action]:
    """The actions of a service version, by name."""
    return {a.name: a for a in _TABLES[kind][0] if a.since <= version}


def variables(kind: ServiceKind, version: int) -> dict[str, StateVariable]:
    """The state variables of a service version, by name."""
    return {v.name: v for v in _TABLES[kind][1] if v.since <= version}


def _range(variable: StateVariable, version: int) -> tuple[int | None, int | None]:
    # WANIPConnection:2 §2.3.13/§2.3.16: leases 0..604800 and internal ports from 1.
    if version >= 2 and variable.name == "PortMappingLeaseDuration":
        return 0, MAX_LEASE_V2
    if version >= 2 and variable.name == "InternalPort":
        return 1, 65535
    return variable.minimum, variable.maximum


# -- the device tree -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """One device of the tree: its type name, UDN and the services it holds."""

    name: str
    udn: str
    services: tuple[ServiceKind, ...]


@dataclass(frozen=True, slots=True)
class DeviceTree:
    """InternetGatewayDevice → WANDevice → WANConnectionDevice, in one IGD version."""

    version: int
    root: Device
    wan: Device
    connection: Device

    @classmethod
    def build(cls, root_uuid: str, version: int, *, pinholes: bool = False) -> DeviceTree:
        """The tree for a root UUID; embedded devices get UUIDs derived from it.

        With `pinholes`, the WANConnectionDevice also holds WANIPv6FirewallControl:1 (IGD:2
        §2.2: beside WANIPConnection:2). IGD:1 predates the service, but miniupnpc searches
        for IGD:1 first and reads the description it gets (docs/upnp.md "IPv6 pinholes"), and
        miniupnpd's v1 mode lists it too: an extra service a control point ignores.
        """
        base = uuid.UUID(root_uuid)
        connection: tuple[ServiceKind, ...] = (ServiceKind.WAN_IP_CONNECTION,)
        if pinholes:
            connection += (ServiceKind.WAN_IPV6_FIREWALL_CONTROL,)
        return cls(
            version,
            Device("InternetGatewayDevice", f"uuid:{base}", (ServiceKind.LAYER3_FORWARDING,)),
            Device(
                "WANDevice",
                f"uuid:{uuid.uuid5(base, 'WANDevice')}",
                (ServiceKind.WAN_COMMON_INTERFACE_CONFIG,),
            ),
            Device(
                "WANConnectionDevice",
                f"uuid:{uuid.uuid5(base, 'WANConnectionDevice')}",
                connection,
            ),
        )

    @property
    def devices(self) -> tuple[Device, ...]:
        return (self.root, self.wan, self.connection)

    @property
    def services(self) -> tuple[ServiceKind, ...]:
        """Every service the tree's devices hold."""
        return tuple(kind for device in self.devices for kind in device.services)

    def device_type(self, device: Device) -> str:
        return device_type(device.name, self.version)

    def service_type(self, kind: ServiceKind) -> str:
        return service_type(kind, service_version(kind, self.version))

    def default_connection_service(self) -> str:
        """Layer3Forwarding's DefaultConnectionService: `<UDN>:<serviceType>,<serviceId>`."""
        kind = ServiceKind.WAN_IP_CONNECTION
        return f"{self.connection.udn}:{self.service_type(kind)},{SERVICE_IDS[kind]}"


@dataclass(frozen=True, slots=True)
class Urls:
    """Where a version's description, SCPDs, control and event URLs live (absolute paths)."""

    base: str
    """Path prefix, e.g. `/3f9a.../igd2`."""

    @property
    def description(self) -> str:
        return f"{self.base}/desc.xml"

    def scpd(self, kind: ServiceKind) -> str:
        return f"{self.base}/{PATH_NAMES[kind]}.xml"

    def control(self, kind: ServiceKind) -> str:
        return f"{self.base}/ctl/{PATH_NAMES[kind]}"

    def event(self, kind: ServiceKind) -> str:
        return f"{self.base}/evt/{PATH_NAMES[kind]}"


@dataclass(frozen=True, slots=True)
class Identity:
    """What the description says about the product."""

    friendly_name: str = "igd-server"
    manufacturer: str = "igd"
    model_name: str = "igd-server"
    model_number: str = "1"
    serial_number: str = "1"


def root_description(tree: DeviceTree, urls: Urls, identity: Identity, config_id: int) -> bytes:
    """The root device description document (UDA 1.1 §2.3)."""
    major, minor = SPEC_VERSION
    parts = [
        '<?xml version="1.0"?>\n',
        f'<root xmlns="{DEVICE_NS}" configId="{config_id}">',
        f"<specVersion><major>{major}</major><minor>{minor}</minor></specVersion>",
        _device(tree, tree.root, urls, identity, (tree.wan, tree.connection)),
        "</root>\n",
    ]
    return "".join(parts).encode()


def _device(
    tree: DeviceTree, device: Device, urls: Urls, identity: Identity, below: tuple[Device, ...]
) -> str:
    out = [
        "<device>",
        _element("deviceType", tree.device_type(device)),
        _element("friendlyName", identity.friendly_name),
        _element("manufacturer", identity.manufacturer),
        _element("modelName", identity.model_name),
        _element("modelNumber", identity.model_number),
        _element("serialNumber", identity.serial_number),
        _element("UDN", device.udn),
        "<serviceList>",
    ]
    for kind in device.services:
        out += [
            "<service>",
            _element("serviceType", tree.service_type(kind)),
            _element("serviceId", SERVICE_IDS[kind]),
            _element("SCPDURL", urls.scpd(kind)),
            _element("controlURL", urls.control(kind)),
            _element("eventSubURL", urls.event(kind)),
            "</service>",
        ]
    out.append("</serviceList>")
    if below:
        out.append("<deviceList>")
        out.append(_device(tree, below[0], urls, identity, below[1:]))
        out.append("</deviceList>")
    out.append("</device>")
    return "".join(out)


def scpd(kind: ServiceKind, version: int) -> bytes:
    """The service description (SCPD, UDA 1.1 §2.5) of one service version."""
    major, minor = SPEC_VERSION
    out = [
        '<?xml version="1.0"?>\n',
        f'<scpd xmlns="{SERVICE_NS}">',
        f"<specVersion><major>{major}</major><minor>{minor}</minor></specVersion>",
        "<actionList>",
    ]
    for action in actions(kind, version).values():
        out += ["<action>", _element("name", action.name)]
        if action.inputs or action.outputs:
            out.append("<argumentList>")
            for direction, arguments in (("in", action.inputs), ("out", action.outputs)):
                for argument in arguments:
                    out += [
                        "<argument>",
                        _element("name", argument.name),
                        _element("direction", direction),
                        _element("relatedStateVariable", argument.variable),
                        "</argument>",
                    ]
            out.append("</argumentList>")
        out.append("</action>")
    out += ["</actionList>", "<serviceStateTable>"]
    for variable in variables(kind, version).values():
        events = "yes" if variable.evented else "no"
        out += [
            f'<stateVariable sendEvents="{events}">',
            _element("name", variable.name),
            _element("dataType", variable.data_type),
        ]
        if variable.allowed:
            out.append("<allowedValueList>")
            out += [_element("allowedValue", value) for value in variable.allowed]
            out.append("</allowedValueList>")
        low, high = _range(variable, version)
        if low is not None and high is not None:
            out.append(
                f"<allowedValueRange><minimum>{low}</minimum><maximum>{high}</maximum>"
                "</allowedValueRange>"
            )
        out.append("</stateVariable>")
    out += ["</serviceStateTable>", "</scpd>\n"]
    return "".join(out).encode()


def _element(name: str, text: str) -> str:
    return f"<{name}>{escape(text)}</{name}>"


# -- argument values -----------------------------------------------------------------------------

ArgumentValue = str | int | bool
_UINT_MAX = {"ui1": 0xFF, "ui2": 0xFFFF, "ui4": 0xFFFFFFFF}
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


def convert(variable: StateVariable, text: str) -> ArgumentValue:
    """An argument's text as its state variable's type; ValueError when ill-typed.

    Only the data type is checked here (and allowed values, matched without regard to case);
    ranges with a meaning of their own (lease, internal port 0) are the action's to judge.
    """
    raw, text = text, text.strip()
    kind = variable.data_type
    if kind in _UINT_MAX:
        if not text.isdigit() or not text.isascii() or int(text) > _UINT_MAX[kind]:
            raise ValueError(f"{variable.name}: {text[:20]!r} is not a {kind}")
        return int(text)
    if kind == "boolean":
        lowered = text.lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ValueError(f"{variable.name}: {text[:20]!r} is not a boolean")
    if variable.allowed:
        for allowed in variable.allowed:
            if allowed.lower() == text.lower():
                return allowed
        allowed_values = ", ".join(variable.allowed)
        raise ValueError(f"{variable.name}: {text[:20]!r} is not one of {allowed_values}")
    return raw


def format_value(value: ArgumentValue) -> str:
    """An out argument's wire text."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
