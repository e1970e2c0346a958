"""The lease store is private to the daemon: checked and fixed at start, refused if it
cannot be (issue 8, item 2). The real daemon in a lab gateway, the real file system."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from igd.model import Protocol
from lab import Lab
from lab.demo import wait_for_gateway
from tests.lab.conftest import LAB_POLICY
from tests.lab.probe import request_map

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_state_directory_and_every_store_file_are_private(lab: Lab) -> None:
    config = lab.write_gateway_config(LAB_POLICY)
    state = lab.workdir / "state"
    # What an install with the usual umask 022 leaves: world-readable directory and files.
    state.chmod(0o755)
    old = os.umask(0o022)
    try:
        (state / "leases.sqlite").touch()
    finally:
        os.umask(old)
    lab.start_gateway(config)
    wait_for_gateway(lab)
    assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, 18080, 600).result == 0
    assert mode(state) == 0o700
    store = sorted(p.name for p in state.iterdir() if p.name.startswith("leases.sqlite"))
    assert store == ["leases.sqlite", "leases.sqlite-shm", "leases.sqlite-wal"]
    assert {name: mode(state / name) for name in store} == dict.fromkeys(store, 0o600)


def test_state_directory_owned_by_another_user_is_refused(lab: Lab) -> None:
    config = lab.write_gateway_config(LAB_POLICY)
    state = lab.workdir / "state"
    os.chown(state, NOBODY, NOBODY)
    proc = lab.start_gateway(config)
    assert proc.wait(timeout=30) == 2
    log = lab.gateway_log()
    assert f"igd-server: refusing to start: state: {state} is owned by uid {NOBODY}" in log
    assert "Traceback" not in log
    assert not (state / "leases.sqlite").exists()
