"""The nft payloads the backend sends, as exact text (pure: no kernel, no I/O)."""

from __future__ import annotations

import math
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol, RemoteFilter
from igd.server.backends import KernelEntry, ReconcileReport
from igd.server.backends.nft_payload import (
    MAX_ELEMENT_TIMEOUT,
    Guard,
    admit_commands,
    admit_rules,
    apply_commands,
    check_ifname,
    check_table_name,
    close_commands,
    count_commands,
    count_rules,
    destination_commands,
    element_timeout,
    elements,
    filter_shapes,
    list_command,
    open_commands,
    reconcile_plan,
)
from igd.server.backends.nftables import NftablesBackend

LAN = IPv4Address("192.168.78.10")
OWNER = Owner(Mechanism.PCP, LAN)
HOST = IPv4Address("203.0.113.3")
NET24 = IPv4Network("203.0.113.0/24")
HOST2 = IPv4Network("203.0.113.2/32")


def mapping(
    port: int = 18080,
    *,
    protocol: Protocol = Protocol.TCP,
    remote: str | None = None,
    internal: str = "192.168.78.10",
    internal_port: int = 8080,
    expires: float = 1100.0,
    filters: tuple[RemoteFilter, ...] = (),
) -> Mapping:
    key = MappingKey(protocol, port, IPv4Address(remote) if remote else None)
    return Mapping(
        key, IPv4Address(internal), internal_port, OWNER, 100.0, expires, filters=filters
    )


