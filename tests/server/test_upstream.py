"""Double NAT without a network: the mirror (igd/server/upstream.py) between the real NAT-PMP
handler, service and commit pipeline and a scripted upstream in place of igd.client's
PortMapper; tests/lab/test_upstream.py runs the same through two real gateways."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from igd.client import EventKind, MappingEvent, NotAuthorized
from igd.events import ExternalAddressChanged, MappingRenewed
from igd.gateway import Gateway
from igd.model import MapRequest, Mechanism, Protocol
from igd.policy import Policy
from igd.proto import natpmp
from igd.proto.natpmp import (
    NatPmpExternalAddressRequest,
    NatPmpExternalAddressResponse,
    NatPmpMapRequest,
    NatPmpMapResponse,
    NatPmpResult,
)
from igd.server.backends.memory import MemoryBackend
from igd.server.config import Config, ConfigError, UpstreamSettings
from igd.server.interfaces import ExternalAddress
from igd.server.natpmp import NatPmpHandler
from igd.server.service import Service
from igd.server.store import LeaseStore
from igd.server.upstream import PENDING_LIFETIME, Upstream

CLIENT = IPv4Address("192.168.77.10")
LOCAL = IPv4Address("192.168.1.2")
PUBLIC = IPv4Address("203.0.113.1")
POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 2
[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.77.0/24"]
external_ports = "1024-65535"
"""


class Held:
    """An upstream mapping as igd.client's Mapping shows it."""

    def __init__(self, protocol: Protocol, port: int, public_port: int, lifetime: int) -> None:
        self.protocol, self.internal_port = protocol, port
        self.external_address, self.external_port = PUBLIC, public_port
        self.lifetime, self.mechanism = lifetime, "pcp"
        self.expires = asyncio.get_running_loop().time() + lifetime
        self.released = False
        self.callbacks: list[Any] = []

    def subscribe(self, callback: Any) -> Any:
        self.callbacks.append(callback)
        return lambda: None

    async def release(self) -> None:
        self.released = True

    async def detach(self) -> None:
        pass


class Upstream_:
    """The upstream gateway, scripted: grants (port + shift), refuses or stays silent."""

    def __init__(self) -> None:
        self.mode = "grant"
        self.shift = 0
        self.lifetime = 600
        self.held: list[Held] = []
        self.asked: list[tuple[int, Protocol, int | None]] = []

    async def probe(self, **kw: Any) -> Any:
        choice = SimpleNamespace(verdict="double-nat", external_address=PUBLIC, mechanism="pcp")
        return SimpleNamespace(choice=choice)

    async def map(self, port: int, protocol: Protocol, **kw: Any) -> Held:
        self.asked.append((port, protocol, kw.get("external_port")))
        if self.mode == "refuse":
            raise NotAuthorized("denied by the upstream's policy", code=2)
        if self.mode == "silent":
            await asyncio.Event().wait()
        held = Held(protocol, port, port + self.shift, self.lifetime)
        self.held.append(held)
        return held

    async def close(self) -> None:
        pass


class Rig:
    def __init__(self, tmp: Path, local: IPv4Address = LOCAL, mode: str = "auto") -> None:
        self.service = Service(
            Gateway(Policy.parse(POLICY)), MemoryBackend(), LeaseStore(tmp / "l.sqlite")
        )
        self.external = ExternalAddress("wan0", override=local, allow_private=True)
        self.external.refresh()
        self.up = Upstream_()
        settings = UpstreamSettings(mode=mode, address=IPv4Address("192.168.1.1"), reply_wait=0.3)
        self.mirror = Upstream(settings, self.external, mapper_factory=lambda: self.up)  # type: ignore[arg-type,return-value]
        self.service.upstream = self.mirror
        self.handler = NatPmpHandler(self.service, self.external)

    async def map(self, internal: int, external: int, lifetime: int) -> NatPmpMapResponse:
        data = natpmp.encode_request(NatPmpMapRequest(Protocol.TCP, internal, external, lifetime))
        reply = await self.handler.handle(data, CLIENT)
        assert reply is not None
        answer = natpmp.decode_response(reply)
        assert isinstance(answer, NatPmpMapResponse)
        return answer

    async def address(self) -> IPv4Address:
        reply = await self.handler.handle(
            natpmp.encode_request(NatPmpExternalAddressRequest()), CLIENT
        )
        assert reply is not None
        answer = natpmp.decode_response(reply)
        assert isinstance(answer, NatPmpExternalAddressResponse)
        return answer.address


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    built = Rig(tmp_path)
    task = asyncio.create_task(built.mirror.run(built.service))
    await asyncio.sleep(0.01)
    yield built
    task.cancel()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_answer_names_the_upstream_port_and_the_lesser_lease(rig: Rig) -> None:
    rig.up.shift, rig.up.lifetime = 7, 600
    answer = await rig.map(8080, 18080, 3600)
    assert (answer.result, answer.external_port) == (NatPmpResult.SUCCESS, 18087)
    assert 590 <= answer.lifetime <= 600  # the upstream's 600 s, not the local 3600 s
    # The upstream forwards to our external port, whatever public port it picked.
    assert rig.up.asked == [(18080, Protocol.TCP, 18080)]
    assert await rig.address() == PUBLIC
    status = rig.mirror.status()
    assert (status["mirrored"], status["failing"], status["public_address"]) == (1, 0, str(PUBLIC))
    assert status["local_external_address"] == str(LOCAL)


