"""PCP codec: hand-assembled vectors following RFC 6887's figures, round trips, garbage."""

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igd.proto import pcp
from igd.proto.errors import DecodeError
from igd.proto.pcp import (
    PcpDecodeError,
    PcpDescription,
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpPeerData,
    PcpPreferFailure,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
    PcpUnknownOption,
)

CLIENT = pcp.mapped(IPv4Address("192.168.1.10"))
NONCE = bytes(range(1, 13))
V4_ZERO = pcp.mapped(IPv4Address(0))

MAP_WIRE = bytes.fromhex(
    "02 01 0000 00001c20"  # version 2, MAP, reserved, lifetime 7200
    "00000000000000000000ffffc0a8010a"  # client ::ffff:192.168.1.10
    "0102030405060708090a0b0c 06 000000 1f90 1f90"  # nonce, TCP, reserved, ports 8080
    "00000000000000000000ffff00000000"  # suggested external ::ffff:0.0.0.0
    "80 00 0005 676f616d65000000"  # DESCRIPTION "goame" padded
    "02 00 0000"  # PREFER_FAILURE
)
MAP_REQUEST = PcpRequest(
    PcpOpcode.MAP,
    7200,
    CLIENT,
    PcpMapData(NONCE, 6, 8080, 8080, V4_ZERO),
    (PcpDescription("goame"), PcpPreferFailure()),
)
MAP_RESPONSE_WIRE = bytes.fromhex(
    "02 81 00 00 00000e10 0000002a" + "00" * 12
    + "0102030405060708090a0b0c 06 000000 1f90 4e20"
    "00000000000000000000ffffcb007101"
)  # fmt: skip
MAP_RESPONSE = PcpResponse(
    PcpOpcode.MAP,
    PcpResult.SUCCESS,
    3600,
    42,
    PcpMapData(NONCE, 6, 8080, 20000, pcp.mapped(IPv4Address("203.0.113.1"))),
)


def test_map_request_vector() -> None:
    assert pcp.encode_request(MAP_REQUEST) == MAP_WIRE
    assert pcp.decode_request(MAP_WIRE) == MAP_REQUEST


def test_map_response_vector() -> None:
    assert pcp.encode_response(MAP_RESPONSE) == MAP_RESPONSE_WIRE
    assert pcp.decode_response(MAP_RESPONSE_WIRE) == MAP_RESPONSE


def test_announce_is_a_bare_header() -> None:
    request = PcpRequest(PcpOpcode.ANNOUNCE, 0, CLIENT)
    wire = pcp.encode_request(request)
    assert len(wire) == 24 and wire[:2] == b"\x02\x00"
    assert pcp.decode_request(wire) == request


def test_mapped_addresses_check_all_96_bits() -> None:
    assert pcp.unmapped(CLIENT) == IPv4Address("192.168.1.10")
    assert pcp.unmapped(IPv6Address("::1:ffff:c0a8:10a")) is None
    assert pcp.unmapped(IPv6Address("2001:db8::1")) is None


@pytest.mark.parametrize(
    ("wire", "result"),
    [
        (b"\x02", None),  # shorter than 2 octets
        (b"\x02\x81" + bytes(22), None),  # R bit set
        (b"\x02\x01" + bytes(10), None),  # shorter than a header
        (b"\x03\x01" + bytes(22), PcpResult.UNSUPP_VERSION),
        (b"\x02\x01" + bytes(26), PcpResult.MALFORMED_REQUEST),  # not a multiple of 4
        (b"\x02\x01" + bytes(1102), PcpResult.MALFORMED_REQUEST),  # over 1100
        (b"\x02\x01" + bytes(26 + 16), PcpResult.MALFORMED_REQUEST),  # too short for MAP
        (b"\x02\x02" + bytes(22 + 36), PcpResult.MALFORMED_REQUEST),  # too short for PEER
        (b"\x02\x05" + bytes(22), PcpResult.UNSUPP_OPCODE),
        (MAP_WIRE[:60] + b"\x80\x00\x00\x30" + bytes(4), PcpResult.MALFORMED_OPTION),
        (MAP_WIRE[:60] + b"\x02\x00\x00\x04" + bytes(4), PcpResult.MALFORMED_OPTION),
        (MAP_WIRE[:60] + b"\x01\x00\x00\x04" + bytes(4), PcpResult.MALFORMED_OPTION),
    ],
)
def test_decode_errors_carry_the_answer(wire: bytes, result: PcpResult | None) -> None:
    with pytest.raises(PcpDecodeError) as caught:
        pcp.decode_request(wire)
    assert caught.value.result == result


def test_invalid_utf8_description_is_kept_aside_not_an_error() -> None:
    wire = MAP_WIRE[:60] + b"\x80\x00\x00\x02\xff\xfe\x00\x00"
    request = pcp.decode_request(wire)
    assert request.options == (PcpUnknownOption(128, b"\xff\xfe"),)
    assert not request.options[0].mandatory  # type: ignore[union-attr]


