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
from igd.gateway import Gateway, Refused
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Owner, Protocol
from igd.policy import Policy
from igd.proto import natpmp, pcp
from igd.proto.natpmp import (
    NatPmpExternalAddressRequest,
    NatPmpExternalAddressResponse,
    NatPmpMapRequest,
    NatPmpMapResponse,
    NatPmpResult,
)
from igd.proto.pcp import (
    PcpMapData,
    PcpOpcode,
    PcpPeerData,
    PcpPreferFailure,
    PcpRequest,
    PcpResponse,
    PcpResult,
)
from igd.server.admin.metrics import Metrics
from igd.server.backends.memory import MemoryBackend
from igd.server.config import Config, ConfigError, UpstreamSettings
from igd.server.interfaces import ExternalAddress
from igd.server.natpmp import NatPmpHandler
from igd.server.pcp import PcpHandler
from igd.server.service import Service
from igd.server.store import LeaseStore, StateDirectoryError
from igd.server.upstream import NONCE_KEY_FILE, PENDING_LIFETIME, Upstream, nonce_key

CLIENT = IPv4Address("192.168.77.10")
LOCAL = IPv4Address("192.168.1.2")
PUBLIC = IPv4Address("203.0.113.1")
REMOTE = IPv4Address("198.51.100.7")
NONCE = bytes(range(12))
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
        self.nonces: list[bytes | None] = []
        self.external_address = PUBLIC

    async def probe(self, **kw: Any) -> Any:
        choice = SimpleNamespace(
            verdict="double-nat", external_address=self.external_address, mechanism="pcp"
        )
        return SimpleNamespace(choice=choice)

    async def map(self, port: int, protocol: Protocol, **kw: Any) -> Held:
        self.asked.append((port, protocol, kw.get("external_port")))
        self.nonces.append(kw.get("nonce"))
        if self.mode == "refuse":
            raise NotAuthorized("denied by the upstream's policy", code=2)
        if self.mode == "silent":
            await asyncio.Event().wait()
        held = Held(protocol, port, port + self.shift, self.lifetime)
        self.held.append(held)
        return held

    async def local_address(self) -> IPv4Address:
        return LOCAL

    async def close(self) -> None:
        pass


class Rig:
    def __init__(
        self,
        tmp: Path,
        local: IPv4Address = LOCAL,
        mode: str = "auto",
        policy: str = POLICY,
        **settings: Any,
    ) -> None:
        self.service = Service(
            Gateway(Policy.parse(policy)), MemoryBackend(), LeaseStore(tmp / "l.sqlite")
        )
        self.external = ExternalAddress("wan0", override=local, allow_private=True)
        self.external.refresh()
        self.up = Upstream_()
        settings.setdefault("address", IPv4Address("192.168.1.1"))
        config = UpstreamSettings(mode=mode, reply_wait=0.3, **settings)
        self.mirror = Upstream(
            config,
            self.external,
            mapper_factory=lambda: self.up,
            state_directory=tmp,  # type: ignore[arg-type,return-value]
        )
        self.service.upstream = self.mirror
        self.handler = NatPmpHandler(self.service, self.external)
        self.pcp = PcpHandler(self.service, self.external)

    async def pcp_map(
        self, external: int, *, prefer_failure: bool = False, nonce: bytes = NONCE
    ) -> PcpResponse:
        data = PcpMapData(nonce, 6, 8080, external, pcp.mapped(IPv4Address(0)))
        options = (PcpPreferFailure(),) if prefer_failure else ()
        request = PcpRequest(PcpOpcode.MAP, 3600, pcp.mapped(CLIENT), data, options)
        reply = await self.pcp.handle(pcp.encode_request(request), (str(CLIENT), 5351))
        assert reply is not None
        return pcp.decode_response(reply)

    async def pcp_peer(self, external: int, lifetime: int = 3600) -> PcpResponse:
        data = PcpPeerData(
            NONCE, 6, 8080, external, pcp.mapped(IPv4Address(0)), 443, pcp.mapped(REMOTE)
        )
        request = PcpRequest(PcpOpcode.PEER, lifetime, pcp.mapped(CLIENT), data)
        reply = await self.pcp.handle(pcp.encode_request(request), (str(CLIENT), 5351))
        assert reply is not None
        return pcp.decode_response(reply)

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
        "natpmp", IPv4Address("192.168.1.1"), 1.5, 3600, 30.0, 10000
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


