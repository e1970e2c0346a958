"""The gateway's own ports, parsed from /proc/net text captured in a namespace holding: TCP
listeners on 0.0.0.0:2222, 203.0.113.1:8443 (external), 192.168.77.1:5000 (LAN), 127.0.0.1:631,
[::]:4444 (dual-stack), [::1]:5555, [::ffff:203.0.113.1]:6666, 0.0.0.0:7777 with one
connection; UDP on 0.0.0.0:51820, 203.0.113.1:1194, 192.168.77.1:53, a connected socket on
40000, [::]:500."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from igd.model import Protocol
from igd.server.hostports import (
    HostPorts,
    diag_request,
    host_ports,
    parse_diag,
    parse_table,
    read_diag,
)

HEAD = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
TCP = (
    HEAD
    + """\
   0: 014DA8C0:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 62760 1
   1: 017100CB:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 62759 1
   2: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 62761 1
   3: 00000000:08AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 62758 1
   4: 00000000:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 62765 1
   5: 0100007F:1E61 0100007F:9134 01 00000000:00000000 00:00000000 00000000     0        0 62767 1
   6: 0100007F:9134 0100007F:1E61 01 00000000:00000000 00:00000000 00000000     0        0 62766 2
"""
)
TCP6 = (
    HEAD
    + """\
   0: 0000000000000000FFFF0000017100CB:1A0A 00000000000000000000000000000000:0000 0A 00000000:0
   1: 00000000000000000000000001000000:15B3 00000000000000000000000000000000:0000 0A 00000000:0
   2: 00000000000000000000000000000000:115C 00000000000000000000000000000000:0000 0A 00000000:0
"""
)
UDP = (
    HEAD
    + """\
 2379: 014DA8C0:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 62770 2
 3520: 017100CB:04AA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 62769 2
 4994: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 62768 2
 9558: 014DA8C0:9C40 014DA8C0:0035 01 00000000:00000000 00:00000000 00000000     0        0 62771 2
"""
)
UDP6 = (
    HEAD
    + """\
 2826: 00000000000000000000000000000000:01F4 00000000000000000000000000000000:0000 07 00000000:0
"""
)
TABLES = {"tcp": TCP, "tcp6": TCP6, "udp": UDP, "udp6": UDP6}
EXTERNAL = IPv4Address("203.0.113.1")


def test_listeners_reachable_on_the_external_address_are_host_ports() -> None:
    found = host_ports(TABLES, {EXTERNAL}, byteorder="little")
    assert found == {
        (Protocol.TCP, 2222),  # wildcard
        (Protocol.TCP, 8443),  # the external address
        (Protocol.TCP, 4444),  # [::], may be dual-stack
        (Protocol.TCP, 6666),  # the external address, IPv4-mapped
        (Protocol.TCP, 7777),  # its listener, not its connection
        (Protocol.UDP, 51820),
        (Protocol.UDP, 1194),
        (Protocol.UDP, 500),
    }
    # LAN-only (5000, 53), loopback (631, 5555) and connected UDP
    # (40000) cannot be reached from the WAN: mapping those ports takes nothing away.


def test_sockets_bound_to_an_extra_external_address_count_too() -> None:
    found = host_ports(TABLES, {IPv4Address("192.168.77.1")}, byteorder="little")
    assert (Protocol.TCP, 5000) in found and (Protocol.UDP, 53) in found
    assert (Protocol.TCP, 8443) not in found


def test_parse_reads_big_endian_hosts_and_skips_junk() -> None:
    text = HEAD + "0: CB007101:08AE 00000000:0000 0A\nnonsense\n1: zz:zz 0:0 0A\n"
    assert list(parse_table(text, Protocol.TCP, byteorder="big")) == [(EXTERNAL, 2222)]


def test_reading_is_cached_for_max_age(tmp_path: Path) -> None:
    for name, text in TABLES.items():
        (tmp_path / name).write_text(text if name != "udp6" else HEAD)
    ports = HostPorts(lambda: {EXTERNAL}, max_age=1.0, root=tmp_path, diag=False)
    assert (Protocol.UDP, 500) not in ports.current(now=10.0)
    (tmp_path / "udp6").write_text(UDP6)
    assert (Protocol.UDP, 500) not in ports.current(now=10.9)  # cached
    assert (Protocol.UDP, 500) in ports.current(now=11.0)  # read again
    (tmp_path / "tcp6").unlink()  # a kernel without IPv6
    assert (Protocol.TCP, 4444) not in ports.current(now=12.0)


# sock_diag answers captured in a namespace with TCP listeners on 127.0.0.1:631 and
# 0.0.0.0:2222 (one read: two messages, then DONE), and on [::]:4444.
DIAG_TCP4 = bytes.fromhex(
    "7c0000001400020001000000a07a0000020a0000027700007f00000100000000000000000000000000000000"
    "0000000000000000000000000000000001000000000000000000000000000000800000000000000052260b00"
    "050008000000000008000f00000000000c001500010000000000000006001600520000007c00000014000200"
    "01000000a07a0000020a000008ae000000000000000000000000000000000000000000000000000000000000"
    "000000000000000002000000000000000000000000000000800000000000000051260b000500080000000000"
    "08000f00000000000c00150001000000000000000600160052000000140000000300020001000000a07a0000"
    "00000000"
)
DIAG_TCP6 = bytes.fromhex(
    "840000001400020001000000a07a00000a0a0000115c00000000000000000000000000000000000000000000"
    "0000000000000000000000000000000003000000000000000000000000000000800000000000000053260b00"
    "050008000000000005000b000000000008000f00000000000c00150001000000000000000600160012000000"
    "140000000300020001000000a07a000000000000"
)


def test_parse_diag_reads_captured_dumps() -> None:
    assert parse_diag(DIAG_TCP4) == (
        [(IPv4Address("127.0.0.1"), 631), (IPv4Address("0.0.0.0"), 2222)],
        True,
    )
    assert parse_diag(DIAG_TCP6) == ([(IPv6Address("::"), 4444)], True)
    assert parse_diag(DIAG_TCP4[:124]) == ([(IPv4Address("127.0.0.1"), 631)], False)
    with pytest.raises(ValueError, match="truncated"):
        parse_diag(DIAG_TCP4[:100])
    error = bytes.fromhex("24000000020000000100000000000000") + (-1).to_bytes(
        4, "little", signed=True
    )
    with pytest.raises(ValueError, match="sock_diag error 1"):
        parse_diag(error + bytes(16))


def test_diag_request_asks_for_a_dump_of_one_family_protocol_and_states() -> None:
    wire = diag_request(socket.AF_INET6, Protocol.UDP, 1 << 7, seq=3)
    assert len(wire) == 16 + 56
    assert wire[4:8] == bytes.fromhex("1400 0103")  # SOCK_DIAG_BY_FAMILY, REQUEST|DUMP
    assert wire[16:24] == bytes([socket.AF_INET6, 17, 0, 0]) + (1 << 7).to_bytes(4, "little")


def test_read_diag_finds_a_listener_of_this_process() -> None:
    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("0.0.0.0", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        found = read_diag()
        assert (Protocol.TCP, IPv4Address("0.0.0.0"), tcp.getsockname()[1]) in found
        assert (Protocol.UDP, IPv4Address("127.0.0.1"), udp.getsockname()[1]) in found
        ports = HostPorts(lambda: {EXTERNAL}).current(now=0.0)
        assert (Protocol.TCP, tcp.getsockname()[1]) in ports  # the wildcard reaches the WAN
        assert (Protocol.UDP, udp.getsockname()[1]) not in ports  # loopback does not
