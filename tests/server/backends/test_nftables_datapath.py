"""Packets through the gateway's kernel: WAN hosts -> our table -> LAN host, and back (root)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from igd.model import Protocol
from igd.server.backends.nftables import NftablesBackend
from tests.server.backends.nftlab import (
    ADMIN_MASQUERADE,
    FORWARD_DROP,
    GATEWAY_WAN,
    NOW,
    WAN2,
    WAN3,
    Lab,
    lab,
    mapping,
    only,
)

pytestmark = pytest.mark.lab

REFUSED = "error ConnectionRefusedError"  # nothing mapped: the gateway itself answers RST
DROPPED = "error TimeoutError"  # a FILTER dropped the SYN: no answer at all
LAN_HOST = "192.168.78.10"


@pytest.fixture
async def net() -> AsyncIterator[tuple[Lab, NftablesBackend]]:
    with lab() as the_lab:
        backend = NftablesBackend("igd", "ext0", netns=the_lab.gw.name)
        try:
            await backend.open()
            await backend.set_destinations([IPv4Address(GATEWAY_WAN)])
            yield the_lab, backend
        finally:
            await backend.close(flush=True)


async def test_only_packets_addressed_to_the_gateway_are_translated(
    net: tuple[Lab, NftablesBackend],
) -> None:
    the_lab, backend = net
    # The WAN side routes the LAN and a further address through the gateway.
    the_lab.wan.run("ip", "route", "add", "192.168.78.0/24", "via", GATEWAY_WAN)
    the_lab.wan.run("ip", "route", "add", "198.51.100.9/32", "via", GATEWAY_WAN)
    await backend.apply([], [mapping(18080)], now=NOW)
    assert the_lab.connect(WAN2, 18080) == "8080 203.0.113.2"
    # Routed to the LAN host's own address: it reaches that host's port 18080 (nothing
    # there), not the mapping's target port 8080.
    assert the_lab.connect(WAN2, 18080, dst=LAN_HOST) == REFUSED
    assert the_lab.connect(WAN2, 18080, dst="198.51.100.9") != "8080 203.0.113.2"
    # A further destination (network.extra_external_addresses), and back: the set follows.
    await backend.set_destinations([IPv4Address(GATEWAY_WAN), IPv4Address("198.51.100.9")])
    assert the_lab.connect(WAN2, 18080, dst="198.51.100.9") == "8080 203.0.113.2"
    await backend.set_destinations([IPv4Address("198.51.100.9")])
    assert the_lab.connect(WAN2, 18080) == REFUSED


async def test_wan_host_reaches_lan_server_through_mapping(
    net: tuple[Lab, NftablesBackend],
) -> None:
    the_lab, backend = net
    connect = the_lab.connect
    assert connect(WAN2, 18080) == REFUSED

    plain = mapping(18080)
    await backend.apply([], [plain], now=NOW)
    assert connect(WAN2, 18080) == "8080 203.0.113.2"
    # Only traffic arriving on the external interface is translated.
    assert connect(LAN_HOST, 18080, dst="192.168.78.1", ns=the_lab.lan) == REFUSED
    await backend.apply([plain], [], now=NOW)
    assert connect(WAN2, 18080) == REFUSED

    # A remote-host-specific mapping admits only that WAN host...
    only3 = mapping(18081, remote=WAN3, internal_port=8081)
    await backend.apply([], [only3], now=NOW)
    assert connect(WAN3, 18081) == "8081 203.0.113.3"
    assert connect(WAN2, 18081) == REFUSED
    # ...and wins over a wildcard mapping of the same port, whose lookup a miss in the remote
    # map falls through to.
    await backend.apply([], [mapping(18081)], now=NOW)
    assert connect(WAN3, 18081) == "8081 203.0.113.3"
    assert connect(WAN2, 18081) == "8080 203.0.113.2"

    # docs/nftables.md: an admin's forward chain with policy drop blocks mapped traffic (our
    # table cannot override it) until it accepts `ct status dnat`.
    the_lab.gw.run("nft", "-f", "-", input=FORWARD_DROP)
    assert connect(WAN2, 18081, wait=0.5) == DROPPED
    the_lab.gw.run("nft", "add rule inet filter forward ct status dnat accept")
    assert connect(WAN2, 18081) == "8080 203.0.113.2"


def admit_lookups(the_lab: Lab, chain: str = "admit") -> list[str]:
    """The lookups an `admit` chain makes, in order: each as "/length" plus " port" (the
    packet's source port) or " any" (filters of any port)."""
    out = the_lab.gw.run("nft", "list", "chain", "ip", "igd", chain).stdout
    found = []
    for line in out.split("\n"):
        if "@allowed" not in line:
            continue
        mask = re.search(r"ip saddr & ([\d.]+) ", line)
        length = IPv4Network(f"0.0.0.0/{mask[1]}").prefixlen if mask else 32
        found.append(f"/{length} {'any' if re.search(r'th sport & 0', line) else 'port'}")
    return found


@pytest.mark.parametrize("reconciled", [False, True])
async def test_filter_admits_only_the_peers_it_names(
    net: tuple[Lab, NftablesBackend], reconciled: bool
) -> None:
    the_lab, backend = net
    if reconciled:
        # After a reconcile the `admit` chain tests only the prefix lengths in use (none yet),
        # and each change that brings a new length rewrites it in the same transaction.
        await backend.reconcile([], now=NOW)
        assert admit_lookups(the_lab) == []
    else:
        assert len(admit_lookups(the_lab)) == 2 * 33

    def connect(src: str, sport: int = 0) -> str:
        return the_lab.connect(src, 18080, sport=sport, wait=0.7)

    # RFC 6887 §13.3: a FILTER for the first WAN host's /32 admits it, drops the second.
    first_only = mapping(18080, filters=(only(f"{WAN2}/32"),))
    await backend.apply([], [first_only], now=NOW)
    assert connect(WAN2) == "8080 203.0.113.2"
    assert connect(WAN3) == DROPPED
    # A filter with a port admits that source port only.
    with_port = replace(first_only, filters=(only(f"{WAN2}/32", 40123),))
    await backend.apply([first_only], [with_port], now=NOW)
    assert connect(WAN2, 40123) == "8080 203.0.113.2"
    assert connect(WAN2, 40124) == DROPPED
    assert connect(WAN3, 40123) == DROPPED
    # A prefix admits every host in it (alongside the port filter).
    wider = replace(with_port, filters=(only("203.0.113.0/30"), only(f"{WAN2}/32", 40123)))
    await backend.apply([with_port], [wider], now=NOW)
    assert connect(WAN3, 40124) == "8080 203.0.113.3"
    if reconciled:  # the shapes in use only: each came with the change that brought it
        assert admit_lookups(the_lab) == ["/32 port", "/32 any", "/30 any"]
    else:
        assert len(admit_lookups(the_lab)) == 2 * 33
    # A renewal without filters admits everyone again.
    cleared = replace(wider, filters=())
    await backend.apply([wider], [cleared], now=NOW)
    assert connect(WAN3) == "8080 203.0.113.3"
    assert connect(WAN2, 40124) == "8080 203.0.113.2"


async def test_the_admit_chains_test_only_the_filter_shapes_in_use() -> None:
    wan4, extra = "203.0.113.4", "203.0.113.9"  # a third WAN host, a further address
    with lab() as the_lab:
        the_lab.wan.run("ip", "addr", "add", f"{wan4}/24", "dev", "wan0")
        the_lab.gw.run("ip", "addr", "add", f"{extra}/24", "dev", "ext0")
        backend = NftablesBackend(
            "igd", "ext0", netns=the_lab.gw.name, addresses=[IPv4Address(extra)]
        )
        try:
            await backend.open()
            await backend.set_destinations([IPv4Address(GATEWAY_WAN)])
            await backend.reconcile([], now=NOW)  # from now on exactly the shapes in use
            chains = ("admit", "admit_addr_tcp", "admit_addr_udp")

            def connect(src: str, sport: int = 0) -> dict[str, str]:
                """What src gets from the mapping on each address."""
                return {
                    dst: the_lab.connect(src, 18080, dst=dst, sport=sport, wait=0.7)
                    for dst in (GATEWAY_WAN, extra)
                }

            def both(answer: str) -> dict[str, str]:
                return {GATEWAY_WAN: answer, extra: answer}

            # FILTERs of any port, /30 (.0 to .3): one lookup per chain, with port 0.
            anyport = (only("203.0.113.0/30"),)
            default = mapping(18080, filters=anyport)
            addressed = mapping(18080, address=extra, filters=anyport)
            await backend.apply([], [default, addressed], now=NOW)
            assert [admit_lookups(the_lab, c) for c in chains] == [["/30 any"]] * 3
            assert connect(WAN2) == both("8080 203.0.113.2")
            assert connect(WAN3, 40123) == both("8080 203.0.113.3")
            assert connect(wan4) == both(DROPPED)
            # A FILTER with a port, of the same prefix length as the one already tested:
            # the change adds that shape's lookup in the same transaction, and it admits
            # exactly that source port of its prefix (.4 to .7).
            ported = (*anyport, only("203.0.113.4/30", 40123))
            default2, addressed2 = (
                replace(default, filters=ported),
                replace(addressed, filters=ported),
            )
            await backend.apply([default, addressed], [default2, addressed2], now=NOW)
            assert [admit_lookups(the_lab, c) for c in chains] == [["/30 port", "/30 any"]] * 3
            assert connect(wan4, 40123) == both("8080 203.0.113.4")
            assert connect(wan4, 40124) == both(DROPPED)
            assert connect(WAN2, 40124) == both("8080 203.0.113.2")
            # A reconcile back to any-port FILTERs drops the port's lookup, and its flows.
            await backend.reconcile([default, addressed], now=NOW)
            assert [admit_lookups(the_lab, c) for c in chains] == [["/30 any"]] * 3
            assert connect(wan4, 40123) == both(DROPPED)
            assert connect(WAN3) == both("8080 203.0.113.3")
        finally:
            await backend.close(flush=True)


async def test_filters_and_remote_host_mappings_coexist(
    net: tuple[Lab, NftablesBackend],
) -> None:
    the_lab, backend = net

    def connect(src: str, sport: int = 0) -> str:
        return the_lab.connect(src, 18081, sport=sport, wait=0.7)

    # The wildcard mapping admits only the first WAN host; the second one has a mapping of
    # its own on the same port, which the wildcard's filter must not block.
    wildcard = mapping(18081, filters=(only(f"{WAN2}/32"),))
    for_wan3 = mapping(18081, remote=WAN3, internal_port=8081)
    await backend.apply([], [wildcard, for_wan3], now=NOW)
    assert connect(WAN2) == "8080 203.0.113.2"
    assert connect(WAN3) == "8081 203.0.113.3"
    # Filters on the remote-host mapping itself restrict its host further.
    strict = replace(for_wan3, filters=(only("203.0.113.0/24", 40125),))
    await backend.apply([for_wan3], [strict], now=NOW)
    assert connect(WAN3, 40125) == "8081 203.0.113.3"
    assert connect(WAN3, 40126) == DROPPED
    assert connect(WAN2) == "8080 203.0.113.2"


async def test_peer_flow_leaves_with_its_external_port_and_its_peer_gets_in(
    net: tuple[Lab, NftablesBackend],
) -> None:
    the_lab, backend = net
    wan, lan = the_lab.wan, the_lab.lan
    # The admin's own masquerade for the LAN: PEER flows must get our port, not its choice.
    the_lab.gw.run("nft", "-f", "-", input=ADMIN_MASQUERADE)
    peer = mapping(40000, protocol=Protocol.UDP, remote=WAN2, internal_port=4000, peer_port=7000)
    await backend.apply([], [peer], now=NOW)

    # RFC 6887 §12: LAN 4000 -> WAN2:7000 arrives from the gateway's address, port 40000;
    # the answer comes back through conntrack.
    the_lab.flush_conntrack()
    seen, answer = the_lab.udp(lan, (LAN_HOST, 4000), wan, (WAN2, 7000), to=(WAN2, 7000))
    assert seen == f"{GATEWAY_WAN} 40000 ping"
    assert answer == f"{WAN2} 7000 pong"
    # Another flow of the same host is not a PEER flow: the admin's masquerade takes it.
    the_lab.flush_conntrack()
    seen, _ = the_lab.udp(lan, (LAN_HOST, 4001), wan, (WAN2, 7000), to=(WAN2, 7000))
    assert seen.startswith(f"{GATEWAY_WAN} ") and " 40000 " not in seen

    # The peer may also start a flow to port 40000, from any of its ports...
    the_lab.flush_conntrack()
    seen, answer = the_lab.udp(wan, (WAN2, 7001), lan, (LAN_HOST, 4000), to=(GATEWAY_WAN, 40000))
    assert seen == f"{WAN2} 7001 ping"
    assert answer == f"{GATEWAY_WAN} 40000 pong"
    # ...but no other host may.
    the_lab.flush_conntrack()
    seen, _ = the_lab.udp(wan, (WAN3, 7001), lan, (LAN_HOST, 4000), (GATEWAY_WAN, 40000), 0.7)
    assert seen == "timeout"

    # Once the entry is gone, the flow leaves like any other.
    await backend.apply([peer], [], now=NOW)
    the_lab.flush_conntrack()
    seen, _ = the_lab.udp(lan, (LAN_HOST, 4000), wan, (WAN2, 7000), to=(WAN2, 7000))
    assert seen == f"{GATEWAY_WAN} 4000 ping"


async def test_remote_host_counting_is_on_exactly_while_such_mappings_exist(
    net: tuple[Lab, NftablesBackend],
) -> None:
    the_lab, backend = net

    def counting_rules() -> list[str]:
        out = the_lab.gw.run("nft", "list", "chain", "ip", "igd", "forward").stdout
        return [line.strip() for line in out.splitlines() if "@counted" in line]

    def packets(key: object) -> int:
        return counts[key][0] if key in counts else 0  # type: ignore[index]

    wildcard = mapping(18082)
    await backend.reconcile([wildcard], now=NOW)
    # Only wildcard mappings: each packet of a mapped flow costs one lookup, not two.
    assert [r.split(" @")[-1] for r in counting_rules()] == ["counted"]
    assert the_lab.connect(WAN2, 18082) == "8080 203.0.113.2"
    counts = await backend.counters()
    assert packets(wildcard.key) > 0
    # A remote-host mapping on the same port: the remote lookup comes back before it, so
    # its flows count to it and not to the wildcard.
    for_wan3 = mapping(18082, remote=WAN3, internal_port=8081)
    await backend.apply([], [for_wan3], now=NOW)
    assert [r.split(" @")[-1] for r in counting_rules()] == ["counted_remote accept", "counted"]
    before = packets(wildcard.key)
    assert the_lab.connect(WAN3, 18082) == "8081 203.0.113.3"
    counts = await backend.counters()
    assert packets(for_wan3.key) > 0 and packets(wildcard.key) == before
    # Reconciled without it: one lookup again.
    await backend.reconcile([wildcard], now=NOW)
    assert [r.split(" @")[-1] for r in counting_rules()] == ["counted"]
    assert the_lab.connect(WAN2, 18082) == "8080 203.0.113.2"