async def start(rig: Rig) -> asyncio.Task[None]:
    task = asyncio.create_task(rig.mirror.run(rig.service))
    await asyncio.sleep(0.01)
    return task


async def test_a_restarted_gateway_asks_with_the_same_nonces(tmp_path: Path) -> None:
    # After kill -9 the upstream still holds the old run's PCP mappings; the new run must
    # renew them, so it asks with the nonces the old run used (kept in the state directory).
    runs = []
    for _ in range(2):
        rig = Rig(tmp_path)
        task = await start(rig)
        await rig.map(8080, 18080, 3600)
        await rig.map(8081, 18081, 3600)
        task.cancel()
        runs.append(rig.up.nonces)
        rig.service.store.close()
    assert runs[0] == runs[1]
    first, second = runs[0]
    assert first is not None and len(first) == 12 and first != second
    assert (tmp_path / NONCE_KEY_FILE).stat().st_mode & 0o777 == 0o600
    other = tmp_path / "other"
    other.mkdir()
    rig = Rig(other)  # another gateway: other nonces, nobody can guess them
    task = await start(rig)
    await rig.map(8080, 18080, 3600)
    task.cancel()
    assert rig.up.nonces[0] != first


async def test_pcp_prefer_failure_renewal_of_the_upstream_port_succeeds(rig: Rig) -> None:
    rig.up.shift = 7  # the upstream gives 18087 for our 18080
    first = await rig.pcp_map(18080)
    assert first.result is PcpResult.SUCCESS
    assert isinstance(first.data, PcpMapData) and first.data.external_port == 18087
    # The client renews what it was told, PREFER_FAILURE on 18087 (RFC 6887 §13.2).
    for _ in range(2):
        again = await rig.pcp_map(18087, prefer_failure=True)
        assert again.result is PcpResult.SUCCESS
        assert isinstance(again.data, PcpMapData) and again.data.external_port == 18087
    assert [m.external_port for m in rig.service.mappings()] == [18080]
    assert len(rig.up.asked) == 1  # one upstream mapping, renewed on its own schedule


async def test_pcp_prefer_failure_refuses_a_new_mapping_the_upstream_moves(rig: Rig) -> None:
    rig.up.shift = 7
    refused = await rig.pcp_map(18080, prefer_failure=True)
    # §13.2: that port or nothing; the upstream's 18087 is not what was asked.
    assert refused.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
    await settle()
    assert rig.service.count() == 0 and rig.up.held[0].released
    rig.up.shift = 0
    granted = await rig.pcp_map(18080, prefer_failure=True)
    assert granted.result is PcpResult.SUCCESS


async def test_pcp_mapping_update_carries_the_upstream_port(rig: Rig) -> None:
    rig.up.shift = 7
    await rig.pcp_map(18080)
    moved = IPv4Address("203.0.113.9")
    held = rig.up.held[0]
    held.external_address, held.external_port = moved, 18099
    for callback in held.callbacks:
        callback(MappingEvent(EventKind.CHANGED, Mechanism.PCP, moved, 18099, 600))
    [(update, destination)] = rig.pcp.mapping_updates()
    assert destination == (str(CLIENT), 5351)
    answer = pcp.decode_response(update)
    assert isinstance(answer.data, PcpMapData)
    assert (pcp.unmapped(answer.data.external_address), answer.data.external_port) == (
        moved, 18099,
    )  # fmt: skip
    assert 590 <= answer.lifetime <= 600  # the lesser lease, as the MAP answer said


