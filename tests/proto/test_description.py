"""Descriptions: well-formed, versioned, and the argument tables the SOAP layer checks."""

from __future__ import annotations

import pytest
from defusedxml.ElementTree import fromstring
from hypothesis import given
from hypothesis import strategies as st

from igd.proto import description
from igd.proto.description import DeviceTree, Identity, ServiceKind, StateVariable, Urls
from tests.strategies import tricky_text

UUID = "3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b"
NS = "{urn:schemas-upnp-org:device-1-0}"


@pytest.mark.parametrize("version", [1, 2])
def test_root_description_tree(version: int) -> None:
    tree = DeviceTree.build(UUID, version)
    identity = Identity(friendly_name="A & B <gateway>")
    root = fromstring(description.root_description(tree, Urls("/t/igd"), identity, 5))
    types = [e.text for e in root.iter(f"{NS}deviceType")]
    assert types == [
        f"urn:schemas-upnp-org:device:{name}:{version}"
        for name in ("InternetGatewayDevice", "WANDevice", "WANConnectionDevice")
    ]
    services = [e.text for e in root.iter(f"{NS}serviceType")]
    assert f"urn:schemas-upnp-org:service:WANIPConnection:{version}" in services
    assert "urn:schemas-upnp-org:service:Layer3Forwarding:1" in services
    assert root.find(f"{NS}device/{NS}friendlyName").text == "A & B <gateway>"
    assert len({e.text for e in root.iter(f"{NS}UDN")}) == 3


def test_v2_adds_actions_and_the_lease_range() -> None:
    v1 = fromstring(description.scpd(ServiceKind.WAN_IP_CONNECTION, 1))
    v2 = fromstring(description.scpd(ServiceKind.WAN_IP_CONNECTION, 2))
    ns = "{urn:schemas-upnp-org:service-1-0}"
    names = lambda doc: {e.text for e in doc.iter(f"{ns}name")}  # noqa: E731
    assert {"AddAnyPortMapping", "GetListOfPortMappings", "DeletePortMappingRange"} <= names(v2)
    assert "AddAnyPortMapping" not in names(v1)
    assert b"<maximum>604800</maximum>" in description.scpd(ServiceKind.WAN_IP_CONNECTION, 2)


def test_every_argument_names_a_state_variable() -> None:
    for kind in ServiceKind:
        for version in (1, 2):
            state = description.variables(kind, version)
            for action in description.actions(kind, version).values():
                for argument in (*action.inputs, *action.outputs):
                    assert argument.variable in state, (kind, action.name, argument)


def test_convert_checks_types() -> None:
    state = description.variables(ServiceKind.WAN_IP_CONNECTION, 2)
    assert description.convert(state["ExternalPort"], " 80 ") == 80
    assert description.convert(state["PortMappingEnabled"], "true") is True
    assert description.convert(state["PortMappingProtocol"], "tcp") == "TCP"
    for variable, text in (
        ("ExternalPort", "65536"),
        ("ExternalPort", "-1"),
        ("PortMappingEnabled", "maybe"),
        ("PortMappingProtocol", "SCTP"),
        ("PortMappingLeaseDuration", "٣"),
    ):
        with pytest.raises(ValueError):
            description.convert(state[variable], text)


EVERY_VARIABLE = [
    variable
    for kind in ServiceKind
    for version in (1, 2)
    for variable in description.variables(kind, description.service_version(kind, version)).values()
]


@pytest.mark.fuzz
@given(st.sampled_from(EVERY_VARIABLE), tricky_text)
def test_argument_text_raises_only_value_error(variable: StateVariable, text: str) -> None:
    # The server turns ValueError into 402 Invalid Args (server/upnp/actions.py).
    try:
        value = description.convert(variable, text)
    except ValueError:
        return
    if variable.data_type in ("ui1", "ui2", "ui4"):
        assert isinstance(value, int) and value >= 0 and text.strip().isascii()
    elif variable.data_type == "boolean":
        assert isinstance(value, bool)
