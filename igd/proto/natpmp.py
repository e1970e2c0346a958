"""NAT-PMP (RFC 6886) messages: requests and responses, encoded and decoded.

Every NAT-PMP packet starts with version (0) and opcode; responses carry opcode + 128,
a 16-bit result code and the seconds since start of epoch (SSSoE).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from igd.model import Protocol
from igd.proto.errors import DecodeError

VERSION = 0
SERVER_PORT = 5351
CLIENT_PORT = 5350
RESPONSE_BIT = 0x80

_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")
_SHORT_RESPONSE = struct.Struct("!BBHI")


class NatPmpOpcode(enum.IntEnum):
    """Request opcodes (RFC 6886 §3.2, §3.3); responses add 128."""

    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class NatPmpResult(enum.IntEnum):
    """Result codes (RFC 6886 §3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


_PROTOCOL_OF: dict[int, Protocol] = {
    NatPmpOpcode.MAP_UDP: Protocol.UDP,
    NatPmpOpcode.MAP_TCP: Protocol.TCP,
}
_OPCODE_OF = {Protocol.UDP: NatPmpOpcode.MAP_UDP, Protocol.TCP: NatPmpOpcode.MAP_TCP}


class NatPmpNotARequest(DecodeError):
    """Opcode 128 or above: a response, which a server silently ignores (RFC 6886 §3.5)."""


class NatPmpUnsupportedVersion(DecodeError):
    """The version octet is not 0."""

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported NAT-PMP version {version}")
        self.version = version


class NatPmpUnsupportedOpcode(DecodeError):
    """An opcode below 128 that NAT-PMP does not define; answered with result 5."""

    def __init__(self, opcode: int) -> None:
        super().__init__(f"unsupported NAT-PMP opcode {opcode}")
        self.opcode = opcode


@dataclass(frozen=True, slots=True)
class NatPmpExternalAddressRequest:
    """Opcode 0: what is the gateway's external address?"""


@dataclass(frozen=True, slots=True)
class NatPmpMapRequest:
    """Opcode 1 or 2: create, renew (lifetime > 0) or delete (lifetime 0) a mapping."""

    protocol: Protocol
    internal_port: int
    external_port: int
    lifetime: int


@dataclass(frozen=True, slots=True)
class NatPmpExternalAddressResponse:
    """Answer to opcode 0; the address is 0.0.0.0 unless the result is success."""

    result: NatPmpResult
    epoch: int
    address: IPv4Address


@dataclass(frozen=True, slots=True)
class NatPmpMapResponse:
    """Answer to a map request."""

    protocol: Protocol
    result: NatPmpResult
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


NatPmpRequest = NatPmpExternalAddressRequest | NatPmpMapRequest
NatPmpResponse = NatPmpExternalAddressResponse | NatPmpMapResponse


def decode_request(data: bytes) -> NatPmpRequest:
    """Decode a request; raise a DecodeError subclass for anything else."""
    if len(data) < 2:
        raise DecodeError(f"NAT-PMP packet of {len(data)} octets is too short")
    version, opcode = data[0], data[1]
    if version != VERSION:
        raise NatPmpUnsupportedVersion(version)
    if opcode & RESPONSE_BIT:
        raise NatPmpNotARequest(f"opcode {opcode} is a response")
    if opcode == NatPmpOpcode.EXTERNAL_ADDRESS:
        return NatPmpExternalAddressRequest()
    if opcode not in _PROTOCOL_OF:
        raise NatPmpUnsupportedOpcode(opcode)
    if len(data) < _MAP_REQUEST.size:
        raise DecodeError(f"NAT-PMP map request of {len(data)} octets, want 12")
    _, _, _reserved, internal, external, lifetime = _MAP_REQUEST.unpack_from(data)
    # An int indexes the IntEnum-keyed table alike, without NatPmpOpcode()'s lookup.
    return NatPmpMapRequest(_PROTOCOL_OF[opcode], internal, external, lifetime)


def encode_request(request: NatPmpRequest) -> bytes:
    """Encode a request as a client sends it."""
    if isinstance(request, NatPmpExternalAddressRequest):
        return bytes((VERSION, NatPmpOpcode.EXTERNAL_ADDRESS))
    return _MAP_REQUEST.pack(
        VERSION,
        _OPCODE_OF[request.protocol],
        0,
        request.internal_port,
        request.external_port,
        request.lifetime,
    )


def encode_response(response: NatPmpResponse) -> bytes:
    """Encode a response as the gateway sends it."""
    if isinstance(response, NatPmpExternalAddressResponse):
        address = response.address if response.result == NatPmpResult.SUCCESS else None
        return _ADDRESS_RESPONSE.pack(
            VERSION,
            RESPONSE_BIT | NatPmpOpcode.EXTERNAL_ADDRESS,
            response.result,
            response.epoch,
            (address or IPv4Address(0)).packed,
        )
    return _MAP_RESPONSE.pack(
        VERSION,
        RESPONSE_BIT | _OPCODE_OF[response.protocol],
        response.result,
        response.epoch,
        response.internal_port,
        response.external_port,
        response.lifetime,
    )


def decode_response(data: bytes) -> NatPmpResponse:
    """Decode a response as a client receives it; raise DecodeError."""
    if len(data) < _SHORT_RESPONSE.size:
        raise DecodeError(f"NAT-PMP response of {len(data)} octets is too short")
    version, opcode, result, epoch = _SHORT_RESPONSE.unpack_from(data)
    if version != VERSION:
        raise NatPmpUnsupportedVersion(version)
    if not opcode & RESPONSE_BIT:
        raise DecodeError(f"opcode {opcode} is a request, not a response")
    try:
        code = NatPmpResult(result)
    except ValueError:
        raise DecodeError(f"unknown NAT-PMP result code {result}") from None
    request_opcode = opcode & ~RESPONSE_BIT
    if request_opcode == NatPmpOpcode.EXTERNAL_ADDRESS:
        if len(data) < _ADDRESS_RESPONSE.size:
            raise DecodeError("NAT-PMP external address response shorter than 12 octets")
        return NatPmpExternalAddressResponse(code, epoch, IPv4Address(data[8:12]))
    if request_opcode not in _PROTOCOL_OF:
        raise DecodeError(f"unknown NAT-PMP response opcode {opcode}")
    if len(data) < _MAP_RESPONSE.size:
        raise DecodeError("NAT-PMP map response shorter than 16 octets")
    _, _, _, _, internal, external, lifetime = _MAP_RESPONSE.unpack_from(data)
    protocol = _PROTOCOL_OF[NatPmpOpcode(request_opcode)]
    return NatPmpMapResponse(protocol, code, epoch, internal, external, lifetime)


def encode_unsupported_version(epoch: int) -> bytes:
    """The answer to any version but 0: opcode 128, result 1 (RFC 6886 §3.5, erratum 3618)."""
    # §3.5 draws only the first 8 octets, but opcode 128 is the external address response,
    # 12 octets: the address follows as 0.0.0.0, as in any failed one, so a reader of
    # opcode 128 finds a whole message.
    return encode_response(
        NatPmpExternalAddressResponse(NatPmpResult.UNSUPPORTED_VERSION, epoch, IPv4Address(0))
    )


def encode_unsupported_opcode(request: bytes, epoch: int) -> bytes:
    """RFC 6886 §3.5: the entire request returned with the opcode's top bit and result 5."""
    head = _SHORT_RESPONSE.pack(
        VERSION, request[1] | RESPONSE_BIT, NatPmpResult.UNSUPPORTED_OPCODE, epoch
    )
    return head + request[len(head) :]
