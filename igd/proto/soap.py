"""SOAP for UPnP control (UDA 1.1 §3.2): the SOAPACTION header, request and response
envelopes, faults, and XML escaping.

Every document is parsed with defusedxml and no DTD is accepted, so entity bombs and
external entities are refused before anything is expanded. Decoders raise DecodeError only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from igd.proto.errors import DecodeError

ENVELOPE_NS = "http://schemas.xmlsoap.org/soap/envelope/"
ENCODING_STYLE = "http://schemas.xmlsoap.org/soap/encoding/"
CONTROL_NS = "urn:schemas-upnp-org:control-1-0"
QUERY_STATE_VARIABLE = "QueryStateVariable"

# UDA 1.1 §3.2.1: SOAPACTION is "<service type>#<action name>", quoted.
_SOAP_ACTION = re.compile(r'^\s*"?([A-Za-z0-9:._-]{1,200})#([A-Za-z_][A-Za-z0-9_]{0,63})"?\s*$')
# XML 1.0 §2.2: characters that may not appear in a document at all, even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
MAX_ARGUMENTS = 32


@dataclass(frozen=True, slots=True)
class SoapAction:
    """What the SOAPACTION header names: a service type (or the control namespace) and action."""

    service_type: str
    action: str

    @property
    def version(self) -> int | None:
        """The service version the header names, if it names a versioned type."""
        tail = self.service_type.rsplit(":", 1)[-1]
        return int(tail) if tail.isascii() and tail.isdigit() else None


@dataclass(frozen=True, slots=True)
class SoapRequest:
    """An action invocation: its service type, name and in arguments (in document order)."""

    service_type: str
    action: str
    arguments: tuple[tuple[str, str], ...] = ()

    def argument_dict(self) -> dict[str, str]:
        return dict(self.arguments)


@dataclass(frozen=True, slots=True)
class SoapResponse:
    """A successful action answer: out arguments in the order the SCPD gives."""

    service_type: str
    action: str
    arguments: tuple[tuple[str, str], ...] = ()
    cdata: frozenset[str] = frozenset()
    """Arguments sent as CDATA sections: documents inside a value (GetListOfPortMappings),
    which miniupnpc reads only that way, since it does not decode entities."""


@dataclass(frozen=True, slots=True)
class SoapFault:
    """A UPnP error (UDA 1.1 §3.2.2): HTTP 500 with a UPnPError detail."""

    code: int
    description: str


def escape(text: str) -> str:
    """Text safe as XML character data or an attribute value, whatever it contained."""
    text = _NOT_XML.sub("\ufffd", text)
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
    )


def decode_soap_action(header: str) -> SoapAction:
    """Parse a SOAPACTION header value."""
    match = _SOAP_ACTION.match(header)
    if match is None:
        raise DecodeError(f"bad SOAPACTION {header[:80]!r}")
    return SoapAction(match.group(1), match.group(2))


def decode_request(body: bytes) -> SoapRequest:
    """Parse an action invocation envelope."""
    element = _body_child(body)
    service_type, action = _split(element.tag)
    arguments = []
    seen = set()
    for child in element:
        _, name = _split(child.tag)
        if len(child) or name in seen:
            raise DecodeError(f"argument {name!r} is repeated or not a simple value")
        seen.add(name)
        arguments.append((name, child.text or ""))
        if len(arguments) > MAX_ARGUMENTS:
            raise DecodeError("too many arguments")
    return SoapRequest(service_type, action, tuple(arguments))


def decode_response(body: bytes) -> SoapResponse | SoapFault:
    """Parse an action answer: the out arguments, or the fault."""
    element = _body_child(body)
    namespace, name = _split(element.tag)
    if namespace == ENVELOPE_NS and name == "Fault":
        code = element.find(f".//{{{CONTROL_NS}}}errorCode")
        text = element.find(f".//{{{CONTROL_NS}}}errorDescription")
        digits = (code.text or "").strip() if code is not None else ""
        # ASCII digits only: str.isdigit() also passes "²", which int() refuses.
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 6):
            raise DecodeError("fault without a UPnP errorCode")
        return SoapFault(int(digits), (text.text or "") if text is not None else "")
    if not name.endswith("Response"):
        raise DecodeError(f"{name!r} is not an action response")
    arguments = tuple((_split(child.tag)[1], child.text or "") for child in element)
    return SoapResponse(namespace, name[: -len("Response")], arguments)


def encode_request(request: SoapRequest) -> bytes:
    """An action invocation envelope (what a control point sends)."""
    return _envelope(
        f'<u:{request.action} xmlns:u="{escape(request.service_type)}">'
        + _arguments(request.arguments)
        + f"</u:{request.action}>"
    )


def encode_response(response: SoapResponse) -> bytes:
    """A successful action answer."""
    return _envelope(
        f'<u:{response.action}Response xmlns:u="{escape(response.service_type)}">'
        + _arguments(response.arguments, response.cdata)
        + f"</u:{response.action}Response>"
    )


def encode_fault(fault: SoapFault) -> bytes:
    """A UPnPError fault body (sent with HTTP 500)."""
    return _envelope(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
        f'<detail><UPnPError xmlns="{CONTROL_NS}"><errorCode>{fault.code}</errorCode>'
        f"<errorDescription>{escape(fault.description)}</errorDescription></UPnPError>"
        "</detail></s:Fault>"
    )


def soap_action_header(service_type: str, action: str) -> str:
    """The SOAPACTION header value for an invocation."""
    return f'"{service_type}#{action}"'


# -- internals ---------------------------------------------------------------------------------


def _envelope(inner: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<s:Envelope xmlns:s="{ENVELOPE_NS}" s:encodingStyle="{ENCODING_STYLE}">'
        f"<s:Body>{inner}</s:Body></s:Envelope>\n"
    ).encode()


def _arguments(arguments: Sequence[tuple[str, str]], cdata: frozenset[str] = frozenset()) -> str:
    return "".join(
        f"<{name}>{_cdata(value) if name in cdata else escape(value)}</{name}>"
        for name, value in arguments
    )


def _cdata(text: str) -> str:
    # "]]>" would end the section early: split it across two sections.
    text = _NOT_XML.sub("\ufffd", text).replace("]]>", "]]]]><![CDATA[>")
    return f"<![CDATA[{text}]]>"


def _body_child(body: bytes) -> Element:
    """The one element inside Envelope/Body."""
    try:
        root = fromstring(body, forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError) as error:
        raise DecodeError(f"not acceptable XML: {type(error).__name__}: {error}") from None
    if root.tag != f"{{{ENVELOPE_NS}}}Envelope":
        raise DecodeError(f"root element {root.tag[:80]!r} is not a SOAP Envelope")
    envelope_body: Element | None = root.find(f"{{{ENVELOPE_NS}}}Body")
    if envelope_body is None or len(envelope_body) != 1:
        raise DecodeError("the SOAP Body must hold exactly one element")
    child: Element = envelope_body[0]
    return child


def _split(tag: str) -> tuple[str, str]:
    """`{namespace}local` → (namespace, local)."""
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return namespace, local
    return "", tag