def test_open_creates_everything_idempotently_and_rewrites_only_the_rules() -> None:
    lines = open_commands("igd", "wan0", hairpin=False, counters=False).splitlines()
    inbound = 'iifname "wan0" ip daddr @destinations meta l4proto { tcp, udp }'
    assert lines[:33] == [
        "add table ip igd",
        "add map ip igd portmap { type inet_proto . inet_service"
        " : ipv4_addr . inet_service; flags timeout; }",
        "add map ip igd portmap_remote { type ipv4_addr . inet_proto . inet_service"
        " : ipv4_addr . inet_service; flags timeout; }",
        "add set ip igd filtered { type inet_proto . inet_service; flags timeout; }",
        "add set ip igd allowed { type ipv4_addr . ipv4_addr . inet_service . inet_proto"
        " . inet_service; flags timeout; }",
        "add set ip igd filtered_remote { type ipv4_addr . inet_proto . inet_service;"
        " flags timeout; }",
        "add set ip igd allowed_remote { type ipv4_addr . inet_service . inet_proto"
        " . inet_service; flags timeout; }",
        "add map ip igd filters_remote { type ipv4_addr . inet_proto . inet_service"
        " . inet_service : ipv4_addr . ipv4_addr . inet_service; flags timeout; }",
        "add map ip igd peers { type ipv4_addr . inet_proto . inet_service . ipv4_addr"
        " . inet_service : inet_service; flags timeout; }",
        "add set ip igd counted { type inet_proto . inet_service; counter; }",
        "add set ip igd counted_remote { type ipv4_addr . inet_proto . inet_service; counter; }",
        "add map ip igd portmap_addr { type ipv4_addr . inet_proto . inet_service"
        " : ipv4_addr . inet_service; flags timeout; }",
        "add map ip igd portmap_addr_remote { type ipv4_addr . ipv4_addr . inet_proto"
        " . inet_service : ipv4_addr . inet_service; flags timeout; }",
        "add set ip igd filtered_addr { type ipv4_addr . inet_proto . inet_service;"
        " flags timeout; }",
        *(
            f"add set ip igd allowed_addr_{p} {{ type ipv4_addr . ipv4_addr . inet_service"
            " . ipv4_addr . inet_service; flags timeout; }"
            for p in ("tcp", "udp")
        ),
        "add set ip igd counted_addr { type ipv4_addr . inet_proto . inet_service; counter; }",
        "add set ip igd counted_addr_remote { type ipv4_addr . ipv4_addr . inet_proto"
        " . inet_service; counter; }",
        "add chain ip igd prerouting { type nat hook prerouting priority dstnat; policy accept; }",
        "add chain ip igd admit",
        "add chain ip igd admit_remote",
        "add chain ip igd admit_addr_tcp",
        "add chain ip igd admit_addr_udp",
        "add chain ip igd postrouting { type nat hook postrouting priority srcnat - 10;"
        " policy accept; }",
        "add chain ip igd forward { type filter hook forward priority filter - 10;"
        " policy accept; }",
        "add set ip igd destinations { type ipv4_addr; }",
        "add set ip igd addressed { type ipv4_addr; }",
        "flush set ip igd addressed",
        *(
            f"add set ip igd {name} {{ type ipv4_addr; size 65536; flags dynamic,timeout;"
            " timeout 1m; }"
            for name in ("pxp_over", "pxp_fair", "http_over", "http_fair")
        ),
        "add chain ip igd input { type filter hook input priority filter - 10; policy accept; }",
    ]
    # Every rule is rewritten (and only rules: no set is ever flushed here).
    assert lines[33:41] == [
        f"flush chain ip igd {chain}"
        for chain in (
            "prerouting", "admit", "admit_remote", "admit_addr_tcp", "admit_addr_udp",
            "postrouting", "input", "forward",
        )
    ]  # fmt: skip
    rules = [line for line in lines if line.startswith("add rule")]
    assert len(rules) == len(lines) - 41
    assert not [r for r in rules if " forward " in r]  # no counters asked for
    assert not [r for r in rules if " input " in r]  # no guard asked for
    assert [r for r in rules if " prerouting " in r] == [
        f"add rule ip igd prerouting {inbound} ip saddr . meta l4proto . th dport"
        " @filtered_remote jump admit_remote",
        f"add rule ip igd prerouting {inbound}"
        " dnat ip to ip saddr . meta l4proto . th dport map @portmap_remote",
        f"add rule ip igd prerouting {inbound} meta l4proto . th dport @filtered jump admit",
        f"add rule ip igd prerouting {inbound} dnat ip to meta l4proto . th dport map @portmap",
    ]
    assert [r for r in rules if " postrouting " in r] == [
        'add rule ip igd postrouting oifname "wan0" meta l4proto { tcp, udp } masquerade'
        " to : ip saddr . meta l4proto . th sport . ip daddr . th dport map @peers"
    ]
    assert [r for r in rules if " admit_remote " in r] == [
        "add rule ip igd admit_remote ip saddr . th sport . meta l4proto . th dport"
        " @allowed_remote return",
        "add rule ip igd admit_remote ip saddr . th sport & 0 . meta l4proto . th dport"
        " @allowed_remote return",
        "add rule ip igd admit_remote drop",
    ]
    # Only the further addresses' set, which the configuration fills, never a mapping's.
    flushed = [line for line in open_commands("igd", "wan0").splitlines() if "flush set" in line]
    assert flushed == ["flush set ip igd addressed"]
    assert "flush map" not in open_commands("igd", "wan0")


def test_hairpin_takes_packets_for_the_external_address_from_any_side_and_masquerades() -> None:
    rules = [r for r in open_commands("igd", "wan0").splitlines() if r.startswith("add rule")]
    prerouting = [r for r in rules if " prerouting " in r]
    # RFC 4787 §6: LAN hosts use the external address and port too; still only packets
    # addressed to the gateway's own external addresses.
    assert len(prerouting) == 4
    assert all(
        r.startswith("add rule ip igd prerouting ip daddr @destinations meta l4proto")
        for r in prerouting
    )
    assert [r for r in rules if " postrouting " in r][-1] == (
        'add rule ip igd postrouting iifname != "wan0" oifname != "wan0"'
        " ct status dnat ct original ip daddr @destinations masquerade"
    )


def test_counters_count_every_packet_of_mapped_flows_once() -> None:
    rules = [r for r in open_commands("igd", "wan0").splitlines() if " forward " in r]
    mapped = "ct status dnat ct original ip daddr @destinations meta l4proto { tcp, udp }"
    assert rules[-2:] == [
        f"add rule ip igd forward {mapped} ct original ip saddr . meta l4proto"
        " . ct original proto-dst @counted_remote accept",
        f"add rule ip igd forward {mapped} meta l4proto . ct original proto-dst @counted",
    ]
    # With no remote-host-specific entry in the table, one lookup per packet.
    rules = [r for r in open_commands("igd", "wan0", count_remote=False).splitlines()
             if " forward " in r]  # fmt: skip
    assert rules[-1:] == [
        f"add rule ip igd forward {mapped} meta l4proto . ct original proto-dst @counted"
    ]
    both = [f"add rule ip igd forward {r}" for r in count_rules(True, False)]
    assert count_commands("igd", True, []).splitlines() == ["flush chain ip igd forward", *both]
    assert len(count_rules(True, True)) == 4 and len(count_rules(False, True)) == 2


