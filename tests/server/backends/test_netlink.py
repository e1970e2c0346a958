"""The fast path's netlink messages, byte by byte (pure: no kernel, no socket)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from igd.model import Protocol, RemoteFilter
from igd.server.backends import BackendError, KernelEntry
from igd.server.backends.netlink import (
    Element,
    Reply,
    SetOp,
    counter_elements,
    describe_failure,
    encode_batch,
    encode_element,
    encode_op,
    entry_data,
    entry_key,
    is_plain,
    parse_replies,
    plain_elements,
    plain_ops,
)
from igd.server.backends.nft_payload import element_timeout
from tests.server.backends.nftlab import mapping, only

LAN = IPv4Address("192.168.78.10")
WILD = KernelEntry(Protocol.TCP, 18080, None, LAN, 8080)
REMOTE = KernelEntry(Protocol.UDP, 5000, IPv4Address("203.0.113.3"), LAN, 5001)

NESTED = 0x8000


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    """Split netlink attributes: (type, payload), checking lengths and 4-octet padding."""
    found, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        assert size >= 4
        found.append((kind, data[offset + 4 : offset + size]))
        padded = (size + 3) & ~3
        assert data[offset + size : offset + padded] == b"\0" * (padded - size)
        offset += padded
    assert offset == len(data)
    return found


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split netlink messages: (type, flags, seq, payload)."""
    found, offset = [], 0
    while offset < len(data):
        length, kind, flags, seq, pid = struct.unpack_from("=IHHII", data, offset)
        assert pid == 0 and length % 4 == 0
        found.append((kind, flags, seq, data[offset + 16 : offset + length]))
        offset += length
    assert offset == len(data)
    return found


def test_keys_and_data_pad_every_field_to_four_octets() -> None:
    # inet_proto: 1 octet; inet_service: 2 octets network order; ipv4_addr: 4 octets.
    assert entry_key(WILD) == bytes([6, 0, 0, 0, 0x46, 0xA0, 0, 0])
    assert entry_key(REMOTE) == bytes([203, 0, 113, 3, 17, 0, 0, 0, 0x13, 0x88, 0, 0])
    assert entry_data(WILD) == bytes([192, 168, 78, 10, 0x1F, 0x90, 0, 0])
    assert entry_data(REMOTE) == bytes([192, 168, 78, 10, 0x13, 0x89, 0, 0])


def test_add_message_field_by_field() -> None:
    op = SetOp(True, "portmap", (Element(entry_key(WILD), entry_data(WILD), 3_660_000),))
    ((kind, flags, seq, payload),) = messages(encode_op("igd", op, 7))
    assert kind == (10 << 8) | 12  # NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM
    assert flags == 0x1 | 0x4 | 0x400  # REQUEST | ACK | CREATE
    assert seq == 7
    assert payload[:4] == bytes([2, 0, 0, 0])  # nfgenmsg: NFPROTO_IPV4, version 0, res_id 0
    (t, table), (s, name), (e, elems) = attrs(payload[4:])
    assert (t, table) == (1, b"igd\0")  # NFTA_SET_ELEM_LIST_TABLE
    assert (s, name) == (2, b"portmap\0")  # NFTA_SET_ELEM_LIST_SET
    assert e == 3 | NESTED  # NFTA_SET_ELEM_LIST_ELEMENTS
    ((item, element),) = attrs(elems)
    assert item == 1 | NESTED  # NFTA_LIST_ELEM
    (k, key), (tm, timeout), (d, data) = attrs(element)
    assert k == 1 | NESTED and attrs(key) == [(1, entry_key(WILD))]  # KEY -> DATA_VALUE
    assert (tm, timeout) == (4, (3_660_000).to_bytes(8, "big"))  # TIMEOUT, ms, big-endian
    assert d == 2 | NESTED and attrs(data) == [(1, entry_data(WILD))]  # DATA -> DATA_VALUE


def test_delete_message_carries_only_keys() -> None:
    op = SetOp(False, "portmap_remote", (Element(entry_key(REMOTE)),))
    ((kind, flags, _, payload),) = messages(encode_op("igd", op, 1))
    assert kind == (10 << 8) | 14  # NFT_MSG_DELSETELEM
    assert flags == 0x1 | 0x4  # no CREATE on a delete
    *_, (_, elems) = attrs(payload[4:])
    ((_, element),) = attrs(elems)
    ((k, key),) = attrs(element)
    assert k == 1 | NESTED and attrs(key) == [(1, entry_key(REMOTE))]


def test_exclusive_add_sets_excl() -> None:
    op = SetOp(True, "portmap", (Element(entry_key(WILD), entry_data(WILD)),), exclusive=True)
    ((_, flags, _, _),) = messages(encode_op("igd", op, 1))
    assert flags == 0x1 | 0x4 | 0x400 | 0x200


def test_batch_is_framed_by_begin_and_end_for_nftables() -> None:
    ops = plain_ops([], [(WILD, 60), (REMOTE, None)])
    framed = messages(encode_batch("igd", ops, 100))
    begin, *body, end = framed
    # NFNL_MSG_BATCH_BEGIN / END: AF_UNSPEC, res_id NFNL_SUBSYS_NFTABLES in network order.
    assert begin == (0x10, 0x1, 100, bytes([0, 0, 0, 10]))
    assert end == (0x11, 0x1, 105, bytes([0, 0, 0, 10]))
    # One message per set: the two maps, then the two counter sets.
    assert [(kind & 0xFF, seq) for kind, _, seq, _ in body] == [
        (12, 101), (12, 102), (12, 103), (12, 104)
    ]  # fmt: skip


