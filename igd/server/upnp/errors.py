"""UPnP error codes: the neutral refusal reasons per IGD version, and the fault adapters raise.

IGD v1 has no 606/728/729 for mappings: like miniupnpd's v1 mode and RFC 6970 §4.3, a policy
refusal is 718 and a resource shortage 501 there. Codes used outside this table (713, 714,
715, 716, 724, 730, 732, 733) are raised at the line that checks for them in mappings.py.
"""

from __future__ import annotations

from igd.decision import Reason
from igd.model import Mechanism
from igd.proto.soap import SoapFault

INVALID_ACTION = 401
INVALID_ARGS = 402
ACTION_FAILED = 501
NOT_AUTHORIZED = 606
INVALID_INDEX = 713
NO_SUCH_ENTRY = 714
WILDCARD_REMOTE_HOST = 715
WILDCARD_EXTERNAL_PORT = 716
CONFLICT = 718
SAME_PORT_VALUES = 724
ONLY_PERMANENT_LEASES = 725
NO_PORT_MAPS = 728
CONFLICT_WITH_OTHER_MECHANISMS = 729
NOT_FOUND = 730
WILDCARD_INTERNAL_PORT = 732
INCONSISTENT_PARAMETERS = 733
INVALID_VAR = 404
# WANIPv6FirewallControl:1 §2.4 (its 704 is NoSuchEntry, not WANIPConnection's 714).
PINHOLE_SPACE_EXHAUSTED = 701
FIREWALL_DISABLED = 702
INBOUND_PINHOLE_NOT_ALLOWED = 703
NO_SUCH_ENTRY_V6 = 704
PROTOCOL_NOT_SUPPORTED = 705
INTERNAL_PORT_WILDCARD = 706
PROTOCOL_WILDCARD = 707
WILDCARD_IN_SRC_IP = 708
NO_TRAFFIC_RECEIVED = 709

NAMES = {
    INVALID_ACTION: "Invalid Action",
    INVALID_ARGS: "Invalid Args",
    INVALID_VAR: "Invalid Var",
    ACTION_FAILED: "Action Failed",
    NOT_AUTHORIZED: "Action not authorized",
    INVALID_INDEX: "SpecifiedArrayIndexInvalid",
    NO_SUCH_ENTRY: "NoSuchEntryInArray",
    WILDCARD_REMOTE_HOST: "WildCardNotPermittedInSrcIP",
    WILDCARD_EXTERNAL_PORT: "WildCardNotPermittedInExtPort",
    CONFLICT: "ConflictInMappingEntry",
    SAME_PORT_VALUES: "SamePortValuesRequired",
    ONLY_PERMANENT_LEASES: "OnlyPermanentLeasesSupported",
    NO_PORT_MAPS: "NoPortMapsAvailable",
    CONFLICT_WITH_OTHER_MECHANISMS: "ConflictWithOtherMechanisms",
    NOT_FOUND: "PortMappingNotFound",
    WILDCARD_INTERNAL_PORT: "WildCardNotPermittedInIntPort",
    INCONSISTENT_PARAMETERS: "InconsistentParameters",
    PINHOLE_SPACE_EXHAUSTED: "PinholeSpaceExhausted",
    FIREWALL_DISABLED: "FirewallDisabled",
    INBOUND_PINHOLE_NOT_ALLOWED: "InboundPinholeNotAllowed",
    NO_SUCH_ENTRY_V6: "NoSuchEntry",
    PROTOCOL_NOT_SUPPORTED: "ProtocolNotSupported",
    INTERNAL_PORT_WILDCARD: "InternalPortWildcardingNotAllowed",
    PROTOCOL_WILDCARD: "ProtocolWildcardingNotAllowed",
    WILDCARD_IN_SRC_IP: "WildcardNotPermittedInSrcIP",
    NO_TRAFFIC_RECEIVED: "NoTrafficReceived",
}

# Refusals of AddPortMapping / AddAnyPortMapping, per WANIPConnection version.
CODE_FOR: dict[int, dict[Reason, int]] = {
    1: {
        Reason.POLICY_DENIED: CONFLICT,
        Reason.THIRD_PARTY_DENIED: CONFLICT,
        Reason.CLIENT_QUOTA: ACTION_FAILED,
        Reason.GATEWAY_QUOTA: ACTION_FAILED,
        Reason.PORT_IN_USE: CONFLICT,
        Reason.NO_FREE_PORT: ACTION_FAILED,
        Reason.RESERVED_PORT: CONFLICT,
        Reason.NOT_OWNER: CONFLICT,
        Reason.BACKEND_FAILURE: ACTION_FAILED,
        Reason.INVALID_INTERNAL_ADDRESS: CONFLICT,
        Reason.GATEWAY_CLIENT: CONFLICT,
    },
    2: {
        Reason.POLICY_DENIED: NOT_AUTHORIZED,
        Reason.THIRD_PARTY_DENIED: NOT_AUTHORIZED,
        Reason.CLIENT_QUOTA: NO_PORT_MAPS,
        Reason.GATEWAY_QUOTA: NO_PORT_MAPS,
        Reason.PORT_IN_USE: CONFLICT,
        Reason.NO_FREE_PORT: NO_PORT_MAPS,
        Reason.RESERVED_PORT: CONFLICT_WITH_OTHER_MECHANISMS,
        Reason.NOT_OWNER: NOT_AUTHORIZED,
        Reason.BACKEND_FAILURE: ACTION_FAILED,
        Reason.INVALID_INTERNAL_ADDRESS: NOT_AUTHORIZED,
        Reason.GATEWAY_CLIENT: NOT_AUTHORIZED,
    },
}


class UpnpError(Exception):
    """A UPnP error an action answers with (as a SOAP fault, HTTP 500)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def fault(self) -> SoapFault:
        name = NAMES.get(self.code, "Error")
        return SoapFault(self.code, f"{name}: {self.detail}" if self.detail else name)


_SAME_MECHANISM = (None, Mechanism.UPNP, Mechanism.STATIC)


def refusal_code(reason: Reason, version: int, holder: Mechanism | None = None) -> int:
    """The code refusing a mapping request; v2 tells a port held over NAT-PMP/PCP apart."""
    # A static forward is the admin's entry in the same table: 718, as miniupnpd answers
    # for a port its own permanent rules hold.
    if version >= 2 and reason is Reason.PORT_IN_USE and holder not in _SAME_MECHANISM:
        # WANIPConnection:2: 729 when the port is taken by another mapping mechanism.
        return CONFLICT_WITH_OTHER_MECHANISMS
    return CODE_FOR[min(version, 2)][reason]
