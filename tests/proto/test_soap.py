"""SOAP envelopes, faults and escaping: round trips, hostile XML, arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igd.proto import soap
from igd.proto.errors import DecodeError
from igd.proto.soap import SoapFault, SoapRequest, SoapResponse
from tests.strategies import tricky_text

WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
# What upnpc 2.2.4 sends for `upnpc -a 192.168.77.10 8080 18080 TCP 600` (captured in the lab).
UPNPC_ADD = (
    b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
    b' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
    b'<u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">'
    b"<NewRemoteHost></NewRemoteHost><NewExternalPort>18080</NewExternalPort>"
    b"<NewProtocol>TCP</NewProtocol><NewInternalPort>8080</NewInternalPort>"
    b"<NewInternalClient>192.168.77.10</NewInternalClient><NewEnabled>1</NewEnabled>"
    b"<NewPortMappingDescription>libminiupnpc</NewPortMappingDescription>"
    b"<NewLeaseDuration>600</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>\r\n"
)


def test_a_real_client_request_decodes() -> None:
    request = soap.decode_request(UPNPC_ADD)
    assert (request.service_type, request.action) == (WANIP2, "AddPortMapping")
    assert request.argument_dict()["NewInternalClient"] == "192.168.77.10"
    assert request.argument_dict()["NewRemoteHost"] == ""


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f'"{WANIP2}#AddPortMapping"', (WANIP2, "AddPortMapping", 2)),
        (f"{WANIP2}#AddPortMapping", (WANIP2, "AddPortMapping", 2)),
        ('"urn:schemas-upnp-org:control-1-0#QueryStateVariable"', None),
    ],
)
def test_soap_action_header(header: str, expected: tuple[str, str, int] | None) -> None:
    action = soap.decode_soap_action(header)
    if expected:
        assert (action.service_type, action.action, action.version) == expected
    else:
        assert action.action == "QueryStateVariable"


@pytest.mark.parametrize("header", ["", "'", '"#"', f'"{WANIP2}#"', f'"{WANIP2}#a b"', "x" * 300])
def test_bad_soap_action_headers(header: str) -> None:
    with pytest.raises(DecodeError):
        soap.decode_soap_action(header)


names = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,15}", fullmatch=True)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(names, st.lists(st.tuples(names, text), max_size=6, unique_by=lambda a: a[0]))
def test_request_round_trip(action: str, arguments: list[tuple[str, str]]) -> None:
    request = SoapRequest(WANIP2, action, tuple(arguments))
    decoded = soap.decode_request(soap.encode_request(request))
    assert decoded.action == action and decoded.service_type == WANIP2
    # Characters XML cannot carry come back as U+FFFD; line ends are normalised by XML.
    for (name, value), (got_name, got) in zip(arguments, decoded.arguments, strict=True):
        assert got_name == name
        assert len(got) <= len(value)


@given(text, st.integers(400, 899))
def test_fault_round_trip(description: str, code: int) -> None:
    fault = soap.decode_response(soap.encode_fault(SoapFault(code, description)))
    assert isinstance(fault, SoapFault) and fault.code == code


@given(text)
def test_cdata_values_stay_well_formed(value: str) -> None:
    response = SoapResponse(
        WANIP2, "GetListOfPortMappings", (("NewPortListing", value),), frozenset({"NewPortListing"})
    )
    decoded = soap.decode_response(soap.encode_response(response))
    assert isinstance(decoded, SoapResponse)


@pytest.mark.fuzz
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    for decode in (soap.decode_request, soap.decode_response):
        try:
            decode(data)
        except DecodeError:
            pass


ENVELOPE = (
    '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
    "<s:Body>{}</s:Body></s:Envelope>"
)


@pytest.mark.fuzz
@given(
    st.lists(st.sampled_from(["<", ">", "/", "u:", "s:", "=", '"', "&amp;", "&#178;", "]]>"])),
    st.lists(st.tuples(tricky_text, tricky_text), max_size=5),
    st.data(),
)
def test_envelopes_with_arbitrary_content_raise_only_decode_error(
    junk: list[str], arguments: list[tuple[str, str]], data: st.DataObject
) -> None:
    inner = "".join(f"<{name}>{value}</{name}>" for name, value in arguments)
    fault = (
        '<s:Fault><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{data.draw(tricky_text)}</errorCode></UPnPError></detail></s:Fault>"
    )
    for body in (
        f'<u:A xmlns:u="urn:x">{inner}{"".join(junk)}</u:A>',
        f'<u:AResponse xmlns:u="urn:x">{inner}</u:AResponse>',
        fault,
    ):
        document = ENVELOPE.format(body).encode("utf-8", "surrogatepass")
        for decode in (soap.decode_request, soap.decode_response):
            try:
                decode(document)
            except DecodeError:
                pass


@pytest.mark.fuzz
@given(st.one_of(tricky_text, tricky_text.map(lambda t: f'"urn:a:service:B:{t}#Act"')))
def test_soapaction_headers_raise_only_decode_error(header: str) -> None:
    try:
        action = soap.decode_soap_action(header)
    except DecodeError:
        return
    assert action.version is None or action.version >= 0


def test_entities_are_never_expanded() -> None:
    bomb = b'<!DOCTYPE a [<!ENTITY x "xxxxxxxx">]><a>&x;</a>'
    with pytest.raises(DecodeError):
        soap.decode_request(bomb)
