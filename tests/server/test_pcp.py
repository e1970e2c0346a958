"""PCP answers from the gateway (RFC 6887): every result code, options, nonce ownership,
idempotent retransmission, and no state change on any error.

These run the real handler, service, commit pipeline and lease store against the memory
backend; tests/lab/test_pcp_gateway.py covers the kernel side.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path

import pytest

from igd.decision import Reason
from igd.gateway import Gateway
from igd.model import RemoteFilter
from igd.policy import Policy
from igd.proto import pcp
from igd.proto.pcp import (
    PcpDescription,
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpPeerData,
    PcpPreferFailure,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
    PcpUnknownOption,
)
from igd.server.backends import BackendError
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import ExternalAddress
from igd.server.pcp import RESULT_FOR, PcpHandler
from igd.server.pcp_options import Limits
from igd.server.service import Service
from igd.server.store import LeaseStore

CLIENT = IPv4Address("192.168.1.10")
OTHER = IPv4Address("192.168.1.11")
SOURCE = (str(CLIENT), 40000)
EXTERNAL = IPv4Address("198.51.100.7")
NONCE = b"n" * 12
POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 120
max_mappings_per_client = 3
max_mappings = 100
[[rules]]
name = "no telnet"
action = "deny"
internal_ports = "23"
[[rules]]
name = "printer may be mapped by the admin host"
action = "allow"
clients = ["192.168.1.2/32"]
allow_third_party = true
[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]
external_ports = "1024-65535"
description = "^[A-Za-z0-9 ._-]*$"
"""


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.backend = MemoryBackend()
        self.service = Service(
            Gateway(Policy.parse(POLICY)), self.backend, LeaseStore(tmp / "leases.sqlite")
        )
        self.external = ExternalAddress("wan0", override=EXTERNAL, allow_private=True)
        self.external.refresh()
        self.handler = PcpHandler(self.service, self.external, Limits(max_filters=2))

    async def send(self, request: PcpRequest | bytes, source: tuple[str, int] = SOURCE) -> bytes:
        wire = request if isinstance(request, bytes) else pcp.encode_request(request)
        reply = await self.handler.handle(wire, source)
        assert reply is not None
        return reply

    async def ask(self, request: PcpRequest, source: tuple[str, int] = SOURCE) -> PcpResponse:
        return pcp.decode_response(await self.send(request, source))

    @property
    def table_size(self) -> int:
        return len(self.service.gateway.table)


def map_request(
    port: int = 8080,
    external: int = 8080,
    lifetime: int = 600,
    *options: PcpOption,
    client: IPv4Address = CLIENT,
    nonce: bytes = NONCE,
    protocol: int = 6,
) -> PcpRequest:
    data = PcpMapData(nonce, protocol, port, external, pcp.mapped(IPv4Address(0)))
    return PcpRequest(PcpOpcode.MAP, lifetime, pcp.mapped(client), data, options)


def peer_request(
    remote: str = "203.0.113.50",
    remote_port: int = 3478,
    external: int = 0,
    lifetime: int = 600,
    *options: PcpOption,
) -> PcpRequest:
    data = PcpPeerData(
        NONCE,
        17,
        5000,
        external,
        pcp.mapped(IPv4Address(0)),
        remote_port,
        pcp.mapped(IPv4Address(remote)),
    )
    return PcpRequest(PcpOpcode.PEER, lifetime, pcp.mapped(CLIENT), data, options)


def filter_of(address: str, prefix: int = 32, port: int = 0) -> PcpFilter:
    return PcpFilter(96 + prefix, port, pcp.mapped(IPv4Address(address)))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    committer = asyncio.create_task(rig.service.run_committer())
    yield rig
    committer.cancel()


def test_every_reason_has_a_result_code() -> None:
    assert set(RESULT_FOR) == set(Reason)


async def test_map_success_carries_what_was_granted(rig: Rig) -> None:
    response = await rig.ask(map_request(8080, 8080, 7200, PcpDescription("web server")))
    assert response.result is PcpResult.SUCCESS
    assert response.lifetime == 3600  # clamped to max_lease
    assert isinstance(response.data, PcpMapData)
    assert response.data.external_port == 8080 and response.data.nonce == NONCE
    assert response.data.external_address == pcp.mapped(EXTERNAL)
    assert response.options == (PcpDescription("web server"),)
    assert [m.description for m in rig.service.gateway.table] == ["web server"]


async def test_retransmission_returns_the_same_mapping(rig: Rig) -> None:
    first = await rig.ask(map_request(8080, 0))
    again = await rig.ask(map_request(8080, 9999))  # a different suggestion is ignored
    assert isinstance(first.data, PcpMapData) and isinstance(again.data, PcpMapData)
    assert first.data.external_port == again.data.external_port
    assert rig.table_size == 1


