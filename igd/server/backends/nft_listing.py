"""Reading our table back: nft's JSON listing of it, turned into the entries it holds.

Pure. The inverse of `nft_payload.elements`: an entry listed back equals the one written
(filters and PEER port included), which is what lets the daemon reconcile at start.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, summarize_address_range
from typing import Any

from igd.model import MappingKey, Protocol, RemoteFilter
from igd.server.backends import KernelEntry
from igd.server.backends.libnft import NftError
from igd.server.backends.nft_payload import (
    ADDR_MAP,
    ADDR_REMOTE_MAP,
    ALLOWED,
    ALLOWED_ADDR,
    CONTAINERS,
    COUNTED_ADDR,
    COUNTED_ADDR_REMOTE,
    COUNTED_REMOTE,
    COUNTERS,
    FILTERED,
    FILTERED_ADDR,
    FILTERED_REMOTE,
    FILTERS_REMOTE,
    PEERS,
    REMOTE_MAP,
    WILDCARD_MAP,
)

_Service = tuple[Protocol, int]
_RemoteKey = tuple[IPv4Address, Protocol, int]
_Endpoint = tuple[IPv4Address, int]
_AddrKey = tuple[IPv4Address, Protocol, int]
"""(external address, protocol, port) of a mapping on one of network.external_addresses."""


@dataclass(frozen=True, slots=True)
class Listing:
    """What our table holds: the entries its elements make up, and how many elements."""

    entries: frozenset[KernelEntry]
    elements: int
    """Elements in all our sets, those that make up no entry included."""


def _protocol(value: Any) -> Protocol:
    if isinstance(value, int):
        return Protocol.from_number(value)
    return Protocol(value)


def _port(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if type(value) is not int:
        raise ValueError(f"unexpected port {value!r}")
    return value


def _fields(value: Any) -> list[Any]:
    """The fields of a key or data: a concatenation's list, or a single value."""
    if isinstance(value, dict) and "elem" in value:  # elements with a timeout wrap their key
        value = value["elem"]["val"]
    if isinstance(value, dict):
        return list(value["concat"])
    return [value]


def _network(first: Any, last: Any) -> IPv4Network | None:
    """The prefix spanning first..last; None if the span is not one prefix."""
    blocks = list(summarize_address_range(IPv4Address(first), IPv4Address(last)))
    return blocks[0] if len(blocks) == 1 else None