async def test_renewal_reuses_the_upstream_mapping_and_delete_releases_it(rig: Rig) -> None:
    await rig.map(8080, 18080, 3600)
    await rig.map(8080, 18080, 3600)
    assert len(rig.up.asked) == 1
    deleted = await rig.map(8080, 0, 0)
    assert deleted.result is NatPmpResult.SUCCESS
    await settle()
    assert rig.up.held[0].released
    assert rig.mirror.status()["mirrored"] == 0


async def test_upstream_moving_the_mapping_starts_a_new_epoch(rig: Rig) -> None:
    await rig.map(8080, 18080, 3600)
    events = rig.service.subscribe("test", kinds=(ExternalAddressChanged,))
    rig.service.epoch_start -= 100  # an epoch clients have seen running for a while
    moved = IPv4Address("203.0.113.9")
    for callback in rig.up.held[0].callbacks:
        callback(MappingEvent(EventKind.CHANGED, Mechanism.PCP, moved, 18081, 600))
    assert rig.service.epoch() < 5
    assert events.take()[0] == [ExternalAddressChanged(PUBLIC, moved)]
    assert await rig.address() == moved


async def test_upstream_refusal_refuses_the_client_and_leaves_nothing(rig: Rig) -> None:
    rig.up.mode = "refuse"
    answer = await rig.map(8080, 18080, 3600)
    assert (answer.result, answer.external_port, answer.lifetime) == (
        NatPmpResult.NOT_AUTHORIZED, 0, 0,
    )  # fmt: skip
    assert rig.service.count() == 0
    status = rig.mirror.status()
    assert "denied" in status["last_error"]
    assert status["reachable"]  # it answered: a refusal is no outage


async def test_silent_upstream_answers_in_bounded_time_with_a_short_lease(rig: Rig) -> None:
    rig.up.mode = "silent"
    async with asyncio.timeout(2):
        answer = await rig.map(8080, 18080, 3600)
    assert answer.result is NatPmpResult.SUCCESS
    assert (answer.external_port, answer.lifetime) == (18080, PENDING_LIFETIME)
    assert rig.mirror.status()["failing"] == 1


async def test_auto_leaves_a_public_external_address_alone(tmp_path: Path) -> None:
    built = Rig(tmp_path, local=IPv4Address("1.2.3.4"))  # public; no traffic is sent
    task = asyncio.create_task(built.mirror.run(built.service))
    try:
        await asyncio.sleep(0.01)
        answer = await built.map(8080, 18080, 3600)
        assert (answer.external_port, answer.lifetime) == (18080, 3600)
        assert built.up.asked == []
        assert built.mirror.status()["verdict"] == "public"
    finally:
        task.cancel()


def test_config_reads_the_upstream_section(tmp_path: Path) -> None:
    base = '[network]\nexternal_interface = "wan0"\ninternal_interfaces = ["br-lan"]\n'
    config = Config.parse(
        base + '[upstream]\nmode = "natpmp"\ngateway = "192.168.1.1"\nreply_wait = 1.5\n',
        tmp_path / "c.toml",
    )
    assert config.upstream == UpstreamSettings(
        "natpmp", IPv4Address("192.168.1.1"), 1.5, 3600, 30.0
    )
    assert Config.parse(base, tmp_path / "c.toml").upstream.mode == "off"
    with pytest.raises(ConfigError, match="upstream"):
        Config.parse(base + '[upstream]\nmode = "stun"\n', tmp_path / "c.toml")


async def test_a_renewal_onto_another_port_moves_the_upstream_mapping(rig: Rig) -> None:
    await rig.map(8080, 18080, 3600)
    before = next(iter(rig.service.mappings()))
    moved = replace(before, key=replace(before.key, external_port=18090))
    request = MapRequest(Mechanism.PCP, CLIENT, Protocol.TCP, CLIENT, 8080, 18090, 3600)
    rig.mirror.follow(MappingRenewed(moved, before, request, "lan"))
    await settle()
    assert rig.up.held[0].released
    assert [port for port, _, _ in rig.up.asked] == [18080, 18090]