async def test_taken_suggestion_gets_another_port_without_prefer_failure(rig: Rig) -> None:
    await rig.ask(map_request(8080, 8080))
    other = await rig.ask(map_request(8080, 8080, client=OTHER), (str(OTHER), 1))
    assert other.result is PcpResult.SUCCESS
    assert isinstance(other.data, PcpMapData) and other.data.external_port not in (8080, 0)


async def test_prefer_failure(rig: Rig) -> None:
    await rig.ask(map_request(8080, 8080))
    taken = await rig.ask(
        map_request(8080, 8080, 600, PcpPreferFailure(), client=OTHER), (str(OTHER), 1)
    )
    assert taken.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
    assert 590 <= taken.lifetime <= 600  # the holder's remaining lifetime
    low = await rig.ask(map_request(9000, 80, 600, PcpPreferFailure()))
    assert low.result is PcpResult.CANNOT_PROVIDE_EXTERNAL  # outside the allowed ports
    reserved = await rig.ask(map_request(9000, 5351, 600, PcpPreferFailure(), protocol=17))
    assert reserved.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
    zero = await rig.ask(map_request(9000, 0, 600, PcpPreferFailure()))
    assert zero.result is PcpResult.MALFORMED_OPTION
    twice = await rig.ask(map_request(9000, 9000, 600, PcpPreferFailure(), PcpPreferFailure()))
    assert twice.result is PcpResult.MALFORMED_OPTION
    free = await rig.ask(map_request(9000, 9000, 600, PcpPreferFailure()))
    assert free.result is PcpResult.SUCCESS and free.options == (PcpPreferFailure(),)
    assert rig.table_size == 2


async def test_nonce_protects_a_mapping(rig: Rig) -> None:
    await rig.ask(map_request(8080, 8080))
    thief = await rig.ask(map_request(8080, 8080, nonce=b"x" * 12))
    assert thief.result is PcpResult.NOT_AUTHORIZED and 590 <= thief.lifetime <= 600
    delete = await rig.ask(map_request(8080, 0, 0, nonce=b"x" * 12))
    assert delete.result is PcpResult.NOT_AUTHORIZED
    assert rig.table_size == 1


async def test_delete_and_delete_of_nothing(rig: Rig) -> None:
    await rig.ask(map_request(8080, 8080))
    gone = await rig.ask(map_request(8080, 0, 0))
    assert (gone.result, gone.lifetime) == (PcpResult.SUCCESS, 0)
    assert rig.table_size == 0 and await rig.backend.entries() == set()
    again = await rig.ask(map_request(8080, 0, 0))
    assert again.result is PcpResult.SUCCESS


async def test_header_level_errors(rig: Rig) -> None:
    wire = pcp.encode_request(map_request())
    assert await rig.handler.handle(wire[:1], SOURCE) is None
    assert await rig.handler.handle(wire[:20], SOURCE) is None  # shorter than a header
    assert await rig.handler.handle(wire[:1] + b"\x81" + wire[2:], SOURCE) is None  # R bit
    odd = pcp.decode_response(await rig.send(wire[:-2]))
    assert odd.result is PcpResult.MALFORMED_REQUEST and odd.lifetime == 1800
    short = await rig.send(wire[:40])
    assert short[3] == PcpResult.MALFORMED_REQUEST
    # The copy is zero-filled to a whole MAP answer (60 octets), so it reads as one.
    assert len(short) == 60 and short[24:40] == wire[24:40] and short[40:] == bytes(20)
    opcode = await rig.send(wire[:1] + b"\x09" + wire[2:])
    assert opcode[1] == 0x89 and opcode[3] == PcpResult.UNSUPP_OPCODE
    liar = await rig.ask(map_request(client=OTHER))
    assert liar.result is PcpResult.ADDRESS_MISMATCH
    v6 = replace(map_request(), client_address=IPv6Address("2001:db8::1"))
    assert (await rig.ask(v6)).result is PcpResult.ADDRESS_MISMATCH
    bad_option = await rig.send(wire + b"\x80\x00\x00\x40")
    assert bad_option[3] == PcpResult.MALFORMED_OPTION
    assert rig.table_size == 0


async def test_error_answer_is_the_request_copied(rig: Rig) -> None:
    wire = pcp.encode_request(map_request(23, 23))
    reply = await rig.send(wire)
    assert reply[3] == PcpResult.NOT_AUTHORIZED
    assert reply[1] == 0x81 and reply[12:24] == bytes(12) and reply[24:] == wire[24:]


async def test_protocol_and_port_zero(rig: Rig) -> None:
    all_protocols = await rig.ask(map_request(0, 0, protocol=0))
    assert all_protocols.result is PcpResult.UNSUPP_PROTOCOL
    port_without_protocol = await rig.ask(map_request(80, 0, protocol=0))
    assert port_without_protocol.result is PcpResult.MALFORMED_REQUEST
    sctp = await rig.ask(map_request(8080, 0, protocol=132))
    assert sctp.result is PcpResult.UNSUPP_PROTOCOL
    all_ports = await rig.ask(map_request(0, 0))
    assert all_ports.result is PcpResult.UNSUPP_PROTOCOL


