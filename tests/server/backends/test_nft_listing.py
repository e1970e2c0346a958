"""Reading our table back from nft's JSON listing (pure: golden listings, no kernel)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from igd.model import MappingKey, Protocol, RemoteFilter
from igd.server.backends import KernelEntry
from igd.server.backends.libnft import NftError
from igd.server.backends.nft_listing import parse_counters, parse_entries, parse_listing
from igd.server.backends.nft_payload import elements

LAN = IPv4Address("192.168.78.10")
HOST = IPv4Address("203.0.113.3")
NET24 = IPv4Network("203.0.113.0/24")
HOST2 = IPv4Network("203.0.113.2/32")


def test_parse_entries_reads_both_maps_of_a_json_listing() -> None:
    doc = {
        "nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "igd", "handle": 2}},
            {
                "map": {
                    "family": "ip",
                    "name": "portmap",
                    "table": "igd",
                    "type": ["inet_proto", "inet_service"],
                    "map": "ipv4_addr . inet_service",
                    "flags": ["timeout"],
                    "elem": [
                        [
                            {"elem": {"val": {"concat": ["tcp", 18080]}, "timeout": 3660}},
                            {"concat": ["192.168.78.10", 8080]},
                        ],
                        # Without a timeout the key is bare; numeric output gives numbers.
                        [{"concat": [17, 53]}, {"concat": ["192.168.78.11", "53"]}],
                    ],
                }
            },
            {
                "map": {
                    "family": "ip",
                    "name": "portmap_remote",
                    "table": "igd",
                    "elem": [
                        [
                            {"elem": {"val": {"concat": ["203.0.113.3", "udp", 5000]}}},
                            {"concat": ["192.168.78.10", 5001]},
                        ]
                    ],
                }
            },
            {"map": {"family": "ip", "name": "other", "table": "igd", "elem": [[1, 2]]}},
        ]
    }
    assert parse_entries(doc, "igd") == {
        KernelEntry(Protocol.TCP, 18080, None, LAN, 8080),
        KernelEntry(Protocol.UDP, 53, None, IPv4Address("192.168.78.11"), 53),
        KernelEntry(Protocol.UDP, 5000, IPv4Address("203.0.113.3"), LAN, 5001),
    }
    assert parse_entries({"nftables": []}, "igd") == set()


GOLDEN = Path(__file__).with_name("nft_listing_filters_peer.json")
"""`nft -j list table ip igd` (1.0.6) after adding the three entries below, sets only,
without handles and `expires`."""


def test_parse_reads_filters_and_peer_ports_back_exactly() -> None:
    listing = parse_listing({"nftables": json.loads(GOLDEN.read_text())}, "igd")
    assert listing.entries == {
        KernelEntry(
            Protocol.TCP, 18081, None, LAN, 8080, (RemoteFilter(NET24), RemoteFilter(HOST2, 5000))
        ),
        KernelEntry(
            Protocol.UDP,
            5000,
            HOST,
            LAN,
            5001,
            (RemoteFilter(IPv4Network("198.51.100.0/24"), 9), RemoteFilter(NET24)),
        ),
        KernelEntry(Protocol.UDP, 40000, IPv4Address("198.51.100.7"), LAN, 4000, (), 7000),
    }
    assert listing.elements == 14
    # Those entries written again give exactly the elements listed.
    written = {(e.container, e.key) for entry in listing.entries for e in elements(entry)}
    assert len(written) == listing.elements


def test_counters_are_read_per_mapping_key() -> None:
    doc = {"nftables": json.loads(GOLDEN.read_text())}
    assert parse_counters(doc, "igd") == {
        MappingKey(Protocol.TCP, 18081, None): (12, 3400),
        MappingKey(Protocol.UDP, 5000, HOST): (0, 0),
        MappingKey(Protocol.UDP, 40000, IPv4Address("198.51.100.7")): (5, 420),
    }
    assert parse_counters({"nftables": []}, "igd") == {}
    bad = {"nftables": [{"set": {"name": "counted", "table": "igd", "elem": ["tcp"]}}]}
    with pytest.raises(NftError, match="counted"):
        parse_counters(bad, "igd")


def test_parse_shows_only_what_the_rules_enforce() -> None:
    doc = {"nftables": json.loads(GOLDEN.read_text())}
    for obj in doc["nftables"]:
        body = obj.get("set") or obj.get("map")
        if body["name"] in ("filtered", "filtered_remote", "portmap_remote"):
            body["elem"] = []  # not marked filtered; PEER flow without its DNAT entry
        if body["name"] == "allowed":  # a span that is no prefix matches no packet
            body["elem"].append({"concat": ["203.0.113.1", "203.0.113.2", 0, "tcp", 18081]})
    listing = parse_listing(doc, "igd")
    assert listing.entries == {KernelEntry(Protocol.TCP, 18081, None, LAN, 8080)}
    assert listing.elements == 11  # the three counter elements included