async def test_upstream_reporting_our_own_address_is_a_loop(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.up.external_address = LOCAL  # what a gateway mirroring onto us would say
    task = await start(rig)
    try:
        answer = await rig.map(8080, 18080, 3600)
        assert (answer.result, answer.external_port) == (NatPmpResult.SUCCESS, 18080)
        assert answer.lifetime == 3600 and await rig.address() == LOCAL  # local, unmirrored
        assert rig.up.asked == []
        status = rig.mirror.status()
        assert (status["verdict"], status["active"]) == ("loop", False)
        assert "loop" in status["last_error"] and str(LOCAL) in status["last_error"]
    finally:
        task.cancel()


async def test_upstream_gateway_that_is_ourselves_is_a_loop(tmp_path: Path) -> None:
    rig = Rig(tmp_path, address=LOCAL)
    task = await start(rig)
    try:
        await rig.map(8080, 18080, 3600)
        assert rig.up.asked == [] and rig.mirror.status()["verdict"] == "loop"
    finally:
        task.cancel()


async def test_our_own_mirror_request_coming_back_stops_mirroring(rig: Rig) -> None:
    rig.up.mode = "silent"  # still asking when the request comes back to us
    await rig.map(8080, 18080, 3600)
    echo = MapRequest(Mechanism.PCP, LOCAL, Protocol.TCP, LOCAL, 18080, 18080, 3600)
    refused = await rig.service.map(echo)
    assert isinstance(refused, Refused) and "our own address" in refused.deny.detail
    status = rig.mirror.status()
    assert (status["verdict"], status["active"], status["mirrored"]) == ("loop", False, 0)
    answer = await rig.map(8081, 18081, 3600)  # served locally from now on
    assert (answer.external_port, answer.lifetime) == (18081, 3600)
    assert len(rig.up.asked) == 1


async def test_mirrors_past_max_mappings_stay_local(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(tmp_path, max_mappings=2)
    task = await start(rig)
    try:
        rig.up.shift = 1
        answers = [await rig.map(8080 + i, 18080 + i * 10, 3600) for i in range(3)]
        assert [a.external_port for a in answers] == [18081, 18091, 18100]
        assert answers[2].lifetime == 3600  # not mirrored: the local endpoint
        status = rig.mirror.status()
        assert status["mirrored"] == 2 and "more than 2" in status["last_error"]
        assert status["reachable"] and status["full"]
        await rig.map(8082, 18100, 3600)  # its renewal: still local, and not logged again
        assert sum("more than 2" in r.getMessage() for r in caplog.records) == 1
        await rig.map(8080, 0, 0)  # room again: the next grant is mirrored
        await settle()
        answer = await rig.map(8083, 18200, 3600)
        assert answer.external_port == 18201 and not rig.mirror.status()["full"]
    finally:
        task.cancel()


def test_the_nonce_secret_is_kept_private_and_a_damaged_one_replaced(tmp_path: Path) -> None:
    key = nonce_key(tmp_path)
    path = tmp_path / NONCE_KEY_FILE
    path.chmod(0o644)  # loosened by hand: tightened again, the same secret kept
    assert nonce_key(tmp_path) == key and path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(key[:5])  # cut short by a crash while it was written
    fresh = nonce_key(tmp_path)
    assert len(fresh) == 32 and fresh != key and nonce_key(tmp_path) == fresh
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateDirectoryError):
        nonce_key(tmp_path)


async def test_a_mapping_on_a_further_external_address_is_not_mirrored(rig: Rig) -> None:
    # network.external_addresses are the router's own public addresses: nothing to mirror.
    further = MappingKey(Protocol.TCP, 18080, external_address=IPv4Address("203.0.113.9"))
    owner = Owner(Mechanism.PCP, CLIENT, NONCE)
    mapping = Mapping(further, CLIENT, 8080, owner, created=0.0, expires=3600.0)
    assert await rig.mirror.public(mapping, 3600) is None
    assert rig.mirror.told(mapping, 3600) is None and rig.mirror.endpoint(mapping) is None
    await rig.map(8080, 18080, 3600)  # the same port on the default address is mirrored
    assert rig.up.asked == [(18080, Protocol.TCP, 18080)]


async def test_pcp_peer_answer_names_the_upstream_endpoint(rig: Rig) -> None:
    rig.up.shift, rig.up.lifetime = 7, 600
    answer = await rig.pcp_peer(0)
    assert answer.result is PcpResult.SUCCESS
    assert isinstance(answer.data, PcpPeerData)
    # The remote peer sees the upstream's endpoint (RFC 7648): that is what the client learns.
    assert pcp.unmapped(answer.data.external_address) == PUBLIC
    local = [m.external_port for m in rig.service.mappings()]
    assert rig.up.asked == [(local[0], Protocol.TCP, local[0])]
    assert answer.data.external_port == local[0] + 7
    assert 590 <= answer.lifetime <= 600
    # The renewal with the port it was told keeps the one mapping, upstream and here.
    again = await rig.pcp_peer(answer.data.external_port)
    assert again.result is PcpResult.SUCCESS
    assert isinstance(again.data, PcpPeerData)
    assert again.data.external_port == answer.data.external_port
    assert len(rig.up.asked) == 1 and rig.service.count() == 1


async def test_pcp_peer_refused_upstream_is_refused_and_leaves_nothing(rig: Rig) -> None:
    rig.up.mode = "refuse"
    answer = await rig.pcp_peer(0)
    assert answer.result is PcpResult.NOT_AUTHORIZED
    assert rig.service.count() == 0


def gauges(rig: Rig) -> dict[str, float]:
    text = Metrics(rig.service).scrape().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("igd_upstream_"):
            name, value = line.split()
            found[name] = float(value)
    return found


async def test_metrics_show_mirrored_failing_and_up(rig: Rig) -> None:
    await rig.map(8080, 18080, 3600)
    assert gauges(rig) == {
        "igd_upstream_mirrored": 1,
        "igd_upstream_failing": 0,
        "igd_upstream_up": 1,
    }
    rig.up.mode = "silent"
    await rig.map(8081, 18081, 3600)
    assert gauges(rig)["igd_upstream_failing"] == 1
    rig.mirror.stop_loop("a test loop")
    assert gauges(rig) == {
        "igd_upstream_mirrored": 0,
        "igd_upstream_failing": 0,
        "igd_upstream_up": 0,
    }


async def test_metrics_without_an_upstream_have_no_upstream_gauges(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.service.upstream = None
    assert gauges(rig) == {}


def forward(name: str, port: int) -> str:
    return (f'\n[[forwards]]\nname = "{name}"\nprotocols = ["tcp"]\nexternal_ports = "{port}"\n'
            'internal_address = "192.168.77.20"\n')  # fmt: skip


async def test_static_forwards_are_mirrored_at_start_and_after_a_reload(tmp_path: Path) -> None:
    rig = Rig(tmp_path, policy=POLICY + forward("web", 8443))
    rig.service.restore([], recheck=None, now=rig.service.now())  # start-up installs forwards
    task = asyncio.create_task(rig.mirror.run(rig.service))
    await asyncio.sleep(0.05)
    assert rig.up.asked == [(8443, Protocol.TCP, 8443)]
    await rig.service.reload(Policy.parse(POLICY + forward("web", 8443) + forward("mail", 8993)))
    await asyncio.sleep(0.05)
    assert rig.up.asked == [(8443, Protocol.TCP, 8443), (8993, Protocol.TCP, 8993)]
    await rig.service.reload(Policy.parse(POLICY + forward("mail", 8993)))
    await asyncio.sleep(0.05)
    assert [h.internal_port for h in rig.up.held if h.released] == [8443]
    task.cancel()
