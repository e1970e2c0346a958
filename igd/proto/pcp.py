"""PCP (RFC 6887) messages with the THIRD_PARTY, PREFER_FAILURE, FILTER and DESCRIPTION
(RFC 7220) options: requests and responses, encoded and decoded.

Addresses are always 128 bits on the wire; IPv4 travels IPv4-mapped (::ffff:a.b.c.d).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from igd.proto.errors import DecodeError

VERSION = 2
SERVER_PORT = 5351
CLIENT_PORT = 5350
HEADER_SIZE = 24
MAX_SIZE = 1100
RESPONSE_BIT = 0x80
NONCE_SIZE = 12
DESCRIPTION_MAX = 1016  # RFC 7220 §2: what fits in 1100 octets with a MAP header

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3xHH16s")
_PEER_TAIL = struct.Struct("!H2x16s")
_OPTION = struct.Struct("!BxH")
_FILTER = struct.Struct("!xBH16s")


class PcpOpcode(enum.IntEnum):
    """Opcodes (RFC 6887 §19.2)."""

    ANNOUNCE = 0
    MAP = 1
    PEER = 2


_DATA_SIZE = {
    PcpOpcode.ANNOUNCE: 0,
    PcpOpcode.MAP: _MAP.size,
    PcpOpcode.PEER: _MAP.size + _PEER_TAIL.size,
}
"""Opcode-specific data in octets (RFC 6887 §11.1, §12.1, §14.1)."""


class PcpResult(enum.IntEnum):
    """Result codes (RFC 6887 §7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class PcpOptionCode(enum.IntEnum):
    """Option codes (RFC 6887 §13, RFC 7220)."""

    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3
    DESCRIPTION = 128


OPTIONAL_BIT = 0x80
"""RFC 6887 §7.3: options with this bit are optional to process; the rest are mandatory."""


class PcpDecodeError(DecodeError):
    """A request that cannot be processed; `result` is the error to answer, None to drop."""

    def __init__(self, message: str, result: PcpResult | None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class PcpThirdParty:
    """THIRD_PARTY: the internal address the mapping is for."""

    address: IPv6Address


@dataclass(frozen=True, slots=True)
class PcpPreferFailure:
    """PREFER_FAILURE: fail rather than assign another external address or port."""


@dataclass(frozen=True, slots=True)
class PcpFilter:
    """FILTER: only this remote prefix (and port, 0 = any) may use the mapping."""

    prefix_length: int
    remote_port: int
    remote_address: IPv6Address


@dataclass(frozen=True, slots=True)
class PcpDescription:
    """DESCRIPTION (RFC 7220): a human-readable label, UTF-8."""

    text: str


@dataclass(frozen=True, slots=True)
class PcpUnknownOption:
    """An option this codec does not interpret (or a DESCRIPTION that is not UTF-8)."""

    code: int
    data: bytes

    @property
    def mandatory(self) -> bool:
        return not self.code & OPTIONAL_BIT


PcpOption = PcpThirdParty | PcpPreferFailure | PcpFilter | PcpDescription | PcpUnknownOption


@dataclass(frozen=True, slots=True)
class PcpMapData:
    """MAP opcode data (RFC 6887 §11.1)."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPv6Address


@dataclass(frozen=True, slots=True)
class PcpPeerData:
    """PEER opcode data (RFC 6887 §12.1): MAP's fields plus the remote peer."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPv6Address
    remote_port: int
    remote_address: IPv6Address


PcpOpcodeData = PcpMapData | PcpPeerData | None


@dataclass(frozen=True, slots=True)
class PcpRequest:
    """A PCP request."""

    opcode: PcpOpcode
    lifetime: int
    client_address: IPv6Address
    data: PcpOpcodeData = None
    options: tuple[PcpOption, ...] = ()


@dataclass(frozen=True, slots=True)
class PcpResponse:
    """A PCP response."""

    opcode: PcpOpcode
    result: PcpResult
    lifetime: int
    epoch: int
    data: PcpOpcodeData = None
    options: tuple[PcpOption, ...] = ()


def mapped(address: IPv4Address) -> IPv6Address:
    """The IPv4-mapped IPv6 form PCP carries an IPv4 address in."""
    return IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def unmapped(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped address (all 96 prefix bits checked), or None."""
    return address.ipv4_mapped


# -- decoding -----------------------------------------------------------------------------


def decode_request(data: bytes) -> PcpRequest:
    """Decode a request in the RFC 6887 §8.2 order of checks; raise PcpDecodeError."""
    if len(data) < 2:
        raise PcpDecodeError("shorter than 2 octets", None)
    if data[1] & RESPONSE_BIT:
        raise PcpDecodeError("R bit set: a response, not a request", None)
    if data[0] != VERSION:
        raise PcpDecodeError(f"unsupported version {data[0]}", PcpResult.UNSUPP_VERSION)
    if len(data) < HEADER_SIZE:
        raise PcpDecodeError(f"{len(data)} octets is shorter than a PCP header", None)
    if len(data) > MAX_SIZE or len(data) % 4:
        raise PcpDecodeError(
            f"length {len(data)} is over 1100 or not a multiple of 4", PcpResult.MALFORMED_REQUEST
        )
    _, opcode_byte, _, lifetime, client = _REQUEST_HEADER.unpack_from(data)
    try:
        opcode = PcpOpcode(opcode_byte & ~RESPONSE_BIT)
    except ValueError:
        raise PcpDecodeError(f"unsupported opcode {opcode_byte}", PcpResult.UNSUPP_OPCODE) from None
    body, offset = _decode_data(opcode, data, HEADER_SIZE, PcpResult.MALFORMED_REQUEST)
    options = _decode_options(data, offset)
    return PcpRequest(opcode, lifetime, IPv6Address(client), body, options)


def decode_response(data: bytes) -> PcpResponse:
    """Decode a response as a client receives it; raise PcpDecodeError (result None)."""
    if len(data) < HEADER_SIZE or len(data) > MAX_SIZE or len(data) % 4:
        raise PcpDecodeError(f"bad response length {len(data)}", None)
    version, opcode_byte, _, result, lifetime, epoch, _ = _RESPONSE_HEADER.unpack_from(data)
    if version != VERSION or not opcode_byte & RESPONSE_BIT:
        raise PcpDecodeError("not a PCP version 2 response", None)
    try:
        opcode = PcpOpcode(opcode_byte & ~RESPONSE_BIT)
        code = PcpResult(result)
    except ValueError as error:
        raise PcpDecodeError(str(error), None) from None
    try:
        body, offset = _decode_data(opcode, data, HEADER_SIZE, None)
        options = _decode_options(data, offset)
    except PcpDecodeError as error:
        raise PcpDecodeError(str(error), None) from None
    return PcpResponse(opcode, code, lifetime, epoch, body, options)


def _decode_data(
    opcode: PcpOpcode, data: bytes, offset: int, error: PcpResult | None
) -> tuple[PcpOpcodeData, int]:
    if opcode is PcpOpcode.ANNOUNCE:
        return None, offset
    need = _MAP.size + (_PEER_TAIL.size if opcode is PcpOpcode.PEER else 0)
    if len(data) - offset < need:
        raise PcpDecodeError(f"too short for {opcode.name} opcode data", error)
    nonce, protocol, internal, external, address = _MAP.unpack_from(data, offset)
    if opcode is PcpOpcode.MAP:
        return PcpMapData(nonce, protocol, internal, external, IPv6Address(address)), offset + need
    remote_port, remote = _PEER_TAIL.unpack_from(data, offset + _MAP.size)
    peer = PcpPeerData(
        nonce, protocol, internal, external, IPv6Address(address), remote_port, IPv6Address(remote)
    )
    return peer, offset + need


def _decode_options(data: bytes, offset: int) -> tuple[PcpOption, ...]:
    options: list[PcpOption] = []
    while offset < len(data):
        if len(data) - offset < _OPTION.size:
            raise PcpDecodeError("truncated option header", PcpResult.MALFORMED_OPTION)
        code, length = _OPTION.unpack_from(data, offset)
        start = offset + _OPTION.size
        end = start + length
        if end > len(data):
            raise PcpDecodeError(f"option {code} runs past the packet", PcpResult.MALFORMED_OPTION)
        options.append(_decode_option(code, data[start:end]))
        offset = end + (-length % 4)
    return tuple(options)


def _decode_option(code: int, value: bytes) -> PcpOption:
    def want(size: int) -> None:
        if len(value) != size:
            raise PcpDecodeError(
                f"option {code} has length {len(value)}, want {size}", PcpResult.MALFORMED_OPTION
            )

    if code == PcpOptionCode.THIRD_PARTY:
        want(16)
        return PcpThirdParty(IPv6Address(value))
    if code == PcpOptionCode.PREFER_FAILURE:
        want(0)
        return PcpPreferFailure()
    if code == PcpOptionCode.FILTER:
        want(_FILTER.size)
        prefix, port, address = _FILTER.unpack(value)
        return PcpFilter(prefix, port, IPv6Address(address))
    if code == PcpOptionCode.DESCRIPTION:
        try:
            return PcpDescription(value.decode("utf-8"))
        except UnicodeDecodeError:
            # RFC 7220 §3: a description that is not UTF-8 is ignored, not an error.
            return PcpUnknownOption(code, value)
    return PcpUnknownOption(code, value)


# -- encoding -----------------------------------------------------------------------------


def encode_request(request: PcpRequest) -> bytes:
    """Encode a request as a client sends it."""
    head = _REQUEST_HEADER.pack(
        VERSION, request.opcode, 0, request.lifetime, request.client_address.packed
    )
    return head + _encode_data(request.data) + encode_options(request.options)


def encode_response(response: PcpResponse) -> bytes:
    """Encode a (success or error) response for a request that parsed."""
    head = _RESPONSE_HEADER.pack(
        VERSION,
        RESPONSE_BIT | response.opcode,
        0,
        response.result,
        response.lifetime,
        response.epoch,
        bytes(12),
    )
    return head + _encode_data(response.data) + encode_options(response.options)


def encode_error(
    request: bytes, result: PcpResult, *, lifetime: int, epoch: int, parsed: bool
) -> bytes:
    """RFC 6887 §8.2: an error answer is the request (≤1100 octets, padded to a multiple of 4)
    with the R bit, result, lifetime and epoch set; the reserved field is zero for requests
    that parsed and keeps the last 96 bits of the client address field otherwise (§7.2)."""
    body = bytearray(request[:MAX_SIZE])
    body += bytes(-len(body) % 4)
    if len(body) < HEADER_SIZE:
        body += bytes(HEADER_SIZE - len(body))
    body[0] = VERSION
    body[1] |= RESPONSE_BIT
    body[2] = 0
    body[3] = result
    struct.pack_into("!II", body, 4, lifetime, epoch)
    if parsed:
        body[12:24] = bytes(12)
        return bytes(body)
    return _readable(body)


def _readable(body: bytearray) -> bytes:
    """The copy of a request that did not parse, cut to what a reader can delimit.

    §7.3 asks for a complete copy, but a copy of a request too short for its opcode, or of
    an option that runs past the packet, would be a malformed answer. So opcode data are
    zero-filled to their size and only whole, well-formed options are kept, in order; an
    unknown opcode's payload is copied as is (§8.2: nobody interprets it).
    """
    try:
        opcode = PcpOpcode(body[1] & ~RESPONSE_BIT)
    except ValueError:
        return bytes(body)
    offset = HEADER_SIZE + _DATA_SIZE[opcode]
    out = bytearray(body[:offset])
    out += bytes(offset - len(out))
    while len(body) - offset >= _OPTION.size:
        code, length = _OPTION.unpack_from(body, offset)
        end = offset + _OPTION.size + length
        if end > len(body):
            break  # the rest is not an option anyone can delimit
        padded = end + (-length % 4)
        try:
            _decode_option(code, bytes(body[offset + _OPTION.size : end]))
        except PcpDecodeError:
            pass  # a known option of the wrong length: left out, its neighbours kept
        else:
            out += body[offset:end] + bytes(padded - end)
        offset = padded
    return bytes(out)


def encode_options(options: tuple[PcpOption, ...] | list[PcpOption]) -> bytes:
    """Encode options, each padded to a multiple of 4 octets."""
    out = bytearray()
    for option in options:
        code, value = _option_value(option)
        out += _OPTION.pack(code, len(value)) + value + bytes(-len(value) % 4)
    return bytes(out)


def _option_value(option: PcpOption) -> tuple[int, bytes]:
    if isinstance(option, PcpThirdParty):
        return PcpOptionCode.THIRD_PARTY, option.address.packed
    if isinstance(option, PcpPreferFailure):
        return PcpOptionCode.PREFER_FAILURE, b""
    if isinstance(option, PcpFilter):
        packed = _FILTER.pack(
            option.prefix_length, option.remote_port, option.remote_address.packed
        )
        return PcpOptionCode.FILTER, packed
    if isinstance(option, PcpDescription):
        return PcpOptionCode.DESCRIPTION, option.text.encode("utf-8")
    return option.code, option.data


def _encode_data(data: PcpOpcodeData) -> bytes:
    if data is None:
        return b""
    head = _MAP.pack(
        data.nonce, data.protocol, data.internal_port, data.external_port,
        data.external_address.packed,
    )  # fmt: skip
    if isinstance(data, PcpPeerData):
        return head + _PEER_TAIL.pack(data.remote_port, data.remote_address.packed)
    return head