async def test_policy_quota_and_resources(rig: Rig) -> None:
    telnet = await rig.ask(map_request(23, 23))
    assert telnet.result is PcpResult.NOT_AUTHORIZED and telnet.lifetime == 1800
    for port in (2001, 2002, 2003):
        assert (await rig.ask(map_request(port, port))).result is PcpResult.SUCCESS
    quota = await rig.ask(map_request(2004, 2004))
    assert quota.result is PcpResult.USER_EX_QUOTA and quota.lifetime == 30
    rig.external.current = None
    assert (await rig.ask(map_request(2001, 2001))).result is PcpResult.NETWORK_FAILURE
    rig.external.current = EXTERNAL
    rig.backend.fail_next = BackendError("kernel refused")
    failed = await rig.ask(map_request(2001, 2001, 900))
    assert failed.result is PcpResult.NO_RESOURCES
    assert rig.table_size == 3


async def test_description_rules(rig: Rig) -> None:
    bad = await rig.ask(map_request(8080, 8080, 600, PcpDescription("<script>")))
    assert bad.result is PcpResult.NOT_AUTHORIZED  # the policy's description regex
    long = "x" * 300
    ok = await rig.ask(map_request(8080, 8080, 600, PcpDescription(long)))
    assert ok.options == (PcpDescription("x" * 128),)  # stored and echoed truncated
    kept = await rig.ask(map_request(8080, 8080, 600))
    assert kept.options == ()  # never echoed unless asked
    assert [m.description for m in rig.service.gateway.table] == ["x" * 128]
    invalid = PcpUnknownOption(128, b"\xff\xfe")
    ignored = await rig.ask(map_request(8080, 8080, 600, invalid))
    assert ignored.result is PcpResult.SUCCESS and ignored.options == ()
    cleared = await rig.ask(map_request(8080, 8080, 600, PcpDescription("")))
    assert cleared.options == (PcpDescription(""),)
    assert [m.description for m in rig.service.gateway.table] == [""]


async def test_unknown_options(rig: Rig) -> None:
    mandatory = await rig.ask(map_request(8080, 8080, 600, PcpUnknownOption(99, b"")))
    assert mandatory.result is PcpResult.UNSUPP_OPTION
    optional = await rig.ask(map_request(8080, 8080, 600, PcpUnknownOption(200, b"abcd")))
    assert optional.result is PcpResult.SUCCESS and optional.options == ()


async def test_third_party(rig: Rig) -> None:
    printer = PcpThirdParty(pcp.mapped(IPv4Address("192.168.1.50")))
    refused = await rig.ask(map_request(9100, 9100, 600, printer))
    assert refused.result is PcpResult.UNSUPP_OPTION  # prohibited by default
    self_named = await rig.ask(map_request(9100, 9100, 600, PcpThirdParty(pcp.mapped(CLIENT))))
    assert self_named.result is PcpResult.MALFORMED_REQUEST
    admin = IPv4Address("192.168.1.2")
    granted = await rig.ask(map_request(9100, 9100, 600, printer, client=admin), (str(admin), 5))
    assert granted.result is PcpResult.SUCCESS and granted.options == (printer,)
    mapping = next(iter(rig.service.gateway.table))
    assert mapping.internal_address == IPv4Address("192.168.1.50")
    assert mapping.owner.client == admin
    v6 = PcpThirdParty(IPv6Address("2001:db8::5"))
    assert (
        await rig.ask(map_request(9101, 9101, 600, v6, client=admin), (str(admin), 5))
    ).result is PcpResult.UNSUPP_OPTION


async def test_filters_add_up_clear_and_are_bounded(rig: Rig) -> None:
    one = filter_of("203.0.113.5")
    ok = await rig.ask(map_request(8080, 8080, 600, one))
    assert ok.result is PcpResult.SUCCESS and ok.options == (one,)
    two = filter_of("198.51.100.0", 24, 443)
    await rig.ask(map_request(8080, 8080, 600, two))
    mapping = next(iter(rig.service.gateway.table))
    assert mapping.filters == (
        RemoteFilter(IPv4Network("203.0.113.5/32")),
        RemoteFilter(IPv4Network("198.51.100.0/24"), 443),
    )
    (entry,) = await rig.backend.entries()
    assert entry.filters == tuple(sorted(mapping.filters))
    three = filter_of("192.0.2.9")
    too_many = await rig.ask(map_request(8080, 8080, 600, three))
    assert too_many.result is PcpResult.EXCESSIVE_REMOTE_PEERS
    assert next(iter(rig.service.gateway.table)).filters == mapping.filters  # unchanged
    clear = PcpFilter(0, 0, pcp.mapped(IPv4Address(0)))
    await rig.ask(map_request(8080, 8080, 600, clear))
    assert next(iter(rig.service.gateway.table)).filters == ()
    with_delete = await rig.ask(map_request(8080, 0, 0, one))
    assert with_delete.result is PcpResult.MALFORMED_OPTION
    bad_prefix = await rig.ask(map_request(8080, 8080, 600, PcpFilter(40, 0, pcp.mapped(CLIENT))))
    assert bad_prefix.result is PcpResult.MALFORMED_OPTION