def test_admit_tests_every_prefix_length_longest_first_then_drops() -> None:
    rules = admit_rules()
    # Two lookups (this source port, any port) for each prefix length 32..0, then drop.
    assert len(rules) == 2 * 33 + 1 and rules[-1] == "drop"
    tail = "meta l4proto . th dport @allowed return"
    assert rules[:2] == [
        f"ip saddr . ip saddr . th sport . {tail}",
        f"ip saddr . ip saddr . th sport & 0 . {tail}",
    ]
    assert rules[16] == f"ip saddr & 255.255.255.0 . ip saddr | 0.0.0.255 . th sport . {tail}"
    assert rules[-2] == f"ip saddr & 0.0.0.0 . ip saddr | 255.255.255.255 . th sport & 0 . {tail}"


def test_admit_can_test_only_the_filter_shapes_in_use() -> None:
    every = admit_rules()
    # A /24 of any port and a /32 with a port: one lookup each, longest first.
    rules = admit_rules([(24, False), (32, True), (24, False)])
    assert rules == [every[0], every[17], "drop"]
    # Both shapes of one length: the port's lookup first, as in the full chain.
    assert admit_rules([(24, False), (24, True)]) == [*every[16:18], "drop"]
    assert admit_rules([]) == ["drop"]
    for bad in [(33, False), (-1, True), (24, 0)]:
        with pytest.raises(ValueError, match="filter shape"):
            admit_rules([bad])  # type: ignore[list-item]
    entries = [
        KernelEntry(Protocol.TCP, 1, None, LAN, 1, (RemoteFilter(NET24), RemoteFilter(HOST2))),
        KernelEntry(Protocol.TCP, 3, None, LAN, 1, (RemoteFilter(NET24, 4000),)),
        KernelEntry(Protocol.TCP, 2, HOST2, LAN, 1, (RemoteFilter(IPv4Network("10.0.0.0/8")),)),
    ]
    # Remote-host entries use admit_remote: their filters add no shape.
    assert filter_shapes(entries) == {(24, False), (24, True), (32, False)}
    assert filter_shapes(entries[:1]) == {(24, False), (32, False)}
    text = admit_commands("igd", [(32, False)])
    lines = text.splitlines()
    assert lines[0] == "flush chain ip igd admit"
    assert lines[1] == f"add rule ip igd admit {every[1]}"
    # The same shapes in the further addresses' chains: one lookup each, then drop.
    assert len(lines) == 3 * 3 and lines[3] == "flush chain ip igd admit_addr_tcp"
    assert lines[4].startswith("add rule ip igd admit_addr_tcp ip saddr . ip saddr . th sport & 0 ")


def test_apply_renewal_re_adds_before_deleting_then_adds_with_timeout() -> None:
    old, new = mapping(expires=1000.0), mapping(expires=4600.0)
    assert apply_commands("igd", [old], [new], now=1000.0) == (
        "add element ip igd portmap { tcp . 18080 : 192.168.78.10 . 8080 }\n"
        "delete element ip igd portmap { tcp . 18080 }\n"
        "add element ip igd portmap { tcp . 18080 timeout 3660s : 192.168.78.10 . 8080 }\n"
        # The counter element is kept (adding it again is a no-op): the counts survive.
        "add element ip igd counted { tcp . 18080 }\n"
    )


