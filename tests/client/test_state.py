"""The per-user state file: records survive runs, expire, stay private, and concurrent
writers (several `igd` runs at once) never lose each other's records."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from igd.client.state import Record, StateFile, default_path
from igd.model import Mechanism, Protocol


def record(port: int, *, expires_at: float | None = 2000.0, gateway: str = "192.0.2.1") -> Record:
    return Record(
        gateway, Mechanism.PCP, Protocol.UDP, "192.0.2.10", port, "198.51.100.7", port + 1,
        600, expires_at, nonce="ab" * 12, description="test",
    )  # fmt: skip


def test_put_find_replace_and_remove(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "igd" / "mappings.json")
    assert state.records(now=1000) == []  # no file yet
    state.put(record(7000), now=1000)
    state.put(record(7001, expires_at=None), now=1000)  # a permanent UPnP lease
    newer = record(7000, expires_at=2500.0)
    state.put(newer, now=1000)  # same key: replaces
    assert state.find(newer.key, now=1000) == newer
    assert sorted(r.internal_port for r in state.records(now=1000)) == [7000, 7001]
    state.remove(newer.key, now=1000)
    assert [r.internal_port for r in state.records(now=1000)] == [7001]
    assert StateFile(state.path).records(now=1000) == [record(7001, expires_at=None)]


def test_expired_records_are_left_out_and_dropped(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "mappings.json")
    state.put(record(7000, expires_at=1500.0), now=1000)
    assert state.find(record(7000).key, now=1499) is not None
    assert state.find(record(7000).key, now=1500) is None
    state.put(record(7001), now=1600)  # a write keeps only live records
    stored = json.loads(state.path.read_text())["mappings"]
    assert [m["internal_port"] for m in stored] == [7001]


def test_private_file_and_directory_and_no_temporary_files_left(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state" / "igd" / "mappings.json")
    state.put(record(7000), now=1000)
    assert state.path.stat().st_mode & 0o777 == 0o600  # PCP nonces let the reader delete
    assert state.path.parent.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in state.path.parent.iterdir()) == [
        "mappings.json", "mappings.lock",
    ]  # fmt: skip


def test_unreadable_or_foreign_content_is_ignored_not_fatal(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "mappings.json")
    state.path.write_text("{not json")
    assert state.records(now=0) == []
    good = record(7000).to_dict()
    state.path.write_text(json.dumps({"mappings": [{"gateway": "x"}, good, 5]}))
    assert state.records(now=1000) == [record(7000)]
    state.put(record(7001), now=1000)  # rewriting drops what could not be read
    assert len(json.loads(state.path.read_text())["mappings"]) == 2


def _writer(path: str, first: int) -> None:
    state = StateFile(path)
    for port in range(first, first + 20):
        state.put(record(port), now=1000)


def test_concurrent_runs_lose_no_record(tmp_path: Path) -> None:
    path = str(tmp_path / "mappings.json")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(path, 1000 * i)) for i in range(1, 5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert len(StateFile(path).records(now=1000)) == 80


def test_default_path_follows_xdg_state_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/var/tmp/someone")
    assert default_path() == Path("/var/tmp/someone/igd/mappings.json")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG spec says so
    monkeypatch.setenv("HOME", "/home/u")
    assert default_path() == Path("/home/u/.local/state/igd/mappings.json")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_path() == Path(os.environ["HOME"], ".local/state/igd/mappings.json")