async def test_peer(rig: Rig) -> None:
    created = await rig.ask(peer_request(external=30000))
    assert created.result is PcpResult.SUCCESS
    assert isinstance(created.data, PcpPeerData) and created.data.external_port == 30000
    mapping = next(iter(rig.service.gateway.table))
    assert mapping.is_peer and mapping.key.remote_host == IPv4Address("203.0.113.50")
    (entry,) = await rig.backend.entries()
    assert entry.peer_port == 3478
    shorter = await rig.ask(peer_request(lifetime=200))
    assert shorter.result is PcpResult.SUCCESS and shorter.lifetime >= 590  # never shortened
    zero = await rig.ask(peer_request(lifetime=0))
    assert zero.result is PcpResult.SUCCESS and rig.table_size == 1  # PEER cannot delete
    taken = await rig.ask(
        replace(peer_request(external=30000), client_address=pcp.mapped(OTHER)),
        (str(OTHER), 9),
    )
    assert taken.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
    for bad in ("127.0.0.1", "224.0.0.5", "0.0.0.0", "240.0.0.1"):
        assert (await rig.ask(peer_request(remote=bad))).result is PcpResult.MALFORMED_REQUEST
    assert (await rig.ask(peer_request(remote_port=0))).result is PcpResult.MALFORMED_REQUEST
    prefer = await rig.ask(peer_request("203.0.113.60", 3478, 30001, 600, PcpPreferFailure()))
    assert prefer.result is PcpResult.MALFORMED_REQUEST
    assert rig.table_size == 1


async def test_peer_and_targets_must_stay_off_the_lan_and_the_gateway(rig: Rig) -> None:
    gateway = rig.service.gateway
    gateway.internal_networks = (IPv4Network("192.168.1.0/24"),)
    gateway.own_addresses = frozenset({IPv4Address("192.168.1.1"), EXTERNAL})
    for lan_or_gateway in (str(OTHER), "192.168.1.1", str(EXTERNAL)):
        answer = await rig.ask(peer_request(remote=lan_or_gateway))
        assert answer.result is PcpResult.MALFORMED_REQUEST, lan_or_gateway
    admin = IPv4Address("192.168.1.2")
    for target in ("127.0.0.1", "192.168.1.255", str(EXTERNAL), "203.0.113.9"):
        option = PcpThirdParty(pcp.mapped(IPv4Address(target)))
        request = map_request(9000, 0, 600, option, client=admin)
        answer = await rig.ask(request, (str(admin), 9))
        assert answer.result is PcpResult.MALFORMED_OPTION, target
    # Without THIRD_PARTY the target is the source itself: not a malformed option.
    stranger = IPv4Address("10.9.9.9")
    answer = await rig.ask(map_request(client=stranger), (str(stranger), 9))
    assert answer.result is PcpResult.NOT_AUTHORIZED
    assert rig.table_size == 0 and not await rig.backend.entries()


async def test_announce(rig: Rig) -> None:
    response = await rig.ask(PcpRequest(PcpOpcode.ANNOUNCE, 0, pcp.mapped(CLIENT)))
    assert (response.result, response.lifetime) == (PcpResult.SUCCESS, 0)
    assert response.epoch == rig.service.epoch()
    announcement = pcp.decode_response(rig.handler.announcement())
    assert announcement.opcode is PcpOpcode.ANNOUNCE and announcement.result == 0


async def test_mapping_updates_reach_the_last_source(rig: Rig) -> None:
    await rig.ask(map_request(8080, 8080, 600, filter_of("203.0.113.5")), (str(CLIENT), 4242))
    rig.external.current = IPv4Address("198.51.100.99")
    ((wire, destination),) = rig.handler.mapping_updates()
    assert destination == (str(CLIENT), 4242)
    update = pcp.decode_response(wire)
    assert isinstance(update.data, PcpMapData)
    assert update.data.external_address == pcp.mapped(IPv4Address("198.51.100.99"))
    assert update.data.nonce == NONCE and update.options == (filter_of("203.0.113.5"),)
    await rig.ask(map_request(8080, 0, 0))
    assert rig.handler.mapping_updates() == []
    assert rig.handler.endpoints == {}
