"""The nft payloads the backend sends, as exact text (pure: no kernel, no I/O)."""

from __future__ import annotations

import math
from ipaddress import IPv4Address

import pytest

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.server.backends import BackendError, KernelEntry, ReconcileReport, libnft
from igd.server.backends.nftables import (
    MAX_ELEMENT_TIMEOUT,
    NftablesBackend,
    apply_commands,
    check_ifname,
    check_table_name,
    close_commands,
    element_timeout,
    list_command,
    open_commands,
    parse_entries,
    reconcile_plan,
)

LAN = IPv4Address("192.168.78.10")
OWNER = Owner(Mechanism.PCP, LAN)


def mapping(
    port: int = 18080,
    *,
    protocol: Protocol = Protocol.TCP,
    remote: str | None = None,
    internal: str = "192.168.78.10",
    internal_port: int = 8080,
    expires: float = 1100.0,
) -> Mapping:
    key = MappingKey(protocol, port, IPv4Address(remote) if remote else None)
    return Mapping(key, IPv4Address(internal), internal_port, OWNER, 100.0, expires)


def test_open_creates_everything_idempotently_and_rewrites_only_the_rules() -> None:
    assert open_commands("igd", "wan0") == (
        "add table ip igd\n"
        "add map ip igd portmap { type inet_proto . inet_service"
        " : ipv4_addr . inet_service; flags timeout; }\n"
        "add map ip igd portmap_remote { type ipv4_addr . inet_proto . inet_service"
        " : ipv4_addr . inet_service; flags timeout; }\n"
        "add chain ip igd prerouting { type nat hook prerouting priority dstnat;"
        " policy accept; }\n"
        "flush chain ip igd prerouting\n"
        'add rule ip igd prerouting iifname "wan0" meta l4proto { tcp, udp }'
        " dnat ip to ip saddr . meta l4proto . th dport map @portmap_remote\n"
        'add rule ip igd prerouting iifname "wan0" meta l4proto { tcp, udp }'
        " dnat ip to meta l4proto . th dport map @portmap\n"
    )
    assert "flush map" not in open_commands("igd", "wan0")


def test_apply_renewal_re_adds_before_deleting_then_adds_with_timeout() -> None:
    old, new = mapping(expires=1000.0), mapping(expires=4600.0)
    assert apply_commands("igd", [old], [new], now=1000.0) == (
        "add element ip igd portmap { tcp . 18080 : 192.168.78.10 . 8080 }\n"
        "delete element ip igd portmap { tcp . 18080 }\n"
        "add element ip igd portmap { tcp . 18080 timeout 3660s : 192.168.78.10 . 8080 }\n"
    )


def test_remote_host_entries_go_to_the_remote_map_with_saddr_first() -> None:
    m = mapping(5000, protocol=Protocol.UDP, remote="203.0.113.3", internal_port=5001)
    assert apply_commands("igd", [], [m], now=1099.5) == (
        "add element ip igd portmap_remote"
        " { 203.0.113.3 . udp . 5000 timeout 61s : 192.168.78.10 . 5001 }\n"
    )
    assert apply_commands("igd", [m], [], now=0.0) == (
        "add element ip igd portmap_remote { 203.0.113.3 . udp . 5000 : 192.168.78.10 . 5001 }\n"
        "delete element ip igd portmap_remote { 203.0.113.3 . udp . 5000 }\n"
    )


def test_nothing_to_do_is_an_empty_payload() -> None:
    assert apply_commands("igd", [], [], now=0.0) == ""


def test_timeout_is_remaining_lease_plus_grace_rounded_up() -> None:
    assert element_timeout(mapping(expires=1100.0), 1000.0) == 160
    assert element_timeout(mapping(expires=1100.0), 1000.2) == 160  # 99.8 s rounds up to 100
    assert element_timeout(mapping(expires=1100.0), 2000.0) == 60  # already expired: grace
    # Longer than the kernel can hold: no timeout rather than expiring under a live lease.
    assert element_timeout(mapping(expires=float(MAX_ELEMENT_TIMEOUT)), 0.0) is None
    assert element_timeout(mapping(expires=math.inf), 0.0) is None


