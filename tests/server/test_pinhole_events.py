"""Pinhole events on the feed, as an admin meets them: /metrics, the audit log and the console's
JSON after real requests through the pinhole service (memory backend, SQLite store)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from igd.events import PinholeOpened, PinholeRefused, PinholeRemoved, PinholeRenewed, RemovalCause
from igd.gateway import Gateway
from igd.model import Mechanism, Protocol
from igd.pinhole import PinholeKey, PinholeOwner, PinholeRequest, PinholeRules, Refusal
from igd.policy import Policy
from igd.server.admin.server import AdminServer
from igd.server.audit import AUDITED, AuditLog
from igd.server.backends.memory import MemoryBackend
from igd.server.backends.pinholes import MemoryPinholeBackend
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import CommitError as PinholeCommitError
from igd.server.pinholes import PinholeService
from igd.server.service import Service
from igd.server.store import LeaseStore

LAN = IPv6Network("2001:db8:0:77::/64")
A = IPv6Address("2001:db8:0:77::a")
B = IPv6Address("2001:db8:0:77::b")
POLICY = Policy.parse(
    """
[defaults]
action = "deny"
min_lease = 1

[[rules]]
name = "no telnet"
action = "deny"
internal_ports = "23"

[[rules]]
name = "LAN pinholes"
action = "allow"
clients = ["2001:db8:0:77::/64"]
"""
)


def ask(client: IPv6Address = A, port: int = 8080, lifetime: int = 600) -> PinholeRequest:
    owner = PinholeOwner(Mechanism.PCP, client, b"n" * 12)
    return PinholeRequest(PinholeKey(client, Protocol.TCP, port), owner, lifetime, "game")


@dataclass
class Rig:
    service: Service
    pinholes: PinholeService
    admin: AdminServer
    audit: AuditLog
    http: aiohttp.ClientSession
    tasks: list[asyncio.Task[None]]

    async def get(self, path: str) -> Any:
        response = await self.http.get(f"http://127.0.0.1:{self.admin.port}{path}")
        assert response.status == 200
        if path == "/metrics":
            return await response.text()
        return await response.json()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    service = Service(Gateway(POLICY), MemoryBackend(), LeaseStore(tmp_path / "leases"))
    store = PinholeStore(tmp_path / "leases")
    pinholes = PinholeService(
        PinholeRules((LAN,)), MemoryPinholeBackend(), store, policy=POLICY, feed=service.feed
    )
    await pinholes.restore(now=0.0)
    admin = AdminServer(
        service,
        listen=(IPv4Address("127.0.0.1"), 0),
        policy=lambda: POLICY,
        external=lambda: IPv4Address("203.0.113.1"),
        device="lo",
        clock=lambda: 30.0,  # the story's clock
    )
    # As the daemon wires them when [ipv6] is enabled.
    admin.metrics.state.pinholes = pinholes.pinholes
    admin.log.pinholes = pinholes
    audit = AuditLog(tmp_path / "audit.jsonl")
    subscriber = service.subscribe("audit", 4096, AUDITED)
    await admin.start()
    tasks = [asyncio.create_task(audit.follow(subscriber))]
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    built = Rig(service, pinholes, admin, audit, http, tasks)
    await http.get(f"http://127.0.0.1:{admin.port}/")  # the page hands out the session
    yield built
    await http.close()
    await admin.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def story(rig: Rig) -> None:
    """Open, renew, refuse (policy and owner), close by the client, expire."""
    holes = rig.pinholes
    await holes.open(ask(), now=10.0)
    await holes.open(ask(lifetime=900), now=20.0)
    assert await holes.open(ask(port=23), now=20.0) is Refusal.NOT_ALLOWED
    thief = PinholeOwner(Mechanism.PCP, B, b"t" * 12)
    assert await holes.close(ask().key, thief, now=21.0) is Refusal.NOT_OWNER
    await holes.open(ask(port=9000), now=22.0)
    await holes.close(ask(port=9000).key, ask(port=9000).owner, now=23.0)
    await holes.open(ask(client=B, port=7000, lifetime=5), now=24.0)
    await holes.expire(now=30.0)
    for _ in range(10):
        await asyncio.sleep(0)


async def test_the_pinhole_service_publishes_what_happened_in_order(rig: Rig) -> None:
    seen = rig.service.subscribe("test", 64)
    await story(rig)
    events, lost = seen.take()
    assert lost == 0
    kinds = [(type(e).__name__, getattr(e, "cause", None)) for e in events]
    assert kinds == [
        ("PinholeOpened", None),
        ("PinholeRenewed", None),
        ("PinholeRefused", None),
        ("PinholeRefused", None),
        ("PinholeOpened", None),
        ("PinholeRemoved", RemovalCause.CLIENT),
        ("PinholeOpened", None),
        ("PinholeRemoved", RemovalCause.EXPIRED),
    ]
    opened, renewed, refused, not_owner = events[:4]
    assert isinstance(opened, PinholeOpened) and opened.rule == "LAN pinholes"
    assert isinstance(renewed, PinholeRenewed) and renewed.previous == opened.pinhole
    assert isinstance(refused, PinholeRefused) and refused.rule == "no telnet"
    assert isinstance(not_owner, PinholeRefused) and not_owner.refusal is Refusal.NOT_OWNER
    assert isinstance(events[-1], PinholeRemoved) and events[-1].pinhole.owner.client == B


async def test_metrics_show_pinholes_open_and_counted_by_result(rig: Rig) -> None:
    await story(rig)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await rig.get("/metrics"))
        for s in family.samples
    }
    assert samples[("igd_pinholes", (("mechanism", "pcp"), ("protocol", "tcp")))] == 1
    assert samples[("igd_pinholes", (("mechanism", "upnp"), ("protocol", "udp")))] == 0
    rule = ("rule", "LAN pinholes")
    assert samples[("igd_pinholes_opened_total", (("mechanism", "pcp"), rule))] == 3
    assert samples[("igd_pinhole_renewals_total", (("mechanism", "pcp"), rule))] == 1
    refusals = "igd_pinhole_refusals_total"
    pcp = ("mechanism", "pcp")
    assert samples[(refusals, (pcp, ("reason", "not-allowed"), ("rule", "no telnet")))] == 1
    assert samples[(refusals, (pcp, ("reason", "not-owner"), ("rule", "gateway")))] == 1
    assert samples[("igd_pinhole_removals_total", (("cause", "deleted-by-client"),))] == 1
    assert samples[("igd_pinhole_removals_total", (("cause", "expired"),))] == 1


async def test_the_audit_log_writes_a_line_per_pinhole_event(rig: Rig) -> None:
    await story(rig)
    for _ in range(300):
        if rig.audit.path.exists() and len(rig.audit.path.read_text().splitlines()) >= 8:
            break
        await asyncio.sleep(0.01)
    written = [json.loads(line) for line in rig.audit.path.read_text().splitlines()]
    assert [(w["event"], w["decision"], w["rule"], w["cause"]) for w in written] == [
        ("pinhole-open", "allow", "LAN pinholes", None),
        ("pinhole-renewal", "allow", "LAN pinholes", None),
        ("pinhole-refusal", "deny", "no telnet", "not-allowed"),
        ("pinhole-refusal", "deny", "gateway", "not-owner"),
        ("pinhole-open", "allow", "LAN pinholes", None),
        ("pinhole-removal", None, None, "deleted-by-client"),
        ("pinhole-open", "allow", "LAN pinholes", None),
        ("pinhole-removal", None, None, "expired"),
    ]
    first = written[0]
    assert first["client"] == str(A) and first["mechanism"] == "pcp"
    assert first["pinhole"]["internal_address"] == str(A)
    assert first["pinhole"]["internal_port"] == 8080 and first["pinhole"]["description"] == "game"
    assert written[2]["request"]["internal_port"] == 23 and "detail" in written[2]


async def test_the_console_lists_pinholes_beside_mappings_and_their_refusals(rig: Rig) -> None:
    await story(rig)
    state = await rig.get("/api/state")
    assert state["status"]["pinholes"] == 1 and state["mappings"] == []
    [row] = state["pinholes"]
    assert row["internal"] == f"[{A}]:8080" and row["client"] == str(A)
    assert row["rule"] == "LAN pinholes" and row["mechanism"] == "pcp"
    assert row["description"] == "game" and row["remaining"] == 890  # renewed at 20 for 900 s
    reasons = [(r["rule"], r["reason"]) for r in state["refusals"]]
    assert reasons == [("gateway", "not-owner"), ("no telnet", "not-allowed")]
    assert state["refusals"][1]["request"].startswith("pinhole tcp [")


async def test_a_prefix_change_removes_the_pinholes_that_left_the_lan(tmp_path: Path) -> None:
    feed_rig = Service(Gateway(POLICY), MemoryBackend(), LeaseStore(tmp_path / "l4"))
    backend = MemoryPinholeBackend()
    store = PinholeStore(tmp_path / "l6")
    holes = PinholeService(PinholeRules((LAN,)), backend, store, policy=POLICY,
                           feed=feed_rig.feed)  # fmt: skip
    await holes.restore(now=0.0)
    seen = feed_rig.subscribe("test", 16)
    await holes.open(ask(), now=1.0)
    renumbered = IPv6Network("2001:db8:0:78::/64")
    # Both prefixes for a while (a renumbering's overlap): nothing goes.
    assert await holes.readdress(PinholeRules((LAN, renumbered)), now=2.0) == 0
    assert backend.lan == (LAN, renumbered) and len(backend.held) == 1
    assert await holes.readdress(PinholeRules((renumbered,)), now=3.0) == 1
    assert backend.lan == (renumbered,) and backend.held == {} and holes.count() == 0
    events, _ = seen.take()
    removed = events[-1]
    assert isinstance(removed, PinholeRemoved) and removed.cause is RemovalCause.ADDRESS_CHANGE
    assert store.load(holes._clock, now=4.0) == []
    # A kernel that refuses the rebuild changes nothing.
    await holes.readdress(PinholeRules((LAN,)), now=5.0)
    await holes.open(ask(), now=6.0)
    backend.fail_next = 1
    with pytest.raises(PinholeCommitError):
        await holes.readdress(PinholeRules((renumbered,)), now=7.0)
    assert holes.count() == 1 and holes.rules.internal_networks == (LAN,) and backend.lan == (LAN,)


async def test_a_reloaded_policy_removes_the_pinholes_it_refuses(rig: Rig) -> None:
    holes = rig.pinholes
    await holes.open(ask(), now=1.0)
    await holes.open(ask(client=B), now=1.0)
    seen = rig.service.subscribe("test", 16)
    stricter = Policy.parse(
        '[[rules]]\nname = "A only"\naction = "allow"\nclients = ["2001:db8:0:77::a/128"]\n'
    )
    assert await holes.set_policy(stricter, now=2.0) == 1
    assert [h.owner.client for h in holes.pinholes()] == [A]
    events, _ = seen.take()
    assert [(type(e), getattr(e, "cause", None)) for e in events] == [
        (PinholeRemoved, RemovalCause.POLICY_RELOAD)
    ]
    # From now on the new policy decides: B is refused by the default deny.
    assert await holes.open(ask(client=B), now=3.0) is Refusal.NOT_ALLOWED
