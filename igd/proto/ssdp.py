"""SSDP (UDA 1.1 §1): M-SEARCH parsing, which targets answer a search, and the search
responses and NOTIFY messages a root device sends. HTTP-over-UDP, one message a datagram."""

from __future__ import annotations

import re
from dataclasses import dataclass

from igd.proto.description import UPNP_SCHEMA, DeviceTree
from igd.proto.errors import DecodeError

GROUP = "239.255.255.250"
PORT = 1900
HOST = f"{GROUP}:{PORT}"
GROUP6 = "ff02::c"
"""UDA 1.1 §1.1: the link-local SSDP group of IPv6 (ff05::c is the site-local one)."""
GROUP6_SITE = "ff05::c"
HOST6 = f"[{GROUP6.upper()}]:{PORT}"
_MULTICAST_HOSTS = frozenset(
    {
        HOST,
        GROUP,
        f"[{GROUP6}]:{PORT}",
        f"[{GROUP6_SITE}]:{PORT}",
        f"[{GROUP6}]",
        f"[{GROUP6_SITE}]",
    }
)
MAX_DATAGRAM = 4096
# UDA 1.1 §1.3.3: CACHE-CONTROL max-age SHOULD be at least 1800 s.
MAX_AGE = 1800
# UDA 1.1 §1.3.2: a device waits a random time up to MX seconds; MX above 5 counts as 5.
MAX_MX = 5
ALL = "ssdp:all"
ROOT_DEVICE = "upnp:rootdevice"
ALIVE = "ssdp:alive"
BYEBYE = "ssdp:byebye"
DISCOVER = "ssdp:discover"

_HEADER = re.compile(r"^([!-9;-~]+)\s*:\s*(.*?)\s*$")
_TYPE = re.compile(rf"^{UPNP_SCHEMA}:(device|service):([A-Za-z0-9_-]+):([0-9]{{1,4}})$")


@dataclass(frozen=True, slots=True)
class SsdpSearch:
    """An M-SEARCH request."""

    target: str
    mx: int | None
    """Seconds the searcher waits (None: no MX header)."""
    host: str
    user_agent: str = ""

    @property
    def multicast(self) -> bool:
        """Whether it was sent to the group (a unicast search names the device instead)."""
        return self.host.replace(" ", "").lower() in _MULTICAST_HOSTS


@dataclass(frozen=True, slots=True)
class SsdpTarget:
    """One (ST or NT, USN) pair a device advertises or answers with."""

    target: str
    usn: str


@dataclass(frozen=True, slots=True)
class Advertising:
    """The headers every message of one device carries besides its target."""

    location: str
    server: str
    boot_id: int
    config_id: int
    max_age: int = MAX_AGE


def decode_message(data: bytes) -> tuple[str, dict[str, str]]:
    """The start line and headers (names upper-cased) of an SSDP datagram."""
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("datagram too long")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("not UTF-8") from None
    head = text.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    lines = [line.rstrip("\r") for line in head.split("\n")]
    start = lines[0].strip()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        match = _HEADER.match(line)
        if match is None:
            raise DecodeError(f"bad header line {line[:60]!r}")
        headers.setdefault(match.group(1).upper(), match.group(2))
    return start, headers


def decode_search(data: bytes) -> SsdpSearch:
    """Parse an M-SEARCH; DecodeError for anything else (NOTIFY, responses, junk)."""
    start, headers = decode_message(data)
    if start.split() != ["M-SEARCH", "*", "HTTP/1.1"]:
        raise DecodeError(f"not an M-SEARCH: {start[:60]!r}")
    # UDA 1.1 §1.3.2: MAN is required and must be "ssdp:discover" (quoted).
    if headers.get("MAN", "").strip().strip('"').lower() != DISCOVER:
        raise DecodeError("MAN is not ssdp:discover")
    target = headers.get("ST", "").strip()
    if not target:
        raise DecodeError("no ST")
    mx: int | None = None
    if "MX" in headers:
        value = headers["MX"].strip()
        # ASCII digits only: str.isdigit() also passes "²", which int() refuses.
        if not (value.isascii() and value.isdigit()) or len(value) > 6:
            raise DecodeError(f"bad MX {value[:10]!r}")
        mx = int(value)
    return SsdpSearch(target, mx, headers.get("HOST", ""), headers.get("USER-AGENT", ""))


