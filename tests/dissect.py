"""Wireshark's NAT-PMP/PCP dissector (Debian's tshark) as a strict second reader of the
gateway's answers: the answers go into a pcap file written here, tshark reads it back.

No capture rights are needed: tshark only reads the file.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

SERVER = IPv4Address("192.0.2.1")  # RFC 5737: the packets exist only in the file
CLIENT = IPv4Address("192.0.2.2")
SERVER_PORT = 5351
CLIENT_PORT = 40000
LINKTYPE_RAW = 101  # each record is an IPv4 packet
WARNING = 0x00600000  # expert severities: chat 0x2.., note 0x4.., warning 0x6.., error 0x8..


@dataclass(frozen=True, slots=True)
class Dissection:
    """What tshark read in one answer: its fields (name -> values) and its complaints."""

    protocol: str  # "nat-pmp", "portcontrol", or "" when tshark saw only data
    fields: dict[str, list[str]] = field(default_factory=dict)
    complaints: list[str] = field(default_factory=list)
    """Malformed-packet marks and expert messages of warning severity or worse."""

    def one(self, name: str) -> str:
        """The single value of a field; fails the test if it is absent or repeated."""
        values = self.fields.get(name, [])
        assert len(values) == 1, f"{name}: {values} in {self.fields}"
        return values[0]


def require_tshark() -> str:
    """tshark's path; the test fails (never skips) without it: `./dev.sh setup` installs it."""
    path = shutil.which("tshark")
    if path is None:
        pytest.fail("tshark is missing: ./dev.sh setup installs Debian's tshark")
    return path


def dissect(answers: Sequence[bytes]) -> list[Dissection]:
    """Dissect each answer as a UDP datagram from port 5351; one Dissection per answer."""
    tshark = require_tshark()
    with tempfile.TemporaryDirectory(prefix="igd-dissect-") as tmp:
        capture = Path(tmp) / "answers.pcap"
        capture.write_bytes(pcap([udp_packet(answer) for answer in answers]))
        out = subprocess.run(
            [tshark, "-n", "-r", str(capture), "-T", "json", "-o", "udp.check_checksum:TRUE"],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    packets = json.loads(out, object_pairs_hook=list)
    found = [_dissection(packet) for packet in packets]
    assert len(found) == len(answers), f"tshark read {len(found)} of {len(answers)} packets"
    return found


def _dissection(packet: list[tuple[str, Any]]) -> Dissection:
    layers = dict(dict(packet)["_source"])["layers"]
    protocol = ""
    fields: dict[str, list[str]] = {}
    complaints: list[str] = []
    for name, value in layers:
        if name in ("nat-pmp", "portcontrol"):
            protocol = name
        if name in ("frame", "raw"):
            continue
        _walk(name, value, fields, complaints)
    return Dissection(protocol, fields, complaints)


def _walk(name: str, value: Any, fields: dict[str, list[str]], complaints: list[str]) -> None:
    if name == "_ws.malformed" and isinstance(value, str):
        complaints.append(value)
    if isinstance(value, list):
        entries = dict(item for item in value if isinstance(item, tuple | list) and len(item) == 2)
        if name == "_ws.expert" and int(entries.get("_ws.expert.severity", 0)) >= WARNING:
            complaints.append(str(entries.get("_ws.expert.message")))
        for item in value:
            if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str):
                _walk(item[0], item[1], fields, complaints)
        return
    fields.setdefault(name, []).append(str(value))


# -- a pcap file of IPv4/UDP packets ---------------------------------------------------------


def udp_packet(payload: bytes) -> bytes:
    """An IPv4/UDP packet from SERVER:5351 to CLIENT, checksums included."""
    src, dst = SERVER.packed, CLIENT.packed
    udp = struct.pack("!HHHH", SERVER_PORT, CLIENT_PORT, 8 + len(payload), 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def pcap(packets: Sequence[bytes]) -> bytes:
    """A classic pcap file holding `packets`, one a second."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW)]
    for i, packet in enumerate(packets):
        out.append(struct.pack("<IIII", i, 0, len(packet), len(packet)) + packet)
    return b"".join(out)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
