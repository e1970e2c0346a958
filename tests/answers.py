"""A corpus of good and bad NAT-PMP/PCP requests, and the check that every answer to them is
a whole, well-formed message, read alike by Wireshark's dissector and by our decoders.

Shared by the loopback test (tests/server/test_answers_dissected.py) and the lab test
(tests/lab/test_wire_conformance.py).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

from hypothesis import strategies as st

from igd.model import Protocol
from igd.proto import natpmp, pcp
from igd.proto.natpmp import NatPmpExternalAddressResponse, NatPmpMapRequest, NatPmpResult
from igd.proto.pcp import (
    PcpDescription,
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpPeerData,
    PcpPreferFailure,
    PcpRequest,
    PcpResult,
    PcpThirdParty,
    PcpUnknownOption,
)
from igd.server.pxp import RECEIVE_SIZE
from tests.dissect import Dissection, dissect

NONCE = bytes(range(1, 13))
PEER = pcp.mapped(IPv4Address("203.0.113.9"))
ZERO = pcp.mapped(IPv4Address(0))
# Option codes Wireshark's PCP dissector knows: 0 (reserved; what zero padding of an odd-length
# request reads as, §8.2), RFC 6887's, RFC 7220 DESCRIPTION, RFC 7225 PREFIX64.
DISSECTOR_OPTIONS = {0, 1, 2, 3, 128, 129}


def natpmp_map(protocol: Protocol, internal: int, external: int, lifetime: int) -> bytes:
    return natpmp.encode_request(NatPmpMapRequest(protocol, internal, external, lifetime))


def pcp_map(
    client: IPv4Address,
    port: int,
    lifetime: int = 600,
    *options: PcpOption,
    protocol: int = 6,
    external: int = 0,
) -> bytes:
    data = PcpMapData(NONCE, protocol, port, external, ZERO)
    request = PcpRequest(PcpOpcode.MAP, lifetime, pcp.mapped(client), data, options)
    return pcp.encode_request(request)


def pcp_peer(client: IPv4Address, port: int, lifetime: int = 600) -> bytes:
    data = PcpPeerData(NONCE, 17, port, 0, ZERO, 443, PEER)
    return pcp.encode_request(PcpRequest(PcpOpcode.PEER, lifetime, pcp.mapped(client), data))


def option(code: int, value: bytes, length: int | None = None) -> bytes:
    """An option TLV with its padding; `length` may lie about the value's size."""
    size = len(value) if length is None else length
    return struct.pack("!BxH", code, size) + value + bytes(-len(value) % 4)


