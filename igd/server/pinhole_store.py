"""The pinhole lease store: a `pinholes` table in the daemon's SQLite lease store file.

Its own connection to the same file (WAL mode allows it), so the IPv4 lease store's code is
untouched. Each change is committed before the client hears of it (kill -9 safe, as in
`store.py`); times are wall-clock seconds, converted at load.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from igd.model import Mechanism, Protocol, address_text
from igd.pinhole import Pinhole, PinholeFilter, PinholeKey, PinholeOwner
from igd.server.store import Clock, open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pinholes (
    internal_address TEXT NOT NULL,
    protocol TEXT NOT NULL,
    internal_port INTEGER NOT NULL,
    remote TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    client TEXT NOT NULL,
    nonce BLOB,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    filters TEXT NOT NULL,
    uid INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (internal_address, protocol, internal_port, remote)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pinhole_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""
_UPSERT = "INSERT OR REPLACE INTO pinholes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT = (
    "SELECT internal_address, protocol, internal_port, remote, mechanism, client, nonce,"
    " description, created, expires, filters, uid FROM pinholes ORDER BY created"
)
_DELETE = (
    "DELETE FROM pinholes WHERE internal_address = ? AND protocol = ? AND internal_port = ?"
    " AND remote = ?"
)


class PinholeStore:
    """Pinholes persisted in SQLite (`:memory:` for `--dry-run` and tests)."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(pinholes)")}
        if "uid" not in columns:
            # A store written before UniqueIDs: restore hands its pinholes new ones.
            self._db.execute("ALTER TABLE pinholes ADD COLUMN uid INTEGER NOT NULL DEFAULT 0")

    def load(self, clock: Clock, *, now: float) -> list[Pinhole]:
        """Every unexpired pinhole, in monotonic time; expired rows are deleted."""
        self._db.execute("DELETE FROM pinholes WHERE expires <= ?", (clock.to_wall(now),))
        rows = self._db.execute(_SELECT).fetchall()
        return [_pinhole_of(row, clock) for row in rows]

    def apply(self, removed: Iterable[Pinhole], added: Iterable[Pinhole], clock: Clock) -> None:
        """Persist one change atomically."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_DELETE, [_key_row(h.key) for h in removed])
            self._db.executemany(_UPSERT, [_row_of(h, clock) for h in added])
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def replace_all(self, pinholes: Iterable[Pinhole], clock: Clock) -> None:
        """Make the table hold exactly `pinholes` (after a restore dropped some)."""
        self._db.execute("BEGIN")
        try:
            self._db.execute("DELETE FROM pinholes")
            self._db.executemany(_UPSERT, [_row_of(h, clock) for h in pinholes])
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM pinhole_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO pinhole_meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self._db.close()


def _key_row(key: PinholeKey) -> tuple[str, str, int, str]:
    remote = f"{key.remote.network}:{key.remote.port}" if key.remote else ""
    return (address_text(key.internal_address), str(key.protocol), key.internal_port, remote)


def _row_of(hole: Pinhole, clock: Clock) -> tuple[object, ...]:
    return (
        *_key_row(hole.key),
        str(hole.owner.mechanism),
        address_text(hole.owner.client),
        hole.owner.nonce,
        hole.description,
        clock.to_wall(hole.created),
        clock.to_wall(hole.expires),
        " ".join(f"{f.network}:{f.port}" for f in hole.filters),
        hole.uid,
    )


def _filter_of(text: str) -> PinholeFilter:
    # "2001:db8::/64:53": the port follows the last colon, after the prefix length.
    network, _, port = text.rpartition(":")
    return PinholeFilter(IPv6Network(network), int(port))


def _pinhole_of(row: tuple[Any, ...], clock: Clock) -> Pinhole:
    (internal, protocol, port, remote, mechanism, client, nonce, description, created,
     expires, filters, uid) = row  # fmt: skip
    key = PinholeKey(
        IPv6Address(internal), Protocol(protocol), port, _filter_of(remote) if remote else None
    )
    return Pinhole(
        key=key,
        owner=PinholeOwner(Mechanism(mechanism), IPv6Address(client), nonce),
        created=clock.to_mono(created),
        expires=clock.to_mono(expires),
        description=description,
        filters=tuple(_filter_of(t) for t in filters.split()) if filters else (),
        uid=int(uid),
    )
