"""GENA eventing (UDA 1.1 §4): SUBSCRIBE headers, callback URLs, event bodies."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from urllib.parse import urlsplit

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from igd.proto.errors import DecodeError
from igd.proto.soap import escape

EVENT_NS = "urn:schemas-upnp-org:event-1-0"
NT_EVENT = "upnp:event"
NTS_PROPCHANGE = "upnp:propchange"
# UDA 1.1 §4.1.2: a subscription SHOULD last at least 1800 s; an "infinite" request is
# treated as if no duration was given.
MIN_TIMEOUT = 1800
MAX_TIMEOUT = 86400
MAX_CALLBACKS = 8
MAX_CALLBACK_HEADER = 1024

_CALLBACK = re.compile(r"<([^<>]*)>")
_TIMEOUT = re.compile(r"^\s*second-([0-9]{1,10})\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    """A delivery URL reduced to what the gateway will connect to."""

    host: IPv4Address
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


def parse_callbacks(header: str) -> list[str]:
    """The URLs of a CALLBACK header (`<url1><url2>`), in order; DecodeError if none."""
    if len(header) > MAX_CALLBACK_HEADER:
        raise DecodeError("CALLBACK header too long")
    urls = _CALLBACK.findall(header)
    if not urls or _CALLBACK.sub("", header).strip():
        raise DecodeError(f"bad CALLBACK {header[:80]!r}")
    return urls[:MAX_CALLBACKS]


def callback_target(url: str) -> CallbackTarget | None:
    """The target of an `http://<literal IPv4>[:port]/path` URL; None for anything else.

    Host names are refused: resolving them would let a subscriber point deliveries anywhere
    (CVE-2020-12695, CallStranger); the caller also checks the address is the subscriber's.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        return None
    if parts.scheme != "http" or parts.username or parts.password or not parts.hostname:
        return None
    try:
        host = IPv4Address(parts.hostname)
    except ValueError:
        return None
    if parts.netloc.rsplit(":", 1)[0] != str(host):
        return None  # e.g. a zero-padded or otherwise non-canonical literal
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return CallbackTarget(host, port, path)


def parse_timeout(header: str | None) -> int:
    """A TIMEOUT header (`Second-N`, `infinite` or absent) as the seconds we grant."""
    if header is None:
        return MIN_TIMEOUT
    match = _TIMEOUT.match(header)
    if match is None:
        if header.strip().lower() in ("second-infinite", "infinite"):
            return MIN_TIMEOUT
        raise DecodeError(f"bad TIMEOUT {header[:40]!r}")
    return max(MIN_TIMEOUT, min(MAX_TIMEOUT, int(match.group(1))))


def timeout_header(seconds: int) -> str:
    return f"Second-{seconds}"


def encode_propertyset(values: Sequence[tuple[str, str]]) -> bytes:
    """An event body: one property per evented variable (UDA 1.1 §4.3.2)."""
    properties = "".join(
        f"<e:property><{name}>{escape(value)}</{name}></e:property>" for name, value in values
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<e:propertyset xmlns:e="{EVENT_NS}">'
        f"{properties}</e:propertyset>\n"
    ).encode()


def decode_propertyset(body: bytes) -> dict[str, str]:
    """The variables of an event body."""
    try:
        root = fromstring(body, forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError) as error:
        raise DecodeError(f"not acceptable XML: {error}") from None
    if root.tag != f"{{{EVENT_NS}}}propertyset":
        raise DecodeError("not a propertyset")
    values = {}
    for prop in root:
        for variable in prop:
            values[variable.tag.rpartition("}")[2]] = variable.text or ""
    return values


def next_seq(seq: int) -> int:
    """UDA 1.1 §4.3.2: SEQ counts up per message and wraps from 4294967295 to 1, not 0."""
    return 1 if seq >= 0xFFFFFFFF else seq + 1