def test_error_copies_the_request() -> None:
    parsed = pcp.encode_error(
        MAP_WIRE, PcpResult.NOT_AUTHORIZED, lifetime=1800, epoch=7, parsed=True
    )
    assert len(parsed) == len(MAP_WIRE)
    assert parsed[:12] == bytes.fromhex("02 81 00 02 00000708 00000007")
    assert parsed[12:24] == bytes(12)
    assert parsed[24:] == MAP_WIRE[24:]
    odd = MAP_WIRE[:26]  # unparsed: padded, reserved keeps the client address's last 96 bits
    unparsed = pcp.encode_error(
        odd, PcpResult.MALFORMED_REQUEST, lifetime=1800, epoch=7, parsed=False
    )
    assert unparsed[12:24] == MAP_WIRE[12:24]
    # Too short for MAP: the opcode data are zero-filled, so the answer is a whole MAP answer.
    assert len(unparsed) == 60 and unparsed[24:] == MAP_WIRE[24:26] + bytes(34)
    big = pcp.encode_error(
        MAP_WIRE + bytes(2000), PcpResult.MALFORMED_REQUEST, lifetime=1, epoch=1, parsed=False
    )
    assert len(big) == 1100


def test_error_for_an_unparsed_request_keeps_only_whole_options() -> None:
    third_party = bytes.fromhex("01 00 0010") + bytes(16)
    short_third_party = bytes.fromhex("01 00 0004") + bytes(4)
    description = bytes.fromhex("80 00 0003") + b"abc\0"
    runaway = bytes.fromhex("80 00 0100") + bytes(4)  # claims 256 octets, has 4
    wire = MAP_WIRE[:60] + third_party + short_third_party + description + runaway
    answer = pcp.encode_error(
        wire, PcpResult.MALFORMED_OPTION, lifetime=1800, epoch=7, parsed=False
    )
    assert answer == pcp.encode_error(
        MAP_WIRE[:60] + third_party + description,
        PcpResult.MALFORMED_OPTION,
        lifetime=1800,
        epoch=7,
        parsed=False,
    )
    assert pcp.decode_response(answer).options == (
        PcpThirdParty(IPv6Address(0)),
        PcpDescription("abc"),
    )
    unknown_opcode = b"\x02\x09" + bytes(22) + b"\xff" * 7
    copied = pcp.encode_error(
        unknown_opcode, PcpResult.UNSUPP_OPCODE, lifetime=1800, epoch=7, parsed=False
    )
    assert copied[24:] == b"\xff" * 7 + b"\0"  # payload of an unknown opcode: as is


addresses = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)
nonces = st.binary(min_size=12, max_size=12)
map_data = st.builds(PcpMapData, nonces, st.integers(0, 255), ports, ports, addresses)
peer_data = st.builds(
    PcpPeerData, nonces, st.integers(0, 255), ports, ports, addresses, ports, addresses
)
options = st.lists(
    st.one_of(
        st.builds(PcpThirdParty, addresses),
        st.just(PcpPreferFailure()),
        st.builds(PcpFilter, st.integers(0, 255), ports, addresses),
        st.builds(PcpDescription, st.text(max_size=40)),
        st.builds(
            PcpUnknownOption, st.integers(4, 127) | st.integers(129, 255), st.binary(max_size=20)
        ),
    ),
    max_size=5,
).map(tuple)


@st.composite
def requests(draw: st.DrawFn) -> PcpRequest:
    opcode = draw(st.sampled_from(PcpOpcode))
    data = {PcpOpcode.MAP: map_data, PcpOpcode.PEER: peer_data}.get(opcode, st.none())
    return PcpRequest(
        opcode, draw(st.integers(0, 2**32 - 1)), draw(addresses), draw(data), draw(options)
    )


@given(requests())
def test_request_round_trip(request: PcpRequest) -> None:
    assert pcp.decode_request(pcp.encode_request(request)) == request


@given(requests(), st.sampled_from(PcpResult), st.integers(0, 2**32 - 1))
def test_response_round_trip(request: PcpRequest, result: PcpResult, epoch: int) -> None:
    response = PcpResponse(
        request.opcode, result, request.lifetime, epoch, request.data, request.options
    )
    assert pcp.decode_response(pcp.encode_response(response)) == response


@pytest.mark.fuzz
@given(st.binary(max_size=1200))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    for decode in (pcp.decode_request, pcp.decode_response):
        try:
            decode(data)
        except DecodeError:
            pass


@pytest.mark.fuzz
@given(st.binary(min_size=24, max_size=120).map(lambda b: b"\x02\x01" + b[2:]))
def test_mostly_valid_headers_raise_only_decode_error(data: bytes) -> None:
    try:
        pcp.decode_request(data + bytes(-len(data) % 4))
    except DecodeError:
        pass