def test_remote_host_entries_go_to_the_remote_map_with_saddr_first() -> None:
    m = mapping(5000, protocol=Protocol.UDP, remote="203.0.113.3", internal_port=5001)
    assert apply_commands("igd", [], [m], now=1099.5) == (
        "add element ip igd portmap_remote"
        " { 203.0.113.3 . udp . 5000 timeout 61s : 192.168.78.10 . 5001 }\n"
        "add element ip igd counted_remote { 203.0.113.3 . udp . 5000 }\n"
    )
    assert apply_commands("igd", [m], [], now=0.0) == (
        "add element ip igd portmap_remote { 203.0.113.3 . udp . 5000 : 192.168.78.10 . 5001 }\n"
        "add element ip igd counted_remote { 203.0.113.3 . udp . 5000 }\n"
        "delete element ip igd portmap_remote { 203.0.113.3 . udp . 5000 }\n"
        "delete element ip igd counted_remote { 203.0.113.3 . udp . 5000 }\n"
    )


def test_filtered_mapping_is_marked_and_lists_the_peers_its_filters_admit() -> None:
    m = mapping(filters=(RemoteFilter(NET24), RemoteFilter(HOST2, 5000)), expires=1100.0)
    assert apply_commands("igd", [], [m], now=1000.0) == (
        "add element ip igd portmap { tcp . 18080 timeout 160s : 192.168.78.10 . 8080 }\n"
        "add element ip igd filtered { tcp . 18080 timeout 160s }\n"
        # A prefix is held as its first and last address; peer port 0 = any port.
        "add element ip igd allowed { 203.0.113.0 . 203.0.113.255 . 0 . tcp . 18080"
        " timeout 160s, 203.0.113.2 . 203.0.113.2 . 5000 . tcp . 18080 timeout 160s }\n"
        "add element ip igd counted { tcp . 18080 }\n"
    )


def test_renewal_with_other_filters_swaps_them_in_the_same_transaction() -> None:
    old = mapping(filters=(RemoteFilter(HOST2),), expires=1100.0)
    new = mapping(expires=1100.0)  # the filters were cleared
    assert apply_commands("igd", [old], [new], now=1000.0) == (
        "add element ip igd portmap { tcp . 18080 : 192.168.78.10 . 8080 }\n"
        "add element ip igd filtered { tcp . 18080 }\n"
        "add element ip igd allowed { 203.0.113.2 . 203.0.113.2 . 0 . tcp . 18080 }\n"
        "delete element ip igd portmap { tcp . 18080 }\n"
        "delete element ip igd filtered { tcp . 18080 }\n"
        "delete element ip igd allowed { 203.0.113.2 . 203.0.113.2 . 0 . tcp . 18080 }\n"
        "add element ip igd portmap { tcp . 18080 timeout 160s : 192.168.78.10 . 8080 }\n"
        "add element ip igd counted { tcp . 18080 }\n"
    )


def test_filters_of_a_remote_host_entry_reduce_to_that_host_and_are_kept_whole() -> None:
    filters = (RemoteFilter(IPv4Network("198.51.100.0/24"), 9), RemoteFilter(NET24, 7))
    m = mapping(5000, protocol=Protocol.UDP, remote="203.0.113.3", filters=filters)
    assert apply_commands("igd", [], [m], now=1100.0) == (
        "add element ip igd portmap_remote"
        " { 203.0.113.3 . udp . 5000 timeout 60s : 192.168.78.10 . 8080 }\n"
        "add element ip igd filtered_remote { 203.0.113.3 . udp . 5000 timeout 60s }\n"
        # Only 203.0.113.0/24 covers the host: it may come from port 7, and from no other.
        "add element ip igd allowed_remote { 203.0.113.3 . 7 . udp . 5000 timeout 60s }\n"
        "add element ip igd filters_remote"
        " { 203.0.113.3 . udp . 5000 . 0 timeout 60s : 198.51.100.0 . 198.51.100.255 . 9,"
        " 203.0.113.3 . udp . 5000 . 1 timeout 60s : 203.0.113.0 . 203.0.113.255 . 7 }\n"
        "add element ip igd counted_remote { 203.0.113.3 . udp . 5000 }\n"
    )


