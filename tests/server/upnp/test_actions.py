"""Every UPnP error code the gateway sends, and where: real service, memory backend, SOAP
over loopback HTTP. The lab tests show the same with upnpc and async-upnp-client."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from igd.decision import Reason
from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.proto.description import ServiceKind
from igd.proto.soap import SoapFault, SoapResponse
from igd.server.backends import BackendError
from igd.server.upnp.errors import CODE_FOR
from tests.server.upnp.rig import Rig, add_args

LIST_ALL = {"NewStartPort": 1, "NewEndPort": 65535, "NewProtocol": "TCP", "NewManage": 1}


def code(answer: SoapResponse | SoapFault) -> int:
    assert isinstance(answer, SoapFault), answer
    return answer.code


def out(answer: SoapResponse | SoapFault) -> dict[str, str]:
    assert isinstance(answer, SoapResponse), answer
    return dict(answer.arguments)


@pytest.mark.parametrize("version", [1, 2])
def test_every_reason_has_a_code_in_every_version(version: int) -> None:
    assert set(CODE_FOR[version]) == set(Reason)


async def test_add_list_delete_round_trip(rig: Rig) -> None:
    description = 'web <&> "server" ]]> \x01'
    out(await rig.call("AddPortMapping", **add_args(8080, NewPortMappingDescription=description)))
    entry = out(await rig.call("GetGenericPortMappingEntry", NewPortMappingIndex=0))
    assert (entry["NewExternalPort"], entry["NewInternalClient"]) == ("8080", "127.0.0.1")
    assert entry["NewPortMappingDescription"] == description.replace("\x01", "\ufffd")
    listing = out(await rig.call("GetListOfPortMappings", **LIST_ALL, NewNumberOfPorts=0))
    assert "]]&gt;" in listing["NewPortListing"]  # well-formed whatever the description holds
    specific = out(
        await rig.call(
            "GetSpecificPortMappingEntry", NewRemoteHost="", NewExternalPort=8080, NewProtocol="TCP"
        )
    )
    assert specific["NewInternalPort"] == "8080" and 590 <= int(specific["NewLeaseDuration"]) <= 600
    out(
        await rig.call(
            "DeletePortMapping", NewRemoteHost="", NewExternalPort=8080, NewProtocol="TCP"
        )
    )
    assert len(rig.service.gateway.table) == 0


async def test_leases_per_version(rig: Rig) -> None:
    # v2: 0 and anything above 604800 become 604800, which the policy clamps to 3600.
    out(await rig.call("AddPortMapping", **add_args(8080, NewLeaseDuration=0)))
    out(await rig.call("AddPortMapping", **add_args(8081, NewLeaseDuration=999999)))
    # v1: 0 is "as long as possible": the policy's max_lease.
    out(await rig.call("AddPortMapping", 1, **add_args(8082, NewLeaseDuration=0)))
    now = rig.service.now()
    leases = {m.external_port: m.remaining(now) for m in rig.service.gateway.table}
    assert all(3590 <= lease <= 3600 for lease in leases.values()), leases


async def test_add_any_port_picks_a_free_allowed_port(rig: Rig) -> None:
    out(await rig.call("AddPortMapping", **add_args(8080)))
    reserved = out(await rig.call("AddAnyPortMapping", **add_args(8080, NewInternalPort=9000)))
    assert reserved["NewReservedPort"] not in ("8080", "0")
    low = out(await rig.call("AddAnyPortMapping", **add_args(80, NewInternalPort=8000)))
    assert int(low["NewReservedPort"]) >= 1024  # the policy allows 1024-65535 only


async def test_argument_errors(rig: Rig) -> None:
    args = add_args(8080)
    del args["NewLeaseDuration"]
    assert code(await rig.call("AddPortMapping", **args)) == 402
    assert code(await rig.call("AddPortMapping", **add_args(8080, NewExternalPort="x"))) == 402
    assert code(await rig.call("AddPortMapping", **add_args(8080, NewProtocol="ICMP"))) == 402
    assert code(await rig.call("AddPortMapping", **add_args(8080, internal="gw.example"))) == 402
    assert code(await rig.call("AddPortMapping", **add_args(70000))) == 402
    assert code(await rig.call("NoSuchAction")) == 401
    assert code(await rig.call("AddAnyPortMapping", 1, **add_args(8080))) == 401  # v2 only
    assert code(await rig.call("AddPortMapping", **add_args(8080, NewRemoteHost="10.*.*.*"))) == 715
    assert code(await rig.call("AddPortMapping", **add_args(0))) == 716
    assert code(await rig.call("AddPortMapping", **add_args(8080, NewInternalPort=0))) == 732
    assert code(await rig.call("AddPortMapping", 1, **add_args(8080, NewInternalPort=0))) == 724
    assert code(await rig.call("AddPortMapping", **add_args(8080, NewEnabled=0))) == 501
    assert len(rig.service.gateway.table) == 0


async def test_refusals_per_version(rig: Rig) -> None:
    assert code(await rig.call("AddPortMapping", **add_args(23))) == 606
    assert code(await rig.call("AddPortMapping", 1, **add_args(23))) == 718
    third_party = add_args(8080, internal="127.0.0.9")
    assert code(await rig.call("AddPortMapping", **third_party)) == 606
    assert code(await rig.call("AddPortMapping", 1, **third_party)) == 718
    out(await rig.call("AddPortMapping", **add_args(8080)))
    taken = add_args(8080, NewInternalPort=9999)
    assert code(await rig.call("AddPortMapping", **taken, source="127.0.0.2")) == 718
    # Held over NAT-PMP: v2 says "conflict with other mechanisms".
    owner = Owner(Mechanism.NATPMP, IPv4Address("127.0.0.3"))
    key = MappingKey(Protocol.TCP, 7000)
    pmp = Mapping(key, IPv4Address("127.0.0.3"), 7000, owner, 0.0, rig.service.now() + 600)
    rig.service.gateway.table.put(pmp)
    assert code(await rig.call("AddPortMapping", **add_args(7000))) == 729
    assert code(await rig.call("AddPortMapping", 1, **add_args(7000))) == 718
    # The gateway's own ports (5351/udp here) are another mechanism's.
    udp = add_args(5351, NewProtocol="UDP")
    assert code(await rig.call("AddPortMapping", **udp)) == 729


async def test_quota_and_exhaustion(rig: Rig) -> None:
    for port in range(8080, 8083):  # max_mappings_per_client = 4, one is 7000 below
        out(await rig.call("AddPortMapping", **add_args(port)))
    out(await rig.call("AddPortMapping", **add_args(7000)))
    assert code(await rig.call("AddPortMapping", **add_args(9000))) == 728
    assert code(await rig.call("AddPortMapping", 1, **add_args(9000))) == 501


async def test_index_and_range_errors(rig: Rig) -> None:
    assert code(await rig.call("GetGenericPortMappingEntry", NewPortMappingIndex=0)) == 713
    missing = {"NewRemoteHost": "", "NewExternalPort": 8080, "NewProtocol": "TCP"}
    assert code(await rig.call("GetSpecificPortMappingEntry", **missing)) == 714
    assert code(await rig.call("DeletePortMapping", **missing)) == 714
    inverted = {**LIST_ALL, "NewStartPort": 9000, "NewEndPort": 8000}
    assert code(await rig.call("DeletePortMappingRange", **inverted)) == 733
    assert code(await rig.call("GetListOfPortMappings", **inverted, NewNumberOfPorts=0)) == 733
    mine = {**LIST_ALL, "NewManage": 0}
    assert code(await rig.call("DeletePortMappingRange", **mine)) == 730
    assert code(await rig.call("GetListOfPortMappings", **mine, NewNumberOfPorts=0)) == 730


async def test_secure_mode_hides_and_protects_other_clients_mappings(rig: Rig) -> None:
    out(await rig.call("AddPortMapping", **add_args(8080)))
    other = {"source": "127.0.0.2"}
    key = {"NewRemoteHost": "", "NewExternalPort": 8080, "NewProtocol": "TCP"}
    assert code(await rig.call("DeletePortMapping", **key, **other)) == 606
    assert code(await rig.call("DeletePortMapping", 1, **key, **other)) == 714
    assert code(await rig.call("GetSpecificPortMappingEntry", **key, **other)) == 714
    assert code(await rig.call("GetGenericPortMappingEntry", NewPortMappingIndex=0, **other)) == 713
    # NewManage = 1 without the policy's grant: a range deletion is refused, a listing shows
    # only the caller's own mappings (none here).
    assert code(await rig.call("DeletePortMappingRange", **LIST_ALL, **other)) == 606
    listing = await rig.call("GetListOfPortMappings", **LIST_ALL, NewNumberOfPorts=0, **other)
    assert code(listing) == 730
    assert len(rig.service.gateway.table) == 1
    out(await rig.call("DeletePortMappingRange", **{**LIST_ALL, "NewManage": 0}))
    assert len(rig.service.gateway.table) == 0


async def test_status_actions_and_query_state_variable(rig: Rig) -> None:
    assert out(await rig.call("GetExternalIPAddress")) == {"NewExternalIPAddress": "198.51.100.7"}
    assert out(await rig.call("GetStatusInfo"))["NewConnectionStatus"] == "Connected"
    assert out(await rig.call("GetNATRSIPStatus")) == {
        "NewRSIPAvailable": "0",
        "NewNATEnabled": "1",
    }
    assert out(await rig.call("GetConnectionTypeInfo"))["NewConnectionType"] == "IP_Routed"
    out(await rig.call("SetConnectionType", NewConnectionType="IP_Routed"))
    assert code(await rig.call("SetConnectionType", NewConnectionType="IP_Bridged")) == 606
    assert code(await rig.call("RequestConnection")) == 606
    assert code(await rig.call("ForceTermination")) == 606
    common = ServiceKind.WAN_COMMON_INTERFACE_CONFIG
    link = out(await rig.call("GetCommonLinkProperties", kind=common))
    assert link["NewWANAccessType"] == "Ethernet"
    assert (
        int(out(await rig.call("GetTotalBytesReceived", kind=common))["NewTotalBytesReceived"]) >= 0
    )
    l3f = out(await rig.call("GetDefaultConnectionService", kind=ServiceKind.LAYER3_FORWARDING))
    assert l3f["NewDefaultConnectionService"].endswith(
        ":urn:schemas-upnp-org:service:WANIPConnection:2,urn:upnp-org:serviceId:WANIPConn1"
    )
    count = await rig.call("QueryStateVariable", varName="PortMappingNumberOfEntries")
    assert out(count) == {"return": "0"}
    assert code(await rig.call("QueryStateVariable", varName="NoSuchVariable")) == 404


async def test_no_external_address_and_backend_failure_are_501(rig: Rig) -> None:
    rig.external.current = None
    assert code(await rig.call("AddPortMapping", **add_args(8080))) == 501
    assert out(await rig.call("GetStatusInfo"))["NewConnectionStatus"] == "Disconnected"
    rig.external.refresh()
    rig.external.current = IPv4Address("198.51.100.7")

    async def broken(*args: object, **kwargs: object) -> None:
        raise BackendError("nft said no")

    rig.backend.apply = broken  # type: ignore[method-assign]
    assert code(await rig.call("AddPortMapping", **add_args(8080))) == 501
    assert len(rig.service.gateway.table) == 0