def test_reconcile_removes_orphans_adds_missing_and_refreshes_matching() -> None:
    keep = mapping(1, expires=200.0)
    missing = mapping(2, expires=300.0)
    moved = mapping(3, internal_port=9999, expires=400.0)
    kernel = {
        KernelEntry.of(keep),
        KernelEntry(Protocol.UDP, 7, None, LAN, 7),  # orphan
        KernelEntry.of(mapping(3)),  # same key, old target: an orphan too
    }
    commands, report = reconcile_plan("igd", kernel, [keep, missing, moved], now=100.0)
    assert report == ReconcileReport(
        removed=(KernelEntry.of(mapping(3)), KernelEntry(Protocol.UDP, 7, None, LAN, 7)),
        added=(KernelEntry.of(missing), KernelEntry.of(moved)),
    )
    assert commands == (
        "add element ip igd portmap { tcp . 3 : 192.168.78.10 . 8080,"
        " udp . 7 : 192.168.78.10 . 7, tcp . 1 : 192.168.78.10 . 8080 }\n"
        "delete element ip igd portmap { tcp . 3, udp . 7, tcp . 1 }\n"
        "add element ip igd portmap { tcp . 1 timeout 160s : 192.168.78.10 . 8080,"
        " tcp . 2 timeout 260s : 192.168.78.10 . 8080,"
        " tcp . 3 timeout 360s : 192.168.78.10 . 9999 }\n"
    )


def test_many_elements_make_one_command_per_map_and_kind() -> None:
    wild, remote = mapping(1), mapping(2, remote="198.51.100.7")
    assert apply_commands("igd", [remote, wild], [mapping(3, expires=1060.0)], now=1000.0) == (
        "add element ip igd portmap { tcp . 1 : 192.168.78.10 . 8080 }\n"
        "add element ip igd portmap_remote { 198.51.100.7 . tcp . 2 : 192.168.78.10 . 8080 }\n"
        "delete element ip igd portmap { tcp . 1 }\n"
        "delete element ip igd portmap_remote { 198.51.100.7 . tcp . 2 }\n"
        "add element ip igd portmap { tcp . 3 timeout 120s : 192.168.78.10 . 8080 }\n"
    )


def test_reconcile_of_an_empty_kernel_and_no_mappings_does_nothing() -> None:
    assert reconcile_plan("igd", set(), [], now=0.0) == ("", ReconcileReport((), ()))


def test_close_and_list_commands() -> None:
    assert close_commands("igd") == "add table ip igd\ndelete table ip igd\n"
    assert list_command("igd") == "list table ip igd"


@pytest.mark.parametrize(
    "name", ["eth0", "wan0", "enp3s0f1", "br-lan", "ppp0.100", "a@b", "x" * 15]
)
def test_valid_interface_names_are_quoted_verbatim(name: str) -> None:
    assert f'iifname "{name}" meta' in open_commands("igd", check_ifname(name))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 16,  # IFNAMSIZ
        ".",
        "..",
        'wan0" accept; #',
        "wan0 ",
        "eth0:1",  # Linux refuses ':' in names (it is alias-label syntax)
        "a/b",
        "eth*",  # would be an nft wildcard
        "wan\n0",
        "wän0",
        "a\\b",
    ],
)
def test_interface_names_that_could_inject_nft_syntax_are_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        check_ifname(name)
    with pytest.raises(ValueError):
        open_commands("igd", name)
    with pytest.raises(ValueError):
        NftablesBackend("igd", name)


@pytest.mark.parametrize("name", ["", "1igd", "igd-x", 'igd"', "igd table", "a" * 33])
def test_table_names_must_be_bare_identifiers(name: str) -> None:
    with pytest.raises(ValueError):
        check_table_name(name)


def test_entries_with_out_of_range_ports_are_rejected() -> None:
    with pytest.raises(ValueError):
        apply_commands("igd", [], [mapping(0)], now=0.0)
    with pytest.raises(ValueError):
        apply_commands("igd", [], [mapping(internal_port=65536)], now=0.0)


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


def test_missing_libnftables_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libnft, "LIBRARY", "libnftables-absent.so.0")
    libnft._library.cache_clear()
    try:
        with pytest.raises(BackendError, match="install Debian's nftables package"):
            libnft.Nft()
    finally:
        libnft._library.cache_clear()
