"""The pinhole lease store opens a file an igd from before UniqueIDs wrote: its pinholes
come back, each with a UniqueID of its own."""

from __future__ import annotations

import sqlite3
import time
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

from igd.pinhole import PinholeRules
from igd.server.backends.pinholes import MemoryPinholeBackend, entries_of
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import PinholeService

LAN = IPv6Network("2001:db8:0:77::/64")
A = "2001:db8:0:77::a"

_BEFORE_UIDS = """
CREATE TABLE pinholes (
    internal_address TEXT NOT NULL, protocol TEXT NOT NULL, internal_port INTEGER NOT NULL,
    remote TEXT NOT NULL, mechanism TEXT NOT NULL, client TEXT NOT NULL, nonce BLOB,
    description TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
    filters TEXT NOT NULL,
    PRIMARY KEY (internal_address, protocol, internal_port, remote)
) WITHOUT ROWID;
CREATE TABLE pinhole_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


async def test_a_store_from_before_unique_ids_keeps_its_pinholes(tmp_path: Path) -> None:
    path = tmp_path / "pinholes.sqlite"
    old = sqlite3.connect(path)
    old.executescript(_BEFORE_UIDS)
    wall = time.time()
    rows = [
        (A, "tcp", port, "", "upnp", A, None, f"old {port}", wall - 10, wall + 600, "")
        for port in (8080, 8081)
    ]
    old.executemany("INSERT INTO pinholes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    old.commit()
    old.close()

    backend = MemoryPinholeBackend()
    service = PinholeService(PinholeRules((LAN,)), backend, PinholeStore(path))
    assert await service.restore(now=time.monotonic()) == 2
    holes = service.pinholes()
    uids = {hole.uid for hole in holes}
    assert len(uids) == 2 and 0 not in uids
    assert all(service.by_uid(hole.uid) == hole for hole in holes)
    assert {hole.key.internal_port for hole in holes} == {8080, 8081}
    assert IPv6Address(A) in {hole.owner.client for hole in holes}
    assert set(backend.held) == {e for hole in holes for e in entries_of(hole)}
    await service.stop(flush=False)
