"""The admin listener on loopback with a MemoryBackend: /metrics after real requests through
the service, the console's JSON API, and the attacks the UPnP server also gets (foreign
Host, oversized requests, missing or wrong CSRF token, no session, wrong password, path
traversal)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from igd.events import DatagramDropped, DropReason, ExternalAddressChanged
from igd.gateway import Gateway
from igd.model import MappingKey, MapRequest, Mechanism, Protocol
from igd.pinhole import Pinhole, PinholeKey, PinholeOwner, PinholeRequest, PinholeRules
from igd.policy import Policy
from igd.server.admin.auth import LoginLimiter, PasswordHash, Sessions, hash_password
from igd.server.admin.cli import run_hash_password
from igd.server.admin.server import (
    CSRF_HEADER,
    AdminBindError,
    AdminListenError,
    AdminServer,
    listener_device,
)
from igd.server.backends.memory import MemoryBackend
from igd.server.backends.pinholes import MemoryPinholeBackend
from igd.server.config import Config, ConfigError
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import PinholeService
from igd.server.policy_cli import main as policy_main
from igd.server.service import Service
from igd.server.store import LeaseStore

POLICIES = Path(__file__).parent.parent.parent / "policies"
HOME = POLICIES / "home.toml"
LAN = IPv4Address("192.168.1.20")
OTHER = IPv4Address("192.168.1.21")
PASSWORD = "correct horse battery"


@dataclass
class Rig:
    service: Service
    backend: MemoryBackend
    admin: AdminServer
    http: aiohttp.ClientSession
    tasks: list[asyncio.Task[None]]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}"

    async def get(self, path: str, **kwargs: object) -> aiohttp.ClientResponse:
        return await self.http.get(self.base + path, allow_redirects=False, **kwargs)  # type: ignore[arg-type]

    async def post(self, path: str, **kwargs: object) -> aiohttp.ClientResponse:
        return await self.http.post(self.base + path, allow_redirects=False, **kwargs)  # type: ignore[arg-type]

    async def csrf(self) -> str:
        response = await self.get("/api/state")
        assert response.status == 200
        token: str = (await response.json())["csrf"]
        return token

    async def state(self) -> dict[str, object]:
        response = await self.get("/api/state")
        assert response.status == 200
        body: dict[str, object] = await response.json()
        return body

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = await self.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = {}
        for family in text_string_to_metric_families(await response.text()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def request(port: int, *, client: IPv4Address = LAN, mechanism: Mechanism = Mechanism.NATPMP,
            lifetime: int = 3600) -> MapRequest:  # fmt: skip
    return MapRequest(
        mechanism, client, Protocol.TCP, client, port, port, lifetime, description=f"svc {port}"
    )


async def make_rig(tmp_path: Path, password_hash: str | None = None) -> Rig:
    policy = Policy.load(HOME)
    backend = MemoryBackend()
    service = Service(Gateway(policy), backend, LeaseStore(tmp_path / "leases"))
    admin = AdminServer(
        service,
        listen=(IPv4Address("127.0.0.1"), 0),
        policy=lambda: policy,
        external=lambda: IPv4Address("203.0.113.1"),
        password_hash=password_hash,
        device="lo",
    )
    await admin.start()
    tasks = [asyncio.create_task(service.run_committer())]
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for an IP address host
    return Rig(service, backend, admin, aiohttp.ClientSession(cookie_jar=jar), tasks)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    built = await make_rig(tmp_path)
    # The console page hands out the session (loopback, no password).
    assert (await built.get("/")).status == 200
    yield built
    await built.http.close()
    await built.admin.stop()
    for task in built.tasks:
        task.cancel()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_count_what_requests_did(rig: Rig) -> None:
    service = rig.service
    await service.map(request(8080))
    await service.map(request(8081, mechanism=Mechanism.PCP))
    await service.map(request(8080))  # the owner renews
    await service.map(request(23))  # dangerous services: refused
    await service.delete(MappingKey(Protocol.TCP, 8081))
    service.publish(DatagramDropped(LAN, DropReason.RATE_LIMIT))
    service.publish(ExternalAddressChanged(None, IPv4Address("203.0.113.1")))
    await settle()
    samples = await rig.scrape()
    rule = "LAN high ports to self"
    assert value(samples, "igd_grants_total", mechanism="natpmp", rule=rule) == 1
    assert value(samples, "igd_grants_total", mechanism="pcp", rule=rule) == 1
    assert value(samples, "igd_renewals_total", mechanism="natpmp", rule=rule) == 1
    assert value(samples, "igd_refusals_total", mechanism="natpmp", reason="policy-denied",
                 rule="dangerous services") == 1  # fmt: skip
    assert value(samples, "igd_removals_total", cause="deleted-by-admin") == 1
    assert value(samples, "igd_datagrams_dropped_total", reason="rate-limit") == 1
    assert value(samples, "igd_external_address_changes_total") == 1
    assert value(samples, "igd_mappings", mechanism="natpmp", protocol="tcp") == 1
    assert value(samples, "igd_mappings", mechanism="pcp", protocol="tcp") == 0
    assert value(samples, "igd_request_seconds_count", mechanism="natpmp") == 3
    assert value(samples, "igd_request_seconds_count", mechanism="pcp") == 1
    # Two grants, a renewal and a deletion reached the kernel and the store.
    assert value(samples, "igd_commit_seconds_count", stage="kernel") == 4
    assert value(samples, "igd_commit_seconds_count", stage="store") == 4
    assert ("igd_epoch_seconds", ()) in samples


async def test_metrics_registry_is_private(rig: Rig) -> None:
    from prometheus_client import REGISTRY

    assert "igd_grants" not in {m.name for m in REGISTRY.collect()}


# -- the console's API -------------------------------------------------------------------------


async def test_state_lists_mappings_with_their_rule_and_refusals(rig: Rig) -> None:
    await rig.service.map(request(8080))
    await rig.service.map(request(445))
    await settle()
    state = await rig.state()
    [row] = state["mappings"]  # type: ignore[misc]
    assert row["external_port"] == 8080 and row["internal"] == f"{LAN}:8080"
    assert row["rule"] == "LAN high ports to self" and row["mechanism"] == "natpmp"
    assert row["description"] == "svc 8080" and 3590 <= row["remaining"] <= 3600
    [refusal] = state["refusals"]  # type: ignore[misc]
    assert refusal["client"] == str(LAN) and refusal["rule"] == "dangerous services"
    assert refusal["reason"] == "policy-denied" and "445" in refusal["request"]
    status = state["status"]
    assert status["external_address"] == "203.0.113.1" and status["mappings"] == 1  # type: ignore[index]
    rules = state["policy"]["rules"]  # type: ignore[index]
    assert rules[0]["name"] == "dangerous services" and rules[0]["action"] == "deny"


async def test_state_lists_pinholes_with_their_rule_and_pinhole_refusals(rig: Rig) -> None:
    host, other = IPv6Address("2001:db8:0:77::a"), IPv6Address("2001:db8:0:77::b")
    holes = PinholeService(
        PinholeRules((IPv6Network("2001:db8:0:77::/64"),)),
        MemoryPinholeBackend(),
        PinholeStore(Path(":memory:")),
        feed=rig.service.feed,
    )
    now = rig.admin.now()
    await holes.restore(now=now)
    rig.admin.log.pinholes = holes
    state = await rig.state()
    assert state["pinholes"] == [] and state["status"]["pinholes"] == 0  # type: ignore[index]
    owner = PinholeOwner(Mechanism.UPNP, host)
    key = PinholeKey(host, Protocol.TCP, 8080)
    markup = "<img src=x onerror=alert(1)>"  # a LAN host's description: text, never markup
    assert isinstance(await holes.open(PinholeRequest(key, owner, 600, markup), now=now), Pinhole)
    third = PinholeRequest(PinholeKey(other, Protocol.TCP, 8081), owner, 600, "")
    await holes.open(third, now=now)  # secure mode: refused
    await settle()
    state = await rig.state()
    [row] = state["pinholes"]  # type: ignore[misc]
    assert row["internal"] == f"[{host}]:8080" and row["client"] == str(host)
    assert row["description"] == markup and row["mechanism"] == "upnp" and row["rule"]
    assert 590 <= row["remaining"] <= 600
    [refusal] = state["refusals"]  # type: ignore[misc]
    assert refusal["reason"] == "third-party" and f"[{other}]:8081" in refusal["request"]
    await holes.close(key, owner, now=now)
    await settle()
    assert (await rig.state())["pinholes"] == [] and rig.admin.log.pinhole_rules == {}


async def test_refusals_are_a_bounded_ring(rig: Rig) -> None:
    kept = rig.admin.log.refusals.maxlen
    assert kept is not None
    for _ in range(kept + 5):
        await rig.service.map(request(23))
    await settle()
    assert len((await rig.state())["refusals"]) == kept  # type: ignore[arg-type]


async def test_delete_with_the_token_removes_from_the_kernel(rig: Rig) -> None:
    await rig.service.map(request(8080))
    token = await rig.csrf()
    body = {"protocol": "tcp", "external_port": 8080}
    response = await rig.post("/api/delete", json=body, headers={CSRF_HEADER: token})
    assert response.status == 200
    assert rig.service.count() == 0 and not await rig.backend.entries()
    again = await rig.post("/api/delete", json=body, headers={CSRF_HEADER: token})
    assert again.status == 404


async def test_flush_by_client(rig: Rig) -> None:
    await rig.service.map(request(8080))
    await rig.service.map(request(8081, client=OTHER))
    token = await rig.csrf()
    response = await rig.post("/api/flush", json={"client": str(LAN)}, headers={CSRF_HEADER: token})
    assert (await response.json()) == {"deleted": 1}
    assert [m.owner.client for m in rig.service.mappings()] == [OTHER]


@pytest.mark.parametrize(
    "form",
    [
        {"client": "192.168.1.20", "via": "natpmp", "protocol": "tcp", "internal_port": "8080"},
        {"client": "192.168.1.20", "via": "upnp", "protocol": "udp", "internal_port": "3389",
         "external_port": "3389", "exact": True},
        {"client": "10.9.9.9", "via": "pcp", "protocol": "tcp", "internal_port": "80",
         "external_port": "80", "lifetime": "60"},
    ],
)  # fmt: skip
async def test_explain_answers_as_the_command_does(
    rig: Rig, form: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    token = await rig.csrf()
    response = await rig.post("/api/explain", json=form, headers={CSRF_HEADER: token})
    assert response.status == 200
    answer = await response.json()
    argv = ["policy", "explain", "--policy", str(HOME), "--client", str(form["client"]),
            "--via", str(form["via"]), "--protocol", str(form["protocol"]),
            "--internal-port", str(form["internal_port"])]  # fmt: skip
    if "external_port" in form:
        argv += ["--external-port", str(form["external_port"])]
    if "lifetime" in form:
        argv += ["--lifetime", str(form["lifetime"])]
    if form.get("exact"):
        argv.append("--exact")
    capsys.readouterr()
    policy_main(argv)
    assert answer["text"] == capsys.readouterr().out.rstrip("\n")
    policy_main([*argv, "--json"])
    assert answer["explanation"] == json.loads(capsys.readouterr().out)


async def test_explain_rejects_bad_input(rig: Rig) -> None:
    token = await rig.csrf()
    bad = {"client": "nobody", "via": "natpmp", "protocol": "tcp", "internal_port": "80"}
    response = await rig.post("/api/explain", json=bad, headers={CSRF_HEADER: token})
    assert response.status == 400 and "IPv4" in (await response.json())["error"]


# -- attacks -----------------------------------------------------------------------------------


async def test_every_answer_carries_a_strict_csp(rig: Rig) -> None:
    for path in ("/", "/static/console.js", "/metrics", "/nothing", "/api/state"):
        response = await rig.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = await (await rig.get("/")).text()
    assert "<script>" not in page and "onclick" not in page and "style=" not in page


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", ""])
async def test_foreign_host_header_is_refused(rig: Rig, host: str) -> None:
    await rig.service.map(request(8080))
    for path in ("/", "/api/state", "/metrics"):
        response = await rig.get(path, headers={"Host": host})
        assert response.status == 421
    token = await rig.csrf()
    response = await rig.post("/api/flush", json={}, headers={"Host": host, CSRF_HEADER: token})
    assert response.status == 421 and rig.service.count() == 1


async def test_state_change_needs_the_session_and_its_csrf_token(rig: Rig) -> None:
    await rig.service.map(request(8080))
    body = {"protocol": "tcp", "external_port": 8080}
    missing = await rig.post("/api/delete", json=body)
    assert missing.status == 403
    wrong = await rig.post("/api/delete", json=body, headers={CSRF_HEADER: "x" * 43})
    assert wrong.status == 403
    token = await rig.csrf()
    async with aiohttp.ClientSession() as stranger:  # no session cookie
        response = await stranger.post(
            rig.base + "/api/delete", json=body, headers={CSRF_HEADER: token}
        )
        assert response.status == 401
        assert (await stranger.get(rig.base + "/api/state")).status == 401
    assert rig.service.count() == 1


async def test_a_token_belongs_to_its_session(rig: Rig) -> None:
    await rig.service.map(request(8080))
    mine = await rig.csrf()
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as other:
        assert (await other.get(rig.base + "/")).status == 200
        response = await other.post(rig.base + "/api/flush", json={}, headers={CSRF_HEADER: mine})
        assert response.status == 403
    assert rig.service.count() == 1


async def test_oversized_requests_are_refused(rig: Rig) -> None:
    token = await rig.csrf()
    big = {"protocol": "tcp", "external_port": 8080, "pad": "x" * 20_000}
    response = await rig.post("/api/delete", json=big, headers={CSRF_HEADER: token})
    assert response.status == 413
    long_header = await rig.get("/api/state", headers={"X-Pad": "y" * 8000})
    assert long_header.status == 400
    long_path = await rig.get("/" + "z" * 5000)
    assert long_path.status in (400, 414)
    assert (await rig.get("/metrics")).status == 200  # still serving


async def test_garbage_bodies_are_answered_not_crashed(rig: Rig) -> None:
    token = await rig.csrf()
    headers = {CSRF_HEADER: token, "Content-Type": "application/json"}
    for body in (b"{", b"[]", b"\xff\xfe", b'{"protocol": "icmp", "external_port": 1}',
                 b'{"protocol": "tcp", "external_port": 70000}'):  # fmt: skip
        response = await rig.post("/api/delete", data=body, headers=headers)
        assert response.status == 400
    form = await rig.post("/api/delete", data={"a": "b"}, headers={CSRF_HEADER: token})
    assert form.status == 415


@pytest.mark.parametrize(
    "path",
    ["/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/%2e%2e/etc/passwd",
     "/static/console.html", "/static/.%2e/auth.py", "/static/console.js%00"],
)  # fmt: skip
async def test_asset_paths_cannot_leave_the_asset_table(rig: Rig, path: str) -> None:
    response = await rig.http.get(rig.base + path, allow_redirects=False)
    assert response.status == 404
    assert b"import" not in await response.read()


async def test_console_sets_a_strict_httponly_cookie(tmp_path: Path) -> None:
    built = await make_rig(tmp_path)
    try:
        response = await built.get("/")
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    finally:
        await built.http.close()
        await built.admin.stop()


# -- password --------------------------------------------------------------------------------


async def test_password_login_rate_limited(tmp_path: Path) -> None:
    built = await make_rig(tmp_path, hash_password(PASSWORD))
    try:
        assert (await built.get("/")).headers["Location"] == "/login"
        assert (await built.get("/api/state")).status == 401
        limit = built.admin.limiter.per_client
        for _ in range(limit):
            wrong = await built.post("/login", data={"password": "guess"})
            assert wrong.status == 303 and wrong.headers["Location"] == "/login?failed=1"
        assert (await built.get("/api/state")).status == 401
        # The right password is refused too while the limit holds: guessing gains nothing.
        blocked = await built.post("/login", data={"password": PASSWORD})
        assert blocked.status == 429 and int(blocked.headers["Retry-After"]) > 0
        built.admin.limiter = LoginLimiter()
        right = await built.post("/login", data={"password": PASSWORD})
        assert right.status == 303 and right.headers["Location"] == "/"
        assert "HttpOnly" in right.headers["Set-Cookie"]
        assert (await built.get("/api/state")).status == 200
        token = await built.csrf()
        assert (await built.post("/logout", json={}, headers={CSRF_HEADER: token})).status == 200
        assert (await built.get("/api/state")).status == 401
    finally:
        await built.http.close()
        await built.admin.stop()


def test_password_hash_round_trip() -> None:
    encoded = hash_password(PASSWORD)
    parsed = PasswordHash.parse(encoded)
    assert parsed.verify(PASSWORD) and not parsed.verify(PASSWORD + "!")
    assert hash_password(PASSWORD) != encoded  # salted
    for bad in ("", "md5$1$2$3$4$5", "scrypt$3$8$1$AAAA$AAAA", "scrypt$16384$8$1$!!$AAAA"):
        with pytest.raises(ValueError):
            PasswordHash.parse(bad)


def test_limiter_counts_per_client_and_in_total() -> None:
    limiter = LoginLimiter(window=60, per_client=2, total=3)
    limiter.failed("a", now=0)
    assert limiter.retry_after("a", now=1) == 0
    limiter.failed("a", now=1)
    assert limiter.retry_after("a", now=2) == 58 and limiter.retry_after("b", now=2) == 0
    limiter.failed("b", now=2)
    assert limiter.retry_after("c", now=3) == 57  # everyone waits: guessing from many hosts
    assert limiter.retry_after("a", now=61) == 0


def test_sessions_are_bounded_and_lapse() -> None:
    sessions = Sessions(lifetime=10, bound=2)
    first, _ = sessions.create(now=0)
    sessions.create(now=0)
    sessions.create(now=0)
    assert len(sessions) == 2 and sessions.get(first, now=1) is None
    token, _ = sessions.create(now=0)
    assert sessions.get(token, now=9) is not None and sessions.get(token, now=30) is None


def test_hash_password_command(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert run_hash_password(None) == 0  # type: ignore[arg-type]
    line = capsys.readouterr().out.strip()
    assert line.startswith('password_hash = "scrypt$')
    assert PasswordHash.parse(line.split('"')[1]).verify(PASSWORD)
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert run_hash_password(None) == 1  # type: ignore[arg-type]


# -- where it may listen -----------------------------------------------------------------------


def test_listener_never_on_the_wan() -> None:
    wan = frozenset({IPv4Address("203.0.113.1")})
    lan = {"br-lan": frozenset({IPv4Address("192.168.1.1")})}
    assert listener_device(IPv4Address("127.0.0.1"), lan, wan) == "lo"
    assert listener_device(IPv4Address("192.168.1.1"), lan, wan) == "br-lan"
    for address, words in (("0.0.0.0", "external"), ("203.0.113.1", "external"),
                           ("10.0.0.1", "neither")):  # fmt: skip
        with pytest.raises(AdminListenError, match=words):
            listener_device(IPv4Address(address), lan, wan)


def test_config_admin_section(tmp_path: Path) -> None:
    base = '[network]\nexternal_interface = "wan0"\ninternal_interfaces = ["br-lan"]\n'
    config = Config.parse(base, tmp_path / "c.toml")
    assert not config.admin_enabled and config.admin_listen == (IPv4Address("127.0.0.1"), 9351)
    config = Config.parse(
        base + '[admin]\nenabled = true\nlisten = "192.168.1.1:8443"\n'
        f'password_hash = "{hash_password(PASSWORD)}"\nnames = ["Router.lan"]\n',
        tmp_path / "c.toml",
    )
    assert config.admin_listen == (IPv4Address("192.168.1.1"), 8443)
    assert config.admin_names == ("router.lan",)
    with pytest.raises(ConfigError, match="password_hash"):
        Config.parse(base + '[admin]\nlisten = "192.168.1.1:8443"\n', tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="ADDRESS:PORT"):
        Config.parse(base + '[admin]\nlisten = "localhost"\n', tmp_path / "c.toml")


async def test_server_refuses_off_loopback_without_password(tmp_path: Path) -> None:
    service = Service(Gateway(Policy.load(HOME)), MemoryBackend(), LeaseStore(tmp_path / "l"))
    with pytest.raises(AdminListenError, match="password_hash"):
        AdminServer(
            service,
            listen=(IPv4Address("192.168.1.1"), 1),
            policy=lambda: Policy.load(HOME),
            external=lambda: None,
        )


async def test_a_taken_port_is_a_clear_start_error(rig: Rig, tmp_path: Path) -> None:
    other = AdminServer(
        rig.service,
        listen=(IPv4Address("127.0.0.1"), rig.admin.port),
        policy=lambda: Policy.load(HOME),
        external=lambda: None,
        device="lo",
    )
    with pytest.raises(AdminBindError, match=r"cannot listen on 127\.0\.0\.1"):
        await other.start()
    # The running listener still counts: the failed one took nothing over.
    await rig.service.map(request(8080))
    await settle()
    assert value(await rig.scrape(), "igd_request_seconds_count", mechanism="natpmp") == 1


async def test_rules_of_removed_mappings_are_forgotten(rig: Rig) -> None:
    await rig.service.map(request(8080))
    await rig.service.map(request(8081))
    await rig.service.delete(MappingKey(Protocol.TCP, 8081))
    await settle()
    assert set(rig.admin.log.rules) == {MappingKey(Protocol.TCP, 8080)}


def test_igd_server_admin_hash_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from igd.server.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["admin", "hash-password"]) == 0
    line = capsys.readouterr().out.strip()
    config = Config.parse(
        '[network]\nexternal_interface = "wan0"\ninternal_interfaces = ["br-lan"]\n'
        f'[admin]\nlisten = "192.168.1.1:9351"\n{line}\n',
        Path("/etc/igd/config.toml"),
    )
    assert config.admin_password_hash is not None
    assert PasswordHash.parse(config.admin_password_hash).verify(PASSWORD)
