"""NAT-PMP codec: golden vectors from RFC 6886's layouts, round trips, arbitrary bytes."""

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igd.model import Protocol
from igd.proto import natpmp
from igd.proto.errors import DecodeError
from igd.proto.natpmp import (
    NatPmpExternalAddressRequest,
    NatPmpExternalAddressResponse,
    NatPmpMapRequest,
    NatPmpMapResponse,
    NatPmpResult,
)

# (message, bytes) pairs shared by the encoder and decoder tests.
REQUESTS = [
    (NatPmpExternalAddressRequest(), bytes.fromhex("0000")),
    (
        NatPmpMapRequest(Protocol.TCP, 8080, 8080, 3600),
        bytes.fromhex("0002 0000 1f90 1f90 00000e10"),
    ),
    (NatPmpMapRequest(Protocol.UDP, 53, 0, 0), bytes.fromhex("0001 0000 0035 0000 00000000")),
]
RESPONSES = [
    (
        NatPmpExternalAddressResponse(NatPmpResult.SUCCESS, 42, IPv4Address("203.0.113.1")),
        bytes.fromhex("0080 0000 0000002a cb007101"),
    ),
    (
        NatPmpMapResponse(Protocol.TCP, NatPmpResult.SUCCESS, 7, 8080, 18080, 7200),
        bytes.fromhex("0082 0000 00000007 1f90 46a0 00001c20"),
    ),
    (
        NatPmpMapResponse(Protocol.UDP, NatPmpResult.NOT_AUTHORIZED, 1, 23, 0, 0),
        bytes.fromhex("0081 0002 00000001 0017 0000 00000000"),
    ),
]


@pytest.mark.parametrize(("message", "wire"), REQUESTS)
def test_request_vectors(message: natpmp.NatPmpRequest, wire: bytes) -> None:
    assert natpmp.encode_request(message) == wire
    assert natpmp.decode_request(wire) == message


@pytest.mark.parametrize(("message", "wire"), RESPONSES)
def test_response_vectors(message: natpmp.NatPmpResponse, wire: bytes) -> None:
    assert natpmp.encode_response(message) == wire
    assert natpmp.decode_response(wire) == message


def test_failed_address_response_hides_address() -> None:
    wire = natpmp.encode_response(
        NatPmpExternalAddressResponse(NatPmpResult.NETWORK_FAILURE, 5, IPv4Address("203.0.113.1"))
    )
    assert wire[8:] == bytes(4)
    assert wire[2:4] == b"\x00\x03"


def test_unsupported_version_answer_uses_opcode_128() -> None:
    # RFC 6886 erratum 3618: opcode 128, result 1, the epoch.
    # A whole external address response (12 octets), address 0.0.0.0.
    assert natpmp.encode_unsupported_version(9) == bytes.fromhex("0080 0001 00000009 00000000")
    with pytest.raises(natpmp.NatPmpUnsupportedVersion) as caught:
        natpmp.decode_request(bytes.fromhex("0100"))
    assert caught.value.version == 1


def test_unsupported_opcode_echoes_the_request() -> None:
    request = bytes.fromhex("0003 0000 1111 2222 33333333")
    with pytest.raises(natpmp.NatPmpUnsupportedOpcode):
        natpmp.decode_request(request)
    reply = natpmp.encode_unsupported_opcode(request, 3)
    assert reply == bytes.fromhex("0083 0005 00000003") + request[8:]


def test_responses_and_short_packets_are_not_requests() -> None:
    with pytest.raises(natpmp.NatPmpNotARequest):
        natpmp.decode_request(bytes.fromhex("0080"))
    with pytest.raises(DecodeError):
        natpmp.decode_request(bytes.fromhex("0002 0000 1f90"))
    with pytest.raises(DecodeError):
        natpmp.decode_request(b"\x00")


requests = st.one_of(
    st.just(NatPmpExternalAddressRequest()),
    st.builds(
        NatPmpMapRequest,
        st.sampled_from(Protocol),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.integers(0, 2**32 - 1),
    ),
)
responses = st.one_of(
    st.builds(
        NatPmpExternalAddressResponse,
        st.just(NatPmpResult.SUCCESS),
        st.integers(0, 2**32 - 1),
        st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
    ),
    st.builds(
        NatPmpMapResponse,
        st.sampled_from(Protocol),
        st.sampled_from(NatPmpResult),
        st.integers(0, 2**32 - 1),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.integers(0, 2**32 - 1),
    ),
)


@given(requests)
def test_request_round_trip(message: natpmp.NatPmpRequest) -> None:
    assert natpmp.decode_request(natpmp.encode_request(message)) == message


@given(responses)
def test_response_round_trip(message: natpmp.NatPmpResponse) -> None:
    assert natpmp.decode_response(natpmp.encode_response(message)) == message


@pytest.mark.fuzz
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    for decode in (natpmp.decode_request, natpmp.decode_response):
        try:
            decode(data)
        except DecodeError:
            pass