def test_renewal_re_adds_deletes_then_adds_like_the_text_path() -> None:
    ops = plain_ops([WILD, REMOTE], [(WILD, 120)])
    assert [(op.add, op.container) for op in ops] == [
        (True, "portmap"),
        (True, "portmap_remote"),
        (True, "counted_remote"),
        (False, "portmap"),
        (False, "portmap_remote"),
        (False, "counted_remote"),
        (True, "portmap"),
        (True, "counted"),
    ]
    # The re-add carries the old data and no timeout; the final add the new timeout in ms.
    assert ops[0].elements == (Element(entry_key(WILD), entry_data(WILD), None),)
    assert ops[3].elements == (Element(entry_key(WILD)),)
    assert ops[6].elements == (Element(entry_key(WILD), entry_data(WILD), 120_000),)
    assert ops[6].text == "add element portmap { tcp . 18080 timeout 120s : 192.168.78.10 . 8080 }"
    # The renewed mapping's counter element is neither deleted nor given a timeout: adding
    # it again is a no-op that keeps its counts. The removed one's counter goes with it.
    assert ops[7].elements == (Element(entry_key(WILD)),)
    assert ops[5].elements == (Element(entry_key(REMOTE)),)


def test_large_changes_split_into_messages_per_set() -> None:
    many = [KernelEntry(Protocol.TCP, p, None, LAN, 80) for p in range(1, 601)]
    ops = plain_ops(many, [])
    # Re-add and delete, each of the map and of the counter set.
    assert [len(op.elements) for op in ops] == [256, 256, 88] * 4


def test_only_plain_valid_entries_are_encoded() -> None:
    filtered = KernelEntry(
        Protocol.TCP, 1, None, LAN, 1, filters=(RemoteFilter(IPv4Network("10.0.0.0/8"), 0),)
    )
    peer = KernelEntry(Protocol.UDP, 1, IPv4Address("10.0.0.1"), LAN, 1, peer_port=9)
    assert is_plain(WILD) and is_plain(REMOTE)
    assert not is_plain(filtered) and not is_plain(peer)
    for entry in (filtered, peer, KernelEntry(Protocol.TCP, 0, None, LAN, 1)):
        with pytest.raises(ValueError):
            plain_ops([], [(entry, None)])


def reply(seq: int, error: int, message: str = "") -> bytes:
    """An NLMSG_ERROR as the kernel sends it with NETLINK_CAP_ACK (and EXT_ACK text)."""
    body = struct.pack("=i", error) + struct.pack("=IHHII", 16, 0xA0C, 5, seq, 0)
    flags = 0x100  # NLM_F_CAPPED
    if message:
        text = message.encode() + b"\0"
        body += struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
        flags |= 0x200  # NLM_F_ACK_TLVS
    return struct.pack("=IHHII", 16 + len(body), 2, flags, seq, 1234) + body


def test_replies_are_acks_or_errors_with_the_kernels_words() -> None:
    data = reply(5, 0) + reply(6, -17, "element exists") + reply(7, -2)
    assert list(parse_replies(data)) == [
        Reply(5, 0),
        Reply(6, 17, "element exists"),
        Reply(7, 2),
    ]
    with pytest.raises(BackendError, match="truncated"):
        list(parse_replies(reply(5, 0)[:-2]))


def test_failure_message_names_the_change_and_the_errno() -> None:
    op = plain_ops([WILD], [])[2]
    assert describe_failure(Reply(3, 2), op) == (
        "nftables refused delete element portmap { tcp . 18080 }: No such file or directory;"
        " nothing was changed"
    )
    assert "Operation not permitted" in describe_failure(Reply(1, 1), None)


def test_restore_elements_are_byte_for_byte_those_of_the_general_encoder() -> None:
    extra = "198.51.100.9"
    wanted = [
        mapping(18080),
        mapping(5000, protocol=Protocol.UDP, remote="203.0.113.3", internal_port=5001),
        mapping(443, address=extra, lease=float("inf")),
        mapping(444, remote="203.0.113.4", address=extra),
        mapping(7000, lease=10**9),  # longer than an element timeout may be: none
        mapping(8000, filters=(only("203.0.113.0/24"),)),  # not plain: left to libnftables
    ]
    now = 1000.0
    plain = plain_elements(wanted, now)
    assert [m.external_port for m in plain.rest] == [8000]
    expected: dict[str, list[bytes]] = {}
    for op in plain_ops(
        [],
        [
            (KernelEntry.of(m), element_timeout(m, now))
            for m in wanted
            if is_plain(KernelEntry.of(m))
        ],
    ):
        expected.setdefault(op.container, []).extend(map(encode_element, op.elements))
    got = {n: e for n, e in (plain.maps | counter_elements(plain.plain)).items() if e}
    assert got == expected
    assert plain.count == 5


@pytest.mark.parametrize("port", [0, 70000])
def test_restore_elements_refuse_a_port_the_kernel_would(port: int) -> None:
    with pytest.raises(ValueError, match="invalid port"):
        plain_elements([mapping(port)], 1000.0)
    with pytest.raises(ValueError, match="invalid port"):
        plain_elements([mapping(80, internal_port=port)], 1000.0)
