"""Client library: find the gateway, map a port over PCP, NAT-PMP or UPnP IGD, or open an
IPv6 pinhole over PCP or UPnP, and keep it working (docs/client.md)."""

from igd.client.calls import Exposed, MapCall
from igd.client.errors import (
    Advice,
    GatewayTimeout,
    InvalidRequest,
    MappingRefused,
    NoGatewayError,
    NoSuchMapping,
    NotAuthorized,
    OutOfResources,
    PortMappingError,
    PortUnavailable,
    ProtocolError,
    TemporaryFailure,
    Unsupported,
    UnsupportedVersion,
    UpstreamNat,
)
from igd.client.mapper import PortMapper
from igd.client.mapping import EventKind, Mapping, MappingEvent
from igd.client.natpmp import NatPmpClient
from igd.client.pcp import PcpClient
from igd.client.pcp6 import Pcp6Client
from igd.client.pinholes import Ipv6Report, Pinhole
from igd.client.probe import ProbeResult
from igd.client.selection import AddressKind, Verdict
from igd.client.state import Record, StateFile
from igd.client.sync import SyncExposed, SyncMapping, SyncPortMapper
from igd.client.upnp import UpnpIgdClient
from igd.client.upnp6 import FirewallStatus, UpnpFirewallClient
from igd.model import Mechanism, Protocol

__all__ = [
    "AddressKind",
    "Advice",
    "EventKind",
    "Exposed",
    "FirewallStatus",
    "GatewayTimeout",
    "InvalidRequest",
    "Ipv6Report",
    "MapCall",
    "Mapping",
    "MappingEvent",
    "MappingRefused",
    "Mechanism",
    "NatPmpClient",
    "NoGatewayError",
    "NoSuchMapping",
    "NotAuthorized",
    "OutOfResources",
    "Pcp6Client",
    "PcpClient",
    "Pinhole",
    "PortMapper",
    "PortMappingError",
    "PortUnavailable",
    "ProbeResult",
    "Protocol",
    "ProtocolError",
    "Record",
    "StateFile",
    "SyncExposed",
    "SyncMapping",
    "SyncPortMapper",
    "TemporaryFailure",
    "Unsupported",
    "UnsupportedVersion",
    "UpnpFirewallClient",
    "UpnpIgdClient",
    "UpstreamNat",
    "Verdict",
]
