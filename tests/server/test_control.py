"""The control socket with the daemon in-process (--dry-run): `status`, `delete`, `flush` and
`reload` act through the service and answer; the socket refuses non-root peers (checked with
SO_PEERCRED even when its mode is loosened), answers garbage with an error, never a
traceback, keeps serving, and bounds concurrent connections."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from igd.events import MappingRemoved, RemovalCause
from igd.model import MapRequest, Mechanism, Protocol
from igd.server.backends.memory import MemoryBackend
from igd.server.config import Config
from igd.server.control import MAX_CLIENTS, MAX_REQUEST, Refused, ask
from igd.server.daemon import Daemon
from igd.server.store import Clock

POLICY = '[defaults]\naction = "allow"\nmin_lease = 1\n'
BROKEN_POLICY = '[defaults]\naction = "allow"\n\n[[rules]]\nname = "x"\nactoin = "deny"\n'
NO_PCP_POLICY = (
    '[defaults]\naction = "allow"\nmin_lease = 1\n\n'
    '[[rules]]\nname = "no-pcp"\nvia = ["pcp"]\naction = "deny"\n'
)
A, B = IPv4Address("127.0.0.2"), IPv4Address("127.0.0.3")


def request(mechanism: Mechanism, client: IPv4Address, port: int) -> MapRequest:
    return MapRequest(mechanism, client, Protocol.TCP, client, port, port, 600)


class Running:
    """A dry-run daemon serving on a control socket in a folder others may enter."""

    def __init__(self, daemon: Daemon, folder: Path) -> None:
        self.daemon = daemon
        self.folder = folder
        self.socket = daemon.config.control_socket

    async def ask(self, command: str, args: dict[str, object] | None = None) -> object:
        return await asyncio.to_thread(ask, self.socket, command, args)

    async def raw(self, data: bytes, *, shut: bool = True) -> dict[str, str]:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        writer.write(data)
        if shut:
            writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return json.loads(answer)  # type: ignore[no-any-return]

    async def map(self, mechanism: Mechanism, client: IPv4Address, port: int) -> None:
        await self.daemon.service.map(request(mechanism, client, port))

    def ports(self) -> set[int]:
        return {m.external_port for m in self.daemon.service.mappings()}

    async def kernel_ports(self) -> set[int]:
        backend = self.daemon.backend
        assert isinstance(backend, MemoryBackend)
        return {e.external_port for e in await backend.entries()}

    def stored_ports(self) -> set[int]:
        now = 0.0
        return {m.external_port for m in self.daemon.store.load(Clock(mono=now), now=now)}


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    folder = tmp_path / "open"
    folder.mkdir()
    # pytest's own temporary folders are root's alone; the `nobody` tests need a way in.
    for part in (tmp_path.parent.parent, tmp_path.parent, tmp_path, folder):
        part.chmod(0o755)
    (folder / "policy.toml").write_text(POLICY)
    config = folder / "config.toml"
    config.write_text(
        '[network]\nexternal_interface = "igd-none0"\ninternal_interfaces = ["lo"]\n'
        'external_address = "192.0.2.44"\nallow_private_external = true\n'
        f'[state]\ndirectory = "{folder / "state"}"\n[policy]\nfile = "policy.toml"\n'
        '[nftables]\ntable = "igdcontrol"\n[upnp]\nenabled = false\n'
        f'[control]\nsocket = "{folder / "control.sock"}"\n'
    )
    daemon = Daemon(Config.load(config), dry_run=True)
    task = asyncio.create_task(daemon.run())
    for _ in range(100):
        if daemon.config.control_socket.exists():
            break
        await asyncio.sleep(0.05)
    try:
        yield Running(daemon, folder)
    finally:
        daemon.shutdown()
        await asyncio.wait_for(task, 10)


async def test_status_reports_the_daemon_state(running: Running) -> None:
    await running.map(Mechanism.NATPMP, A, 4000)
    await running.map(Mechanism.PCP, A, 4001)
    await running.map(Mechanism.NATPMP, B, 4002)
    status = await running.ask("status")
    assert isinstance(status, dict)
    assert status["mappings"] == 3
    assert status["by_mechanism"] == {"natpmp": 2, "pcp": 1}
    assert status["external_address"] == "192.0.2.44"
    assert status["policy"].endswith("policy.toml")
    assert len(status["policy_sha256"]) == 64
    assert status["policy_loaded"].endswith("Z") and status["uptime"] >= 0
    assert status["version"]


async def test_delete_reaches_kernel_and_store_and_is_published(running: Running) -> None:
    await running.map(Mechanism.NATPMP, A, 4000)
    await running.map(Mechanism.PCP, B, 4001)
    feed = running.daemon.service.subscribe("test", kinds=(MappingRemoved,))
    deleted = await running.ask("delete", {"protocol": "tcp", "external_port": 4000})
    assert isinstance(deleted, dict) and deleted["client"] == str(A)
    # The answer comes once the kernel and the lease store no longer hold it.
    assert running.ports() == await running.kernel_ports() == running.stored_ports() == {4001}
    events, _ = feed.take()
    assert [(e.mapping.external_port, e.cause) for e in events] == [(4000, RemovalCause.ADMIN)]  # type: ignore[union-attr]
    with pytest.raises(Refused, match="no mapping tcp 4000"):
        await running.ask("delete", {"protocol": "tcp", "external_port": 4000})
    with pytest.raises(Refused, match="no mapping udp 4001"):
        await running.ask("delete", {"protocol": "udp", "external_port": 4001})
    with pytest.raises(Refused, match="want 1-65535"):
        await running.ask("delete", {"protocol": "tcp", "external_port": 70000})
    with pytest.raises(Refused, match="remote_host: want an IPv4 address"):
        await running.ask(
            "delete", {"protocol": "tcp", "external_port": 4001, "remote_host": "nope"}
        )
    assert running.ports() == {4001}


async def test_flush_by_client_and_by_mechanism(running: Running) -> None:
    await running.map(Mechanism.NATPMP, A, 4000)
    await running.map(Mechanism.PCP, A, 4001)
    await running.map(Mechanism.NATPMP, B, 4002)
    await running.map(Mechanism.PCP, B, 4003)
    result = await running.ask("flush", {"client": str(A), "mechanism": "pcp"})
    assert [m["external_port"] for m in result["removed"]] == [4001]  # type: ignore[index]
    result = await running.ask("flush", {"client": str(B)})
    assert sorted(m["external_port"] for m in result["removed"]) == [4002, 4003]  # type: ignore[index]
    assert running.ports() == await running.kernel_ports() == running.stored_ports() == {4000}
    with pytest.raises(Refused, match="mechanism: want upnp, natpmp, pcp"):
        await running.ask("flush", {"mechanism": "smtp"})
    result = await running.ask("flush")
    assert [m["external_port"] for m in result["removed"]] == [4000]  # type: ignore[index]
    assert running.ports() == await running.kernel_ports() == set()


async def test_reload_reports_policy_errors_with_lines_and_keeps_the_policy(
    running: Running,
) -> None:
    await running.map(Mechanism.NATPMP, A, 4000)
    await running.map(Mechanism.PCP, A, 4001)
    policy = running.folder / "policy.toml"
    policy.write_text(BROKEN_POLICY)
    with pytest.raises(Refused) as refused:
        await running.ask("reload")
    assert "keeping the current policy" in str(refused.value)
    assert "policy.toml:6:" in str(refused.value) and "actoin" in str(refused.value)
    assert running.ports() == {4000, 4001}
    policy.write_text(NO_PCP_POLICY)
    result = await running.ask("reload")
    assert isinstance(result, dict) and result["rules"] == 1
    assert [m["external_port"] for m in result["removed"]] == [4001]
    assert running.ports() == await running.kernel_ports() == {4000}
    status = await running.ask("status")
    assert status["policy_sha256"] == result["sha256"]  # type: ignore[index]


async def test_cli_prints_results_and_exits_non_zero_on_refusal(running: Running) -> None:
    await running.map(Mechanism.NATPMP, A, 4000)

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "igd.server",
            *args,
            "--socket",
            str(running.socket),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await cli("status")
    assert code == 0 and "external address: 192.0.2.44" in out and "natpmp 1" in out
    code, out, _ = await cli("status", "--json")
    assert code == 0 and json.loads(out)["mappings"] == 1
    code, out, _ = await cli("list", "--json")
    assert code == 0 and [m["external_port"] for m in json.loads(out)] == [4000]
    code, out, _ = await cli("delete", "tcp", "4000", "--json")
    assert code == 0 and json.loads(out)["external_port"] == 4000
    code, _, err = await cli("delete", "TCP", "4000")
    assert code == 1 and "no mapping tcp 4000" in err
    code, out, _ = await cli("flush", "--client", str(B))
    assert code == 0 and "removed 0 mappings" in out
    (running.folder / "policy.toml").write_text(BROKEN_POLICY)
    code, _, err = await cli("reload")
    assert code == 1 and "policy.toml:6:" in err and "Traceback" not in err


GARBAGE = [
    b"\n",
    b"not json\n",
    b"\xff\xfe\x00garbage\x80\n",
    b"[1, 2, 3]\n",
    b'{"command": 7}\n',
    b'{"command": "rm -rf"}\n',
    b'{"command": "delete", "args": [1]}\n',
    b'{"command": "delete", "args": {"protocol": "sctp", "external_port": 1}}\n',
    b'{"command": "delete", "args": {"protocol": "tcp", "external_port": true}}\n',
    b'{"command": "flush", "args": {"client": 12}}\n',
    b'{"command": "list", "args": {"everything": 1}}\n',
    b'{"command": "status"',  # no newline, then the client shuts down writing
    b'{"command": "' + b"a" * 10_000 + b'"}\n',
    b"x" * (MAX_REQUEST * 4),
    b"[" * 4000 + b"\n",  # nesting deep enough to hit the JSON parser's recursion limit
    b'{"a": ' * 2000 + b"\n",
]


async def test_garbage_gets_an_error_answer_and_the_daemon_keeps_serving(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    await running.map(Mechanism.NATPMP, A, 4000)
    caplog.set_level(logging.DEBUG)
    for data in GARBAGE:
        answer = await running.raw(data)
        assert set(answer) == {"error"}, data[:60]
        assert answer["error"] and "Traceback" not in answer["error"]
    assert running.ports() == {4000}
    assert [m["external_port"] for m in await running.ask("list")] == [4000]  # type: ignore[index]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def test_a_silent_client_is_answered_and_dropped(running: Running) -> None:
    reader, writer = await asyncio.open_unix_connection(str(running.socket))
    answer = json.loads(await asyncio.wait_for(reader.read(), 15))
    writer.close()
    assert "no complete request line" in answer["error"]


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_concurrent_connections_are_bounded(running: Running) -> None:
    control = running.daemon.control
    idle = [await asyncio.open_unix_connection(str(running.socket)) for _ in range(MAX_CLIENTS)]
    await until(lambda: control.active == MAX_CLIENTS)
    with pytest.raises(Refused, match="busy"):
        await running.ask("list")
    for _, writer in idle:
        writer.close()
    await until(lambda: control.active == 0)
    assert await running.ask("list") == []


NOBODY_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as error:
    print(json.dumps({"connect": type(error).__name__}))
    raise SystemExit
try:
    s.sendall(b'{"command": "flush"}\n')
except BrokenPipeError:
    pass  # refused before it read anything; the answer waits
print(s.makefile("rb").read().decode().strip() or "{}")
"""


