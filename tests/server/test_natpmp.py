"""NAT-PMP answers from the gateway: every result code, deletes, epoch, no state on errors.

These run the real handler, service, commit pipeline and lease store against the memory
backend; tests/lab covers the same through the kernel with Debian's natpmpc.
"""

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from igd.decision import Reason
from igd.gateway import Gateway
from igd.model import Protocol
from igd.policy import Policy
from igd.proto import natpmp
from igd.proto.natpmp import (
    NatPmpExternalAddressRequest,
    NatPmpMapRequest,
    NatPmpMapResponse,
    NatPmpResult,
)
from igd.server.backends import BackendError, KernelEntry
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import ExternalAddress
from igd.server.natpmp import RESULT_FOR, NatPmpHandler
from igd.server.service import Service
from igd.server.store import Clock, LeaseStore

CLIENT = IPv4Address("192.168.1.10")
OTHER = IPv4Address("192.168.1.11")
POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 120
max_mappings_per_client = 2
[[rules]]
name = "no telnet"
action = "deny"
internal_ports = "23"
[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]
external_ports = "1024-65535"
"""


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.backend = MemoryBackend()
        self.store = LeaseStore(tmp / "leases.sqlite")
        self.service = Service(Gateway(Policy.parse(POLICY)), self.backend, self.store)
        self.external = ExternalAddress(
            "wan0", override=IPv4Address("198.51.100.7"), allow_private=True
        )
        self.external.refresh()
        self.handler = NatPmpHandler(self.service, self.external)

    async def map(
        self,
        protocol: Protocol,
        internal: int,
        external: int,
        lifetime: int,
        client: IPv4Address = CLIENT,
    ) -> NatPmpMapResponse:
        wire = natpmp.encode_request(NatPmpMapRequest(protocol, internal, external, lifetime))
        reply = await self.handler.handle(wire, client)
        assert reply is not None
        response = natpmp.decode_response(reply)
        assert isinstance(response, NatPmpMapResponse)
        return response


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    committer = asyncio.create_task(rig.service.run_committer())
    yield rig
    committer.cancel()


def test_every_reason_has_a_result_code() -> None:
    assert set(RESULT_FOR) == set(Reason)


async def test_external_address(rig: Rig) -> None:
    reply = await rig.handler.handle(natpmp.encode_request(NatPmpExternalAddressRequest()), CLIENT)
    response = natpmp.decode_response(reply or b"")
    assert response == natpmp.NatPmpExternalAddressResponse(
        NatPmpResult.SUCCESS, rig.service.epoch(), IPv4Address("198.51.100.7")
    )


async def test_map_is_in_kernel_and_store_before_the_reply(rig: Rig) -> None:
    response = await rig.map(Protocol.TCP, 8080, 8080, 7200)
    assert (response.result, response.external_port, response.lifetime) == (
        NatPmpResult.SUCCESS,
        8080,
        3600,
    )  # lease clamped to the policy's max_lease
    entry = KernelEntry(Protocol.TCP, 8080, None, CLIENT, 8080)
    assert await rig.backend.entries() == {entry}
    assert len(rig.store.load(Clock(), now=rig.service.now())) == 1


async def test_retransmission_is_idempotent(rig: Rig) -> None:
    first = await rig.map(Protocol.UDP, 5000, 0, 600)
    second = await rig.map(Protocol.UDP, 5000, 0, 600)
    assert second.external_port == first.external_port
    assert len(rig.service.gateway.table) == 1


async def test_refusals_carry_the_right_codes_and_change_nothing(rig: Rig) -> None:
    denied = await rig.map(Protocol.TCP, 23, 23, 600)
    assert (denied.result, denied.internal_port, denied.external_port, denied.lifetime) == (
        NatPmpResult.NOT_AUTHORIZED,
        23,
        0,
        0,
    )
    outsider = await rig.map(Protocol.TCP, 8080, 8080, 600, client=IPv4Address("10.9.9.9"))
    assert outsider.result == NatPmpResult.NOT_AUTHORIZED
    await rig.map(Protocol.TCP, 2001, 2001, 600)
    await rig.map(Protocol.TCP, 2002, 2002, 600)
    over = await rig.map(Protocol.TCP, 2003, 2003, 600)
    assert over.result == NatPmpResult.OUT_OF_RESOURCES
    assert len(await rig.backend.entries()) == 2


async def test_no_external_address_is_network_failure(rig: Rig) -> None:
    rig.external.current = None
    response = await rig.map(Protocol.TCP, 8080, 8080, 600)
    assert response.result == NatPmpResult.NETWORK_FAILURE
    reply = await rig.handler.handle(bytes(2), CLIENT)
    assert reply is not None and reply[2:4] == b"\x00\x03" and reply[8:] == bytes(4)


async def test_backend_failure_rolls_back(rig: Rig) -> None:
    rig.backend.fail_next = BackendError("kernel said no")
    response = await rig.map(Protocol.TCP, 8080, 8080, 600)
    assert response.result == NatPmpResult.OUT_OF_RESOURCES
    assert len(rig.service.gateway.table) == 0
    assert (await rig.map(Protocol.TCP, 8080, 8080, 600)).result == NatPmpResult.SUCCESS


async def test_delete_one_and_delete_all(rig: Rig) -> None:
    await rig.map(Protocol.TCP, 2001, 2001, 600)
    await rig.map(Protocol.UDP, 2002, 2002, 600)
    await rig.map(Protocol.TCP, 2003, 2003, 600, client=OTHER)
    gone = await rig.map(Protocol.TCP, 2001, 0, 0)
    assert (gone.result, gone.internal_port, gone.external_port, gone.lifetime) == (
        NatPmpResult.SUCCESS,
        2001,
        0,
        0,
    )
    again = await rig.map(Protocol.TCP, 2001, 0, 0)  # deleting nothing succeeds too
    assert again.result == NatPmpResult.SUCCESS
    everything = await rig.map(Protocol.UDP, 0, 0, 0)
    assert everything.result == NatPmpResult.SUCCESS
    left = {(m.protocol, m.owner.client) for m in rig.service.gateway.table}
    assert left == {(Protocol.TCP, OTHER)}


async def test_malformed_packets(rig: Rig) -> None:
    assert await rig.handler.handle(b"\x00\x02\x00", CLIENT) is None  # truncated map
    assert await rig.handler.handle(b"\x00\x81" + bytes(14), CLIENT) is None  # a response
    unsupported = await rig.handler.handle(b"\x00\x07abcdefghij", CLIENT)
    assert unsupported is not None and unsupported[1] == 0x87 and unsupported[3] == 5
    version = await rig.handler.handle(b"\x01\x00", CLIENT)
    assert version is not None and version[:4] == b"\x00\x80\x00\x01"
    assert len(rig.service.gateway.table) == 0
