"""The audit log follows the service's event feed: real requests through the door produce one
JSON line each (grant, renewal, refusal, removal with its cause), a writer that falls behind
says how many events it lost, and rotation (rename + reopen, or by size) keeps every line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from collections.abc import AsyncIterator
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from igd.gateway import Gateway
from igd.model import MappingKey, MapRequest, Mechanism, Protocol
from igd.policy import Policy
from igd.server.audit import AUDITED, AuditLog
from igd.server.backends.memory import MemoryBackend
from igd.server.config import Config
from igd.server.daemon import Daemon
from igd.server.service import Service
from igd.server.store import LeaseStore

POLICY = (
    '[defaults]\naction = "allow"\nmin_lease = 1\n\n'
    '[[rules]]\nname = "no telnet"\naction = "deny"\ninternal_ports = "23"\n'
)
CLIENT = IPv4Address("192.168.1.10")


def request(port: int, lifetime: int = 600, internal: int | None = None) -> MapRequest:
    return MapRequest(
        Mechanism.NATPMP, CLIENT, Protocol.TCP, CLIENT, internal or port, port, lifetime
    )


def lines(*paths: Path) -> list[dict[str, Any]]:
    found = []
    for path in paths:
        if path.exists():
            found += [json.loads(line) for line in path.read_text().splitlines()]
    return found


async def written(path: Path, count: int) -> None:
    """Wait until the file holds `count` lines."""
    for _ in range(500):
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never held {count} lines")


class Audited:
    """A service whose events an audit log writes, as the daemon wires them."""

    def __init__(self, tmp: Path, audit: AuditLog, bound: int = 4096) -> None:
        self.service = Service(
            Gateway(Policy.parse(POLICY)), MemoryBackend(), LeaseStore(tmp / "l")
        )
        self.audit = audit
        self.subscriber = self.service.subscribe("audit", bound, AUDITED)

    async def settle(self) -> None:
        """Let the writer catch up with everything published so far."""
        # Taking a batch and locking the file happen with no await between them, so an empty
        # queue and a free lock mean every published event is on disk.
        for _ in range(1000):
            if not self.subscriber._queue and not self.audit._lock.locked():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the audit writer did not catch up")


@pytest.fixture
async def audited(tmp_path: Path) -> AsyncIterator[Audited]:
    audit = AuditLog(tmp_path / "audit" / "audit.jsonl")
    rig = Audited(tmp_path, audit)
    task = asyncio.create_task(audit.follow(rig.subscriber))
    yield rig
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_every_decision_is_one_line(audited: Audited) -> None:
    service = audited.service
    await service.map(request(4000))
    await service.map(request(4000))  # the same client again: a renewal
    await service.map(request(4001, internal=23))
    owned = service.mappings_of(CLIENT)
    await service.remove(owned, why="deleted by the client")  # what NAT-PMP's delete does
    await service.map(request(4002))
    await service.delete(MappingKey(Protocol.TCP, 4002))
    await audited.settle()
    written = lines(audited.audit.path)
    assert [(w["event"], w["decision"], w["cause"]) for w in written] == [
        ("grant", "allow", None),
        ("renewal", "allow", None),
        ("refusal", "deny", "policy-denied"),
        ("removal", None, "deleted-by-client"),
        ("grant", "allow", None),
        ("removal", None, "deleted-by-admin"),
    ]
    grant, refusal = written[0], written[2]
    assert (grant["client"], grant["mechanism"], grant["rule"]) == (
        str(CLIENT),
        "natpmp",
        "defaults",
    )
    assert grant["request"]["external_port"] == 4000 and grant["mapping"]["external_port"] == 4000
    assert refusal["rule"] == "no telnet" and refusal["request"]["internal_port"] == 23
    for line in written:
        assert datetime.fromisoformat(line["time"]).utcoffset() is not None
        assert line["time"].endswith("Z")
    assert stat.S_IMODE(audited.audit.path.stat().st_mode) == 0o600


async def test_a_writer_that_falls_behind_says_how_many_events_it_lost(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    rig = Audited(tmp_path, audit, bound=2)
    for port in range(4000, 4005):
        await rig.service.map(request(port))  # the writer is not running yet
    task = asyncio.create_task(audit.follow(rig.subscriber))
    await rig.settle()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    written = lines(audit.path)
    assert written[0]["event"] == "lost" and written[0]["count"] == 3
    assert [w["request"]["external_port"] for w in written[1:]] == [4003, 4004]


async def test_rename_and_reopen_keeps_every_line(audited: Audited) -> None:
    path = audited.audit.path
    for port in range(4000, 4010):
        await audited.service.map(request(port))
    await audited.settle()
    path.rename(path.with_name("audit.jsonl.1"))  # what logrotate does, then it signals
    for port in range(4010, 4015):
        await audited.service.map(request(port))  # still written to the renamed file
    await audited.audit.reopen()
    for port in range(4015, 4020):
        await audited.service.map(request(port))
    await audited.settle()
    old, new = lines(path.with_name("audit.jsonl.1")), lines(path)
    assert [w["request"]["external_port"] for w in old + new] == list(range(4000, 4020))
    assert new and new[0]["request"]["external_port"] >= 4010


async def test_rotation_by_size_keeps_n_files(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=2000, keep=2)
    rig = Audited(tmp_path, audit)
    task = asyncio.create_task(audit.follow(rig.subscriber))
    try:
        for port in range(4000, 4040):
            await rig.service.map(request(port))
            await rig.settle()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    kept = lines(tmp_path / "audit.jsonl.2", tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl")
    ports = [w["request"]["external_port"] for w in kept]
    assert ports == list(range(ports[0], 4040)) and ports[0] > 4000  # the oldest went
    assert all((tmp_path / n).stat().st_size <= 2000 + 400 for n in names)
    assert all(stat.S_IMODE((tmp_path / n).stat().st_mode) == 0o600 for n in names)


def test_an_existing_file_is_tightened_to_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)
    audit = AuditLog(path)
    audit.open()
    audit.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_the_daemon_writes_the_audit_log_and_reopens_it_on_sighup(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(POLICY)
    config = tmp_path / "config.toml"
    config.write_text(
        '[network]\nexternal_interface = "igd-none0"\ninternal_interfaces = ["lo"]\n'
        'external_address = "192.0.2.44"\nallow_private_external = true\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n[policy]\nfile = "policy.toml"\n'
        '[nftables]\ntable = "igdaudit"\n[upnp]\nenabled = false\n'
        '[log]\naudit_file = "audit.jsonl"\n'
    )
    daemon = Daemon(Config.load(config), dry_run=True)
    path = tmp_path / "audit.jsonl"
    assert daemon.config.audit_file == path
    task = asyncio.create_task(daemon.run())
    try:
        for _ in range(100):
            if daemon.config.control_socket.exists():
                break
            await asyncio.sleep(0.05)
        host = IPv4Address("127.0.0.2")
        ask = MapRequest(Mechanism.PCP, host, Protocol.UDP, host, 5000, 5000, 600)
        await daemon.service.map(ask)
        await written(path, 1)
        path.rename(tmp_path / "audit.jsonl.1")
        os.kill(os.getpid(), signal.SIGHUP)  # the daemon's own handler: reopen, reload
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.05)
        await daemon.service.flush(client=host)
        await written(path, 1)
    finally:
        daemon.shutdown()
        await asyncio.wait_for(task, 10)
    old, new = lines(tmp_path / "audit.jsonl.1"), lines(path)
    assert [(w["event"], w["mechanism"]) for w in old] == [("grant", "pcp")]
    assert [(w["event"], w["cause"]) for w in new] == [("removal", "deleted-by-admin")]