def as_nobody(socket_path: Path) -> dict[str, str]:
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    argv += ["/usr/bin/python3", "-c", NOBODY_CLIENT, str(socket_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
async def test_a_non_root_peer_is_refused_even_when_the_mode_is_loosened(
    running: Running,
) -> None:
    await running.map(Mechanism.NATPMP, A, 4000)
    assert running.socket.stat().st_mode & 0o777 == 0o600
    assert await asyncio.to_thread(as_nobody, running.socket) == {"connect": "PermissionError"}
    running.socket.chmod(0o666)
    answer = await asyncio.to_thread(as_nobody, running.socket)
    assert "permission denied" in answer["error"] and "root only" in answer["error"]
    assert running.ports() == {4000}


def test_peer_credentials_name_the_connecting_user() -> None:
    from igd.server.control import peer_uid

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_uid(left) == os.geteuid()


def test_commands_without_a_daemon_or_with_bad_arguments(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "igd.server", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    gone = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert gone.returncode == 3 and "igd-server is not running" in gone.stderr
    port = cli("delete", "tcp", "70000", "--socket", str(tmp_path / "none.sock"))
    assert port.returncode == 2 and "want a port 1-65535" in port.stderr
    client = cli("flush", "--client", "lan-host", "--socket", str(tmp_path / "none.sock"))
    assert client.returncode == 2 and "not an IPv4 address" in client.stderr


async def test_a_static_forward_is_the_policy_files_to_remove(running: Running) -> None:
    (running.folder / "policy.toml").write_text(
        POLICY + '\n[[forwards]]\nname = "web"\nprotocols = ["tcp"]\nexternal_ports = "8443"\n'
        'internal_address = "127.0.0.9"\n'
    )
    await running.ask("reload")
    await running.map(Mechanism.NATPMP, A, 4000)
    with pytest.raises(Refused, match="static forward of the policy file"):
        await running.ask("delete", {"protocol": "tcp", "external_port": 8443})
    result = await running.ask("flush")
    assert [m["external_port"] for m in result["removed"]] == [4000]  # type: ignore[index]
    with pytest.raises(Refused, match="mechanism: want"):
        await running.ask("flush", {"mechanism": "static"})
    assert running.ports() == await running.kernel_ports() == {8443}
