"""Start-up safety without namespaces: the instance locks, the busy-port message, readiness
notifications, one-line log records."""

import asyncio
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from igd.server import systemd
from igd.server.instance import AlreadyRunning, Port, StartError, acquire, check_ports

HOLD = """
import sys
import tempfile
from pathlib import Path
from igd.server.instance import acquire
lock = acquire(Path(sys.argv[1]), run_dir=Path(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers: give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_second_instance_names_the_holder_and_takes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "a"), str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        # Another state directory, same network namespace: still refused.
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid} holds {run_dir}/net-"):
            acquire(tmp_path / "b", run_dir=run_dir)
        # The same state directory from elsewhere (another run directory): refused too.
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid} holds {tmp_path / 'a'}"):
            acquire(tmp_path / "a", run_dir=tmp_path / "other-run")
        # The refused attempts hold nothing: once the holder is gone, the lock is free.
    finally:
        holder.communicate("", timeout=10)
    lock = acquire(tmp_path / "b", run_dir=run_dir)
    lock.release()


def test_lock_is_free_again_after_a_crash(tmp_path: Path) -> None:
    crash = HOLD.replace("sys.stdin.read()", "import os; os._exit(9)")
    died = subprocess.run(
        [sys.executable, "-c", crash, str(tmp_path), str(tmp_path / "run")], capture_output=True
    )
    assert died.returncode == 9 and (tmp_path / "igd-server.lock").exists()
    acquire(tmp_path, run_dir=tmp_path / "run").release()


def test_busy_port_names_port_and_process() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        wanted = Port(socket.SOCK_DGRAM, "0.0.0.0", port, "lo", False, "NAT-PMP/PCP")
        with pytest.raises(StartError) as caught:
            check_ports([wanted])
    message = str(caught.value)
    assert message.startswith(f"UDP {port} on lo (NAT-PMP/PCP) is already in use by ")
    assert f"(pid {os.getpid()})" in message
    check_ports([wanted])  # free again: no error


def test_notify_sends_ready_to_the_service_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert systemd.ready("serving 3 mappings")
        assert manager.recv(1024) == b"READY=1\nSTATUS=serving 3 mappings"
        assert systemd.reloading()
        assert manager.recv(1024).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.stopping()  # no manager: nothing sent, no error


def test_log_records_are_one_line_each() -> None:
    stream = io.StringIO()
    systemd.setup_logging(logging.INFO, stream)
    log = logging.getLogger("igd.test")
    log.error("policy reload failed:\nfile:3: bad\nfile:7: worse")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("crashed")
    log.debug("not shown at info")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("ERROR igd.test: policy reload failed: | file:3: bad | file:7: worse")
    assert "crashed | Traceback (most recent call last): |" in lines[1]
    assert lines[1].endswith("ValueError: boom")


class CountingStream(io.StringIO):
    """Counts the writes that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_of_one_loop_turn_are_written_together_and_in_order() -> None:
    stream = CountingStream()
    systemd.setup_logging(logging.INFO, stream)
    log = logging.getLogger("igd.test")

    async def grants() -> None:
        for port in range(100):
            log.info("granted %d", port)
        assert stream.writes == 0  # not yet: at the start of the next turn
        await asyncio.sleep(0)
        assert stream.writes == 1
        log.warning("after")
        await asyncio.sleep(0)

    asyncio.run(grants())
    log.info("no loop, written at once")
    assert stream.writes == 3
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == [
        *(f"granted {port}" for port in range(100)),
        "after",
        "no loop, written at once",
    ]


def test_under_journald_lines_carry_priority_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        systemd.setup_logging(logging.INFO, stream)
        logging.getLogger("igd.test").warning("external address changed")
        stream.seek(0)
        assert stream.read() == "<4>igd.test: external address changed\n"


def test_under_systemd_without_journal_no_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    stream = io.StringIO()
    systemd.setup_logging(logging.INFO, stream)
    logging.getLogger("igd.test").info("ready")
    assert stream.getvalue() == "INFO igd.test: ready\n"


def test_an_unprivileged_user_cannot_hold_the_lock(tmp_path: Path) -> None:
    # A directory everyone may enter (pytest's own is root's, 0700), as /run/igd is.
    run_dir = Path(tempfile.mkdtemp(prefix="igd-lock-"))
    try:
        run_dir.chmod(0o755)
        held = acquire(run_dir / "state", run_dir=run_dir)
        lock = held.paths[0]
        assert (lock.stat().st_mode & 0o777, (run_dir / "state").stat().st_mode & 0o777) == (
            0o600,
            0o700,
        )
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        # Not "already locked": the user cannot even open the file, held or not.
        tried = subprocess.run(
            [*nobody, "flock", "--nonblock", str(lock), "true"], capture_output=True, text=True
        )
        held.release()
        assert tried.returncode != 0 and "Permission denied" in tried.stderr, tried.stderr
    finally:
        shutil.rmtree(run_dir)


def test_a_clean_stop_removes_the_namespace_lock_file(tmp_path: Path) -> None:
    lock = acquire(tmp_path / "state", run_dir=tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [lock.paths[0].name]
    lock.release()
    assert list((tmp_path / "run").iterdir()) == []
    acquire(tmp_path / "state", run_dir=tmp_path / "run").release()  # and can be taken again