def test_peer_entry_forwards_from_its_peer_and_names_the_port_its_flow_leaves_with() -> None:
    m = mapping(40000, protocol=Protocol.UDP, remote="198.51.100.7", internal_port=4000)
    peer = replace(m, peer_port=7000)
    assert apply_commands("igd", [], [peer], now=1100.0) == (
        "add element ip igd portmap_remote"
        " { 198.51.100.7 . udp . 40000 timeout 60s : 192.168.78.10 . 4000 }\n"
        "add element ip igd peers"
        " { 192.168.78.10 . udp . 4000 . 198.51.100.7 . 7000 timeout 60s : 40000 }\n"
        "add element ip igd counted_remote { 198.51.100.7 . udp . 40000 }\n"
    )
    assert apply_commands("igd", [peer], [], now=0.0).splitlines()[-3:] == [
        "delete element ip igd portmap_remote { 198.51.100.7 . udp . 40000 }",
        "delete element ip igd peers { 192.168.78.10 . udp . 4000 . 198.51.100.7 . 7000 }",
        "delete element ip igd counted_remote { 198.51.100.7 . udp . 40000 }",
    ]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (KernelEntry(Protocol.TCP, 1, None, LAN, 1, peer_port=7), "PEER entry needs"),
        (KernelEntry(Protocol.TCP, 1, HOST, LAN, 1, peer_port=65536), "invalid port"),
        (KernelEntry(Protocol.TCP, 1, None, LAN, 1, (RemoteFilter(NET24, -1),)), "invalid port"),
        (KernelEntry(Protocol.TCP, 1, None, LAN, 1, (RemoteFilter(NET24),) * 2), "duplicate"),
        (KernelEntry(Protocol.TCP, 1, None, LAN, 1, ("203.0.113.0/24",)), "invalid filter"),  # type: ignore[arg-type]
    ],
)
def test_entries_nft_cannot_hold_are_rejected(entry: KernelEntry, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        elements(entry)


def test_nothing_to_do_is_an_empty_payload() -> None:
    assert apply_commands("igd", [], [], now=0.0) == ""


def test_timeout_is_remaining_lease_plus_grace_rounded_up() -> None:
    assert element_timeout(mapping(expires=1100.0), 1000.0) == 160
    assert element_timeout(mapping(expires=1100.0), 1000.2) == 160  # 99.8 s rounds up to 100
    assert element_timeout(mapping(expires=1100.0), 2000.0) == 60  # already expired: grace
    # Longer than the kernel can hold: no timeout rather than expiring under a live lease.
    assert element_timeout(mapping(expires=float(MAX_ELEMENT_TIMEOUT)), 0.0) is None
    assert element_timeout(mapping(expires=math.inf), 0.0) is None


def test_reconcile_flushes_and_refills_every_set_and_reports_the_difference() -> None:
    keep = mapping(1, expires=200.0)
    missing = mapping(2, expires=300.0, filters=(RemoteFilter(HOST2),))
    moved = mapping(3, internal_port=9999, expires=400.0)
    kernel = {
        KernelEntry.of(keep),
        KernelEntry(Protocol.UDP, 7, None, LAN, 7),  # orphan
        KernelEntry.of(mapping(3)),  # same key, old target: an orphan too
    }
    commands, report = reconcile_plan("igd", kernel, [keep, missing, moved], now=100.0, held=3)
    assert report == ReconcileReport(
        removed=(KernelEntry.of(mapping(3)), KernelEntry(Protocol.UDP, 7, None, LAN, 7)),
        added=(KernelEntry.of(missing), KernelEntry.of(moved)),
    )
    flushes = [
        f"flush {kind} ip igd {name}"
        for kind, name in [
            ("map", "portmap"), ("map", "portmap_remote"), ("set", "filtered"),
            ("set", "allowed"), ("set", "filtered_remote"), ("set", "allowed_remote"),
            ("map", "filters_remote"), ("map", "peers"), ("set", "counted"),
            ("set", "counted_remote"), ("map", "portmap_addr"), ("map", "portmap_addr_remote"),
            ("set", "filtered_addr"), ("set", "allowed_addr_tcp"), ("set", "allowed_addr_udp"),
            ("set", "counted_addr"), ("set", "counted_addr_remote"),
        ]
    ]  # fmt: skip
    assert commands.splitlines() == [
        *flushes,
        "add element ip igd portmap { tcp . 1 timeout 160s : 192.168.78.10 . 8080,"
        " tcp . 2 timeout 260s : 192.168.78.10 . 8080,"
        " tcp . 3 timeout 360s : 192.168.78.10 . 9999 }",
        "add element ip igd filtered { tcp . 2 timeout 260s }",
        "add element ip igd allowed { 203.0.113.2 . 203.0.113.2 . 0 . tcp . 2 timeout 260s }",
        "add element ip igd counted { tcp . 1, tcp . 2, tcp . 3 }",
    ]


def test_reconcile_clears_elements_that_make_up_no_entry() -> None:
    # A hand-edited table: elements, but none of them a whole entry.
    commands, report = reconcile_plan("igd", set(), [], now=0.0, held=2)
    assert report == ReconcileReport((), ())
    assert commands.count("flush ") == 17 and "add element" not in commands


def test_many_elements_make_one_command_per_map_and_kind() -> None:
    wild, remote = mapping(1), mapping(2, remote="198.51.100.7")
    assert apply_commands("igd", [remote, wild], [mapping(3, expires=1060.0)], now=1000.0) == (
        "add element ip igd portmap { tcp . 1 : 192.168.78.10 . 8080 }\n"
        "add element ip igd portmap_remote { 198.51.100.7 . tcp . 2 : 192.168.78.10 . 8080 }\n"
        "add element ip igd counted { tcp . 1 }\n"
        "add element ip igd counted_remote { 198.51.100.7 . tcp . 2 }\n"
        "delete element ip igd portmap { tcp . 1 }\n"
        "delete element ip igd portmap_remote { 198.51.100.7 . tcp . 2 }\n"
        "delete element ip igd counted { tcp . 1 }\n"
        "delete element ip igd counted_remote { 198.51.100.7 . tcp . 2 }\n"
        "add element ip igd portmap { tcp . 3 timeout 120s : 192.168.78.10 . 8080 }\n"
        "add element ip igd counted { tcp . 3 }\n"
    )


def test_reconcile_of_an_empty_kernel_and_no_mappings_does_nothing() -> None:
    assert reconcile_plan("igd", set(), [], now=0.0, held=0) == ("", ReconcileReport((), ()))


def test_close_and_list_commands() -> None:
    assert close_commands("igd") == "add table ip igd\ndelete table ip igd\n"
    assert list_command("igd") == "list table ip igd"


@pytest.mark.parametrize(
    "name", ["eth0", "wan0", "enp3s0f1", "br-lan", "ppp0.100", "a@b", "x" * 15]
)
def test_valid_interface_names_are_quoted_verbatim(name: str) -> None:
    text = open_commands("igd", check_ifname(name), hairpin=False)
    assert f'iifname "{name}" ip daddr' in text


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


def test_destinations_are_replaced_in_one_transaction() -> None:
    text = open_commands("igd", "wan0", [IPv4Address("198.51.100.9"), IPv4Address("10.0.0.1")])
    assert text.endswith(
        "flush set ip igd destinations\n"
        "add element ip igd destinations { 10.0.0.1, 198.51.100.9 }\n"
    )
    assert destination_commands("igd", []) == "flush set ip igd destinations\n"


def test_guard_rules_follow_the_limits() -> None:
    guard = Guard.from_limits(500, 1000, 5000)
    assert (guard.fair, guard.total) == (5, 500)
    lines = open_commands("igd", "wan0", guard=guard).splitlines()
    rules = [r for r in lines if r.startswith("add rule ip igd input ")]
    assert rules == [
        "add rule ip igd input udp dport 5351 update @pxp_over { ip saddr limit rate over"
        " 500/second burst 1000 packets } counter drop",
        "add rule ip igd input udp dport 5351 update @pxp_fair { ip saddr limit rate"
        " 5/second burst 10 packets } accept",
        "add rule ip igd input udp dport 5351 limit rate over 500/second burst 500 packets"
        " counter drop",
        "add rule ip igd input tcp dport 5000 ct state new update @http_over { ip saddr limit"
        " rate over 500/second burst 1000 packets } counter drop",
        "add rule ip igd input tcp dport 5000 ct state new update @http_fair { ip saddr limit"
        " rate 5/second burst 10 packets } accept",
        "add rule ip igd input tcp dport 5000 ct state new limit rate over 500/second burst"
        " 500 packets counter drop",
    ]
    assert Guard.from_limits(2.5, 3, None).fair == 3  # fair share never above the rate