def _elements(doc: dict[str, Any], table: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {name: [] for name in CONTAINERS}
    for obj in doc.get("nftables", []):
        if not isinstance(obj, dict):
            continue
        body = obj.get("map") or obj.get("set")
        if isinstance(body, dict) and body.get("table") == table and body.get("name") in found:
            found[body["name"]] = list(body.get("elem", []))
    return found


def _each(items: list[Any], name: str, read: Callable[[list[Any], list[Any]], None]) -> None:
    """Call read(key fields, data fields) for every element; NftError if one is malformed."""
    for item in items:
        try:
            if isinstance(item, list):  # a map element is [key, data]
                read(_fields(item[0]), _fields(item[1]))
            else:
                read(_fields(item), [])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise NftError(f"unexpected element in {name}: {item!r}") from exc


def parse_listing(doc: dict[str, Any], table: str) -> Listing:
    """The entries in a JSON listing of our table (`nft -j list table ip <table>`)."""
    found = _elements(doc, table)
    wild: dict[_Service, _Endpoint] = {}
    remote: dict[_RemoteKey, _Endpoint] = {}
    filtered: set[_Service] = set()
    filtered_remote: set[_RemoteKey] = set()
    allowed: defaultdict[_Service, list[RemoteFilter]] = defaultdict(list)
    kept: defaultdict[_RemoteKey, dict[int, RemoteFilter]] = defaultdict(dict)
    peers: defaultdict[_RemoteKey, list[tuple[_Endpoint, int]]] = defaultdict(list)

    def read_wild(key: list[Any], data: list[Any]) -> None:
        wild[_protocol(key[0]), _port(key[1])] = (IPv4Address(data[0]), _port(data[1]))

    def read_remote(key: list[Any], data: list[Any]) -> None:
        at = (IPv4Address(key[0]), _protocol(key[1]), _port(key[2]))
        remote[at] = (IPv4Address(data[0]), _port(data[1]))

    def read_filtered(key: list[Any], data: list[Any]) -> None:
        filtered.add((_protocol(key[0]), _port(key[1])))

    def read_filtered_remote(key: list[Any], data: list[Any]) -> None:
        filtered_remote.add((IPv4Address(key[0]), _protocol(key[1]), _port(key[2])))

    def read_allowed(key: list[Any], data: list[Any]) -> None:
        network = _network(key[0], key[1])
        if network is not None:  # no packet ever matches a span that is not a prefix
            allowed[_protocol(key[3]), _port(key[4])].append(RemoteFilter(network, _port(key[2])))

    def read_kept(key: list[Any], data: list[Any]) -> None:
        network = _network(data[0], data[1])
        if network is not None:
            at = (IPv4Address(key[0]), _protocol(key[1]), _port(key[2]))
            kept[at][_port(key[3])] = RemoteFilter(network, _port(data[2]))

    def read_peer(key: list[Any], data: list[Any]) -> None:
        internal = (IPv4Address(key[0]), _port(key[2]))
        at = (IPv4Address(key[3]), _protocol(key[1]), _port(data[0]))
        peers[at].append((internal, _port(key[4])))

    readers = {
        WILDCARD_MAP: read_wild,
        REMOTE_MAP: read_remote,
        FILTERED: read_filtered,
        ALLOWED: read_allowed,
        FILTERED_REMOTE: read_filtered_remote,
        FILTERS_REMOTE: read_kept,
        PEERS: read_peer,
    }
    for name, read in readers.items():
        _each(found[name], name, read)
    entries = _entries(wild, remote, filtered, filtered_remote, allowed, kept, peers)
    entries |= _addressed(found)
    return Listing(frozenset(entries), sum(len(items) for items in found.values()))


def _entries(
    wild: dict[_Service, _Endpoint],
    remote: dict[_RemoteKey, _Endpoint],
    filtered: set[_Service],
    filtered_remote: set[_RemoteKey],
    allowed: defaultdict[_Service, list[RemoteFilter]],
    kept: defaultdict[_RemoteKey, dict[int, RemoteFilter]],
    peers: defaultdict[_RemoteKey, list[tuple[_Endpoint, int]]],
) -> set[KernelEntry]:
    """The default address's entries, from its sets' elements."""
    entries: set[KernelEntry] = set()
    for (protocol, port), (address, internal_port) in wild.items():
        # Filters count only where the mapping is marked filtered: that is what the rules do.
        filters = tuple(sorted(allowed[protocol, port])) if (protocol, port) in filtered else ()
        entries.add(KernelEntry(protocol, port, None, address, internal_port, filters))
    for at, (address, internal_port) in remote.items():
        host, protocol, port = at
        filters = tuple(f for _, f in sorted(kept[at].items())) if at in filtered_remote else ()
        matches = [p for endpoint, p in peers.get(at, []) if endpoint == (address, internal_port)]
        peer_port = min(matches, default=0)
        entries.add(KernelEntry(protocol, port, host, address, internal_port, filters, peer_port))
    return entries


def _addressed(found: dict[str, list[Any]]) -> set[KernelEntry]:
    """The entries of mappings on network.external_addresses (the `*_addr` sets)."""
    wild: dict[_AddrKey, _Endpoint] = {}
    remote: dict[tuple[IPv4Address, _AddrKey], _Endpoint] = {}
    filtered: set[_AddrKey] = set()
    allowed: defaultdict[_AddrKey, list[RemoteFilter]] = defaultdict(list)

    def at(key: list[Any]) -> _AddrKey:
        return IPv4Address(key[0]), _protocol(key[1]), _port(key[2])

    def read_wild(key: list[Any], data: list[Any]) -> None:
        wild[at(key)] = (IPv4Address(data[0]), _port(data[1]))

    def read_remote(key: list[Any], data: list[Any]) -> None:
        remote[IPv4Address(key[0]), at(key[1:])] = (IPv4Address(data[0]), _port(data[1]))

    def read_filtered(key: list[Any], data: list[Any]) -> None:
        filtered.add(at(key))

    _each(found[ADDR_MAP], ADDR_MAP, read_wild)
    _each(found[ADDR_REMOTE_MAP], ADDR_REMOTE_MAP, read_remote)
    _each(found[FILTERED_ADDR], FILTERED_ADDR, read_filtered)
    for protocol, name in ALLOWED_ADDR.items():

        def read_allowed(key: list[Any], data: list[Any], protocol: Protocol = protocol) -> None:
            network = _network(key[0], key[1])
            if network is not None:
                mapping = (IPv4Address(key[3]), protocol, _port(key[4]))
                allowed[mapping].append(RemoteFilter(network, _port(key[2])))

        _each(found[name], name, read_allowed)
    entries: set[KernelEntry] = set()
    for key, (address, internal_port) in wild.items():
        filters = tuple(sorted(allowed[key])) if key in filtered else ()
        external, protocol, port = key
        entries.add(KernelEntry(protocol, port, None, address, internal_port, filters, 0, external))
    for (host, key), (address, internal_port) in remote.items():
        external, protocol, port = key
        entries.add(KernelEntry(protocol, port, host, address, internal_port, (), 0, external))
    return entries


def parse_entries(doc: dict[str, Any], table: str) -> set[KernelEntry]:
    """The entries in a JSON listing of our table."""
    return set(parse_listing(doc, table).entries)


Counts = tuple[int, int]
"""Packets and bytes."""


def parse_counters(doc: dict[str, Any], table: str) -> dict[MappingKey, Counts]:
    """Packets and bytes per mapping key, from a listing of the `counted` sets."""
    found = _elements(doc, table)
    counts: dict[MappingKey, Counts] = {}

    def read(name: str, item: Any) -> None:
        body = item["elem"]
        fields = _fields(body["val"])
        remote_first = name in (COUNTED_REMOTE, COUNTED_ADDR_REMOTE)
        remote = IPv4Address(fields.pop(0)) if remote_first else None
        addressed = name in (COUNTED_ADDR, COUNTED_ADDR_REMOTE)
        external = IPv4Address(fields.pop(0)) if addressed else None
        key = MappingKey(_protocol(fields[0]), _port(fields[1]), remote, external)
        counter = body.get("counter") or {"packets": 0, "bytes": 0}
        counts[key] = (int(counter["packets"]), int(counter["bytes"]))

    for name in COUNTERS:
        for item in found[name]:
            try:
                read(name, item)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise NftError(f"unexpected element in {name}: {item!r}") from exc
    return counts
