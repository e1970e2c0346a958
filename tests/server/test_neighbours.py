"""The neighbour table reader behind the UPnP pinhole owner check (igd/server/neighbours.py):
the kernel's real table in a namespace, and malformed netlink input."""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv6Address, ip_address

from hypothesis import given
from hypothesis import strategies as st

from igd.server.backends.nftables import enter_netns
from igd.server.neighbours import (
    NDA_DST,
    NDA_LLADDR,
    NLMSG_DONE,
    NUD_FAILED,
    RTM_NEWNEIGH,
    neighbours,
    parse_dump,
    same_host,
)
from tests.netns import netns

NUD_PERMANENT = 0x80
MAC = bytes.fromhex("020000000001")


def _attribute(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body


def _neighbour(address: str, lladdr: bytes, state: int = NUD_PERMANENT) -> bytes:
    raw = ip_address(address).packed
    family = 2 if len(raw) == 4 else 10
    body = struct.pack("=BBHiHBB", family, 0, 0, 3, state, 0, 1)
    body += _attribute(NDA_DST, raw) + (_attribute(NDA_LLADDR, lladdr) if lladdr else b"")
    return _message(RTM_NEWNEIGH, body)


def test_parse_dump_keeps_entries_with_a_link_layer_address_until_done() -> None:
    data = (
        _neighbour("192.0.2.10", MAC)
        + _neighbour("2001:db8::10", MAC)
        + _neighbour("2001:db8::30", b"")  # incomplete: no lladdr yet
        + _neighbour("2001:db8::40", MAC, NUD_FAILED)
        + _message(NLMSG_DONE, b"\0\0\0\0")
        + _neighbour("2001:db8::50", MAC)  # after the end: not read
    )
    found, done = parse_dump(data)
    assert done
    assert found == {
        IPv4Address("192.0.2.10"): (3, MAC),
        IPv6Address("2001:db8::10"): (3, MAC),
    }


def test_parse_dump_without_done_asks_for_more() -> None:
    found, done = parse_dump(_neighbour("192.0.2.10", MAC))
    assert not done and IPv4Address("192.0.2.10") in found


@given(st.binary(max_size=512))
def test_parse_dump_never_raises_on_junk(data: bytes) -> None:
    found, _ = parse_dump(data)
    assert all(len(link[1]) > 0 for link in found.values())


@given(st.binary(max_size=64))
def test_parse_dump_never_raises_on_a_neighbour_with_junk_attributes(junk: bytes) -> None:
    body = struct.pack("=BBHiHBB", 10, 0, 0, 3, NUD_PERMANENT, 0, 1) + junk
    parse_dump(_message(RTM_NEWNEIGH, body) + _neighbour("2001:db8::10", MAC))


def test_same_host_reads_the_kernels_neighbour_table() -> None:
    """Two addresses behind one MAC are one host; another MAC, an incomplete entry or an
    address the table lacks are not."""
    with netns("rv-neigh") as ns:
        ns.run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
        for address, lladdr in [
            ("192.0.2.10", "02:00:00:00:00:01"),
            ("2001:db8::10", "02:00:00:00:00:01"),
            ("2001:db8::20", "02:00:00:00:00:02"),
        ]:
            ns.run("ip", "neigh", "add", address, "lladdr", lladdr, "nud", "permanent",
                   "dev", "lan0")  # fmt: skip
        ns.run("ip", "neigh", "add", "2001:db8::30", "nud", "incomplete", "dev", "lan0")

        def ask() -> tuple[int, list[bool]]:
            enter_netns(ns.name)  # setns is per thread: this worker's only
            ten, twenty = IPv6Address("2001:db8::10"), IPv6Address("2001:db8::20")
            return len(neighbours()), [
                same_host(IPv4Address("192.0.2.10"), ten),
                same_host(ten, twenty),
                same_host(ten, IPv6Address("2001:db8::30")),
                same_host(ten, IPv6Address("2001:db8::99")),
                same_host(IPv6Address("2001:db8::99"), IPv6Address("2001:db8::99")),
            ]

        with ThreadPoolExecutor(1) as worker:
            count, answers = worker.submit(ask).result()
    assert count == 3
    assert answers == [True, False, False, False, True]