def corpus(client: IPv4Address) -> list[bytes]:
    """Requests for every kind of answer (and silence) RFC 6886 §3.5 and RFC 6887 §7.4,
    §8.2 and §9 describe, from `client`."""
    me = pcp.mapped(client)
    good_map = pcp_map(client, 8080)
    requests = [
        # NAT-PMP: success, refusals, deletes, other versions and opcodes.
        bytes(2),
        bytes(2) + b"trailing octets",
        natpmp_map(Protocol.TCP, 8080, 8080, 600),
        natpmp_map(Protocol.UDP, 5000, 0, 600),
        natpmp_map(Protocol.TCP, 23, 23, 600),  # policy refusal
        natpmp_map(Protocol.TCP, 0, 8080, 600),  # internal port 0 is only for deletes
        natpmp_map(Protocol.TCP, 8080, 0, 0),  # delete
        natpmp_map(Protocol.UDP, 0, 0, 0),  # delete all
        natpmp_map(Protocol.TCP, 8081, 8081, 600) + bytes(100),  # longer than 12 octets
        natpmp_map(Protocol.TCP, 8080, 8080, 600)[:7],  # truncated: silence
        bytes.fromhex("0003"),  # unknown opcode, short
        bytes.fromhex("0003") + bytes(10),
        bytes.fromhex("007f") + bytes(2000),  # unknown opcode, oversize
        bytes.fromhex("0081") + bytes(14),  # a response: silence
        bytes.fromhex("00ff"),
        bytes.fromhex("0100"),  # NAT-PMP/PCP version 1
        bytes.fromhex("0101") + bytes(58),
        bytes.fromhex("0181") + bytes(58),  # R bit: silence
        # PCP: success answers, with and without options.
        pcp.encode_request(PcpRequest(PcpOpcode.ANNOUNCE, 0, me)),
        good_map,
        pcp_map(client, 8082, 600, PcpDescription("printer")),
        pcp_map(client, 8083, 600, PcpDescription("a web server")),
        pcp_map(client, 8084, 600, PcpPreferFailure(), external=18084),
        pcp_map(client, 8085, 600, PcpFilter(128, 443, PEER)),
        pcp_map(client, 8086, 600, PcpUnknownOption(200, b"ignored")),  # optional: ignored
        pcp_map(client, 8080, 0),  # delete
        pcp_peer(client, 9000),
        # PCP: error answers.
        pcp_map(client, 23),  # NOT_AUTHORIZED
        pcp_map(IPv4Address("10.1.2.3"), 8080),  # ADDRESS_MISMATCH
        pcp_map(client, 8087, protocol=132),  # UNSUPP_PROTOCOL
        pcp_map(client, 8087, 600, PcpPreferFailure()),  # PREFER_FAILURE without a port
        pcp_map(client, 8088, 600, PcpThirdParty(pcp.mapped(IPv4Address("192.168.1.99")))),
        pcp_map(client, 8089, 600, PcpUnknownOption(7, b"mandatory")),  # UNSUPP_OPTION
        pcp_map(client, 8090, 600, PcpPreferFailure(), PcpPreferFailure(), external=8090),
        pcp_map(client, 8091, 600, PcpUnknownOption(128, b"\xff\xfe not utf-8")),
        good_map[:60] + option(1, bytes(4)),  # THIRD_PARTY of the wrong length
        good_map[:60] + option(3, bytes(8)),  # FILTER of the wrong length
        good_map[:60] + option(128, b"runs past the end", length=400),
        good_map[:60] + option(2, b"") + b"\x02\x00",  # truncated option header
        good_map[:60] + option(128, b"x" * 1100),  # over 1100 octets
        good_map[:58],  # not a multiple of 4
        good_map[:56],  # too short for MAP
        good_map[:24] + bytes(8),
        pcp_peer(client, 9001)[:64],  # too short for PEER
        good_map[:1] + b"\x09" + good_map[2:],  # unknown opcode
        b"\x02\x09" + bytes(22),
        b"\x02\x7f" + good_map[2:] + b"\xff" * 3,  # unknown opcode, odd length
        good_map[:20],  # shorter than a header: silence
        b"\x02\x81" + good_map[2:],  # R bit: silence
    ]
    # Versions we do not speak, with each opcode and a few lengths (§9).
    for version in (1, 3, 4, 7, 128, 255):
        for body in (good_map[1:2] + bytes(22), good_map[1:], good_map[1:] + b"garbage"):
            requests.append(bytes([version]) + body)
        requests.append(bytes([version, 2]) + pcp_peer(client, 9002)[2:])
        requests.append(bytes([version, 0]) + bytes(22))
        requests.append(bytes([version, 5]))
    return requests