def encode_search(target: str, mx: int | None = 2, user_agent: str = "") -> bytes:
    """An M-SEARCH (what a control point sends)."""
    lines = ["M-SEARCH * HTTP/1.1", f"HOST: {HOST}", f'MAN: "{DISCOVER}"', f"ST: {target}"]
    if mx is not None:
        lines.append(f"MX: {mx}")
    if user_agent:
        lines.append(f"USER-AGENT: {user_agent}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def advertisement_set(tree: DeviceTree) -> list[SsdpTarget]:
    """UDA 1.1 §1.2.2: 3 messages for the root, 2 per embedded device, 1 per service type."""
    root = tree.root
    found = [SsdpTarget(ROOT_DEVICE, f"{root.udn}::{ROOT_DEVICE}")]
    for device in tree.devices:
        kind = tree.device_type(device)
        found += [SsdpTarget(device.udn, device.udn), SsdpTarget(kind, f"{device.udn}::{kind}")]
    for device in tree.devices:
        for service in device.services:
            kind = tree.service_type(service)
            found.append(SsdpTarget(kind, f"{device.udn}::{kind}"))
    return found


def search_answers(target: str, tree: DeviceTree) -> list[SsdpTarget]:
    """The responses a search target gets: nothing, one, or (ssdp:all) the whole set.

    UDA 1.1 §1.3.2: a search for a lower version of a type we offer is answered too, with
    the version the searcher asked for.
    """
    if target == ALL:
        return advertisement_set(tree)
    if target == ROOT_DEVICE:
        return [SsdpTarget(ROOT_DEVICE, f"{tree.root.udn}::{ROOT_DEVICE}")]
    if target.startswith("uuid:"):
        return [SsdpTarget(d.udn, d.udn) for d in tree.devices if d.udn == target]
    offered = _offered(target, tree)
    if offered is None:
        return []
    return [SsdpTarget(target, f"{offered}::{target}")]


def asks_lower_version(target: str, tree: DeviceTree) -> bool:
    """Whether a search names a type we offer, at a version below the one we offer."""
    match = _TYPE.match(target)
    if match is None or _offered(target, tree) is None:
        return False
    ours = _versions(tree).get((match.group(1), match.group(2)), (0, ""))[0]
    return int(match.group(3)) < ours


def encode_search_response(answer: SsdpTarget, advertising: Advertising, date: str) -> bytes:
    """The unicast 200 OK answering an M-SEARCH (UDA 1.1 §1.3.3)."""
    lines = [
        "HTTP/1.1 200 OK",
        f"CACHE-CONTROL: max-age={advertising.max_age}",
        f"DATE: {date}",
        "EXT:",
        f"LOCATION: {advertising.location}",
        f"SERVER: {advertising.server}",
        f"ST: {answer.target}",
        f"USN: {answer.usn}",
        f"BOOTID.UPNP.ORG: {advertising.boot_id}",
        f"CONFIGID.UPNP.ORG: {advertising.config_id}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def encode_notify(
    target: SsdpTarget, nts: str, advertising: Advertising, host: str = HOST
) -> bytes:
    """A multicast NOTIFY ssdp:alive or ssdp:byebye (UDA 1.1 §1.2.2, §1.2.3)."""
    lines = ["NOTIFY * HTTP/1.1", f"HOST: {host}"]
    if nts == ALIVE:
        lines += [
            f"CACHE-CONTROL: max-age={advertising.max_age}",
            f"LOCATION: {advertising.location}",
            f"SERVER: {advertising.server}",
        ]
    lines += [
        f"NT: {target.target}",
        f"NTS: {nts}",
        f"USN: {target.usn}",
        f"BOOTID.UPNP.ORG: {advertising.boot_id}",
        f"CONFIGID.UPNP.ORG: {advertising.config_id}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _versions(tree: DeviceTree) -> dict[tuple[str, str], tuple[int, str]]:
    """(device|service, name) → (version we offer, UDN of the device holding it)."""
    offered: dict[tuple[str, str], tuple[int, str]] = {}
    for device in tree.devices:
        offered[("device", device.name)] = (tree.version, device.udn)
        for service in device.services:
            version = int(tree.service_type(service).rsplit(":", 1)[1])
            offered[("service", str(service))] = (version, device.udn)
    return offered


def _offered(target: str, tree: DeviceTree) -> str | None:
    """The UDN answering a device or service type search, if we offer that version."""
    match = _TYPE.match(target)
    if match is None:
        return None
    version, udn = _versions(tree).get((match.group(1), match.group(2)), (0, ""))
    wanted = int(match.group(3))
    return udn if 1 <= wanted <= version else None
