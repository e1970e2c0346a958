"""Client library: find the gateway, map a port over PCP, NAT-PMP or UPnP IGD, and keep the
mapping working (docs/client.md)."""

from igd.client.calls import MapCall
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
from igd.client.probe import ProbeResult
from igd.client.selection import AddressKind, Verdict
from igd.client.state import Record, StateFile
from igd.client.sync import SyncMapping, SyncPortMapper
from igd.client.upnp import UpnpIgdClient
from igd.model import Mechanism, Protocol

__all__ = [
    "AddressKind",
    "Advice",
    "EventKind",
    "GatewayTimeout",
    "InvalidRequest",
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
    "PcpClient",
    "PortMapper",
    "PortMappingError",
    "PortUnavailable",
    "ProbeResult",
    "Protocol",
    "ProtocolError",
    "Record",
    "StateFile",
    "SyncMapping",
    "SyncPortMapper",
    "TemporaryFailure",
    "Unsupported",
    "UnsupportedVersion",
    "UpnpIgdClient",
    "UpstreamNat",
    "Verdict",
]