def mutated_requests(client: IPv4Address) -> st.SearchStrategy[bytes]:
    """A request from the corpus, cut, extended, or with one octet changed."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        base = bytearray(draw(st.sampled_from(corpus(client))))
        how = draw(st.sampled_from(["cut", "extend", "poke", "as is"]))
        if how == "cut" and base:
            del base[draw(st.integers(0, len(base) - 1)) :]
        elif how == "extend":
            base += draw(st.binary(max_size=64))
        elif how == "poke" and base:
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
        return bytes(base)

    return mutate()


def mutations(client: IPv4Address, rng: random.Random, count: int) -> list[bytes]:
    """`count` requests from the corpus, cut, extended or poked at, or random octets."""
    base = corpus(client)
    out = []
    for _ in range(count):
        wire = bytearray(rng.choice(base))
        how = rng.choice(["cut", "extend", "poke", "random"])
        if how == "cut" and wire:
            del wire[rng.randrange(len(wire)) :]
        elif how == "extend":
            wire += rng.randbytes(rng.randrange(64))
        elif how == "poke" and wire:
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        elif how == "random":
            wire = bytearray(rng.randbytes(rng.randrange(1200)))
        out.append(bytes(wire))
    return out


# -- the check -------------------------------------------------------------------------------


def unanswered(request: bytes, *, natpmp_on: bool = True, pcp_on: bool = True) -> bool:
    """Whether the gateway must stay silent: shorter than 2 octets, the R bit (a response:
    RFC 6886 §3.5, RFC 6887 §8.2), a PCP request shorter than its header (§8.2), a NAT-PMP
    map request shorter than 12 octets (RFC 6886 defines no answer to it). A version the
    gateway has turned off is an unsupported version, answered whatever its length. A datagram
    longer than the daemon reads (pxp.RECEIVE_SIZE) is dropped: a cut copy is no answer."""
    if len(request) < 2 or request[1] & 0x80 or len(request) > RECEIVE_SIZE:
        return True
    if request[0] == pcp.VERSION and pcp_on:
        return len(request) < 24
    if request[0] == natpmp.VERSION and natpmp_on:
        return request[1] in (1, 2) and len(request) < 12
    return False


def check_answers(
    requests: Sequence[bytes],
    answers: Sequence[bytes | None],
    *,
    natpmp_on: bool = True,
    pcp_on: bool = True,
) -> int:
    """Check that exactly the right requests were answered, dissect every answer and check
    it; the number of answers."""
    for request, answer in zip(requests, answers, strict=True):
        assert (answer is None) == unanswered(request, natpmp_on=natpmp_on, pcp_on=pcp_on), (
            f"request {request.hex()} got {answer.hex() if answer else 'no answer'}"
        )
    pairs = [(request, answer) for request, answer in zip(requests, answers, strict=True) if answer]
    for (request, answer), seen in zip(pairs, dissect([a for _, a in pairs]), strict=True):
        try:
            check_answer(request, answer, seen)
        except AssertionError as error:
            raise AssertionError(
                f"request {request.hex()}\nanswer  {answer.hex()}\ntshark  {seen}\n{error}"
            ) from error
    return len(pairs)


def check_answer(request: bytes, answer: bytes, seen: Dissection) -> None:
    """One answer: the right kind of message, whole, and read alike by tshark and by us."""
    assert answer[1] & 0x80, "the R bit (NAT-PMP: opcode + 128) is set"
    if answer[0] == natpmp.VERSION:
        assert seen.protocol == "nat-pmp"
        check_natpmp(request, answer, seen)
    else:
        assert answer[0] == pcp.VERSION and seen.protocol == "portcontrol"
        check_pcp(request, answer, seen)


def check_natpmp(request: bytes, answer: bytes, seen: Dissection) -> None:
    opcode = answer[1] & 0x7F
    assert int(seen.one("nat-pmp.opcode")) == answer[1]
    if opcode not in (0, 1, 2):
        # RFC 6886 §3.5: the whole request back, opcode + 128, result 5. Wireshark names
        # the opcode it does not know, which is what the request asked about.
        assert request[0] == natpmp.VERSION and request[1] == opcode
        assert answer[2:4] == b"\x00\x05" and answer[8:] == request[8:]
        assert seen.complaints == [f"Unknown opcode: {answer[1]}"]
        return
    assert seen.complaints == []
    response = natpmp.decode_response(answer)
    assert len(answer) == (12 if opcode == 0 else 16)
    assert int(seen.one("nat-pmp.result_code")) == response.result
    assert int(seen.one("nat-pmp.sssoe")) == response.epoch
    if isinstance(response, NatPmpExternalAddressResponse):
        assert seen.one("nat-pmp.external_ip") == str(response.address)
        if response.result is NatPmpResult.UNSUPPORTED_VERSION:
            assert request[0] != natpmp.VERSION and response.address == IPv4Address(0)
        return
    assert request[:2] == bytes([natpmp.VERSION, opcode])
    assert int(seen.one("nat-pmp.internal_port")) == response.internal_port
    assert seen.fields["nat-pmp.external_port"] == [str(response.external_port)]
    assert seen.fields["nat-pmp.pml"] == [str(response.lifetime)]
    if response.result is not NatPmpResult.SUCCESS:  # §3.5: the internal port, then zeros
        assert response.internal_port == struct.unpack_from("!H", request, 4)[0]
        assert (response.external_port, response.lifetime) == (0, 0)


def check_pcp(request: bytes, answer: bytes, seen: Dissection) -> None:
    assert len(answer) % 4 == 0 and 24 <= len(answer) <= pcp.MAX_SIZE
    assert int(seen.one("portcontrol.opcode")) == answer[1] & 0x7F
    assert seen.one("portcontrol.r") == "1"
    assert int(seen.one("portcontrol.result_code")) == answer[3]
    assert int(seen.one("portcontrol.lifetime_rsp")) == struct.unpack_from("!I", answer, 4)[0]
    assert int(seen.one("portcontrol.epoch_time")) == struct.unpack_from("!I", answer, 8)[0]
    if request[0] == pcp.VERSION:
        assert answer[1] == request[1] | 0x80, "the request's opcode"
    else:
        assert answer[3] == PcpResult.UNSUPP_VERSION
    if answer[1] & 0x7F not in set(PcpOpcode):
        # §8.2 checks the length (MALFORMED_REQUEST) before the opcode.
        unknown = (PcpResult.UNSUPP_OPCODE, PcpResult.UNSUPP_VERSION, PcpResult.MALFORMED_REQUEST)
        assert answer[3] in unknown
        assert seen.complaints == [f"Unknown opcode: {answer[1]}"]
        return
    response = pcp.decode_response(answer)  # our own strict reader takes it whole
    # Wireshark names an option it does not know (only when it has data): the answer copies
    # what the request held (§7.3: all options return in an error answer).
    expected = [
        f"Unknown option: {o.code}"
        for o in response.options
        if isinstance(o, PcpUnknownOption) and o.code not in DISSECTOR_OPTIONS and o.data
    ]
    if any(length % 4 for length in option_lengths(answer)):
        # Wireshark 4.0's PCP dissector steps over an option's length but not its padding
        # (RFC 6887 §7.3), so it reads the padding as a new option and runs off the end. Our
        # strict decoder read the options above; tshark must still read header and data.
        assert all(c.startswith(("Malformed", "Unknown option")) for c in seen.complaints)
    else:
        assert seen.complaints == expected
    data = response.data
    if isinstance(data, PcpMapData | PcpPeerData):
        kind = "map" if isinstance(data, PcpMapData) else "peer"
        prefix = f"portcontrol.{kind}."
        assert seen.one(prefix + "nonce").replace(":", "") == data.nonce.hex()
        assert int(seen.one(prefix + "protocol")) == data.protocol
        assert int(seen.one(prefix + "internal_port")) == data.internal_port
        assert int(seen.one(prefix + "rsp_assigned_external_port")) == data.external_port
        assert IPv6Address(seen.one(prefix + "rsp_assigned_ext_ip")) == data.external_address
    if isinstance(data, PcpPeerData):
        assert int(seen.one("portcontrol.peer.remote_peer_port")) == data.remote_port
        assert IPv6Address(seen.one("portcontrol.peer.remote_peer_ip")) == data.remote_address
    if response.result is PcpResult.SUCCESS:
        assert answer[12:24] == bytes(12), "§7.2: reserved is zero in success answers"


def option_lengths(answer: bytes) -> list[int]:
    """The option lengths of a PCP answer with known opcode data."""
    offset = 24 + {0: 0, 1: 36, 2: 56}[answer[1] & 0x7F]
    lengths = []
    while offset + 4 <= len(answer):
        (length,) = struct.unpack_from("!H", answer, offset + 2)
        lengths.append(length)
        offset += 4 + length + (-length % 4)
    return lengths
