"""The lease store: every granted mapping, persisted in SQLite under the state directory.

A change is committed before the client hears of it, so a mapping whose success reply
was sent survives `kill -9` of the daemon. WAL mode with synchronous=NORMAL makes each
commit a write(2) into the WAL without fsync: durable against a crashed process, not
against power loss (then the kernel table is gone too and clients re-request). The daemon's
store copies the WAL into the database file (a checkpoint, with its two fsyncs) on a thread of
its own, so that no request waits for a disk flush.
Times are stored as wall-clock seconds, since monotonic time does not survive a reboot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from igd.model import (
    Mapping,
    MappingKey,
    Mechanism,
    Owner,
    Protocol,
    RemoteFilter,
    address_text,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mappings (
    protocol TEXT NOT NULL,
    external_port INTEGER NOT NULL,
    remote_host TEXT NOT NULL,
    internal_address TEXT NOT NULL,
    internal_port INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    client TEXT NOT NULL,
    nonce BLOB,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    filters TEXT NOT NULL,
    peer_port INTEGER NOT NULL,
    external_address TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (protocol, external_port, remote_host, external_address)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""

log = logging.getLogger("igd.store")

CHECKPOINT_DELAY = 1.0
"""Seconds the checkpoint thread lets commits gather in the WAL before copying them: at
most one checkpoint (two fsyncs) a second however fast mappings change."""

POLICY_KEY = "policy_sha256"
"""Meta key: `file_digest` of the policy file the stored leases were granted under."""

_UPSERT = "INSERT OR REPLACE INTO mappings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_DELETE = (
    "DELETE FROM mappings WHERE protocol = ? AND external_port = ? AND remote_host = ?"
    " AND external_address = ?"
)
_MIGRATE_ADDRESS = """
ALTER TABLE mappings RENAME TO mappings_before_addresses;
{schema}
INSERT INTO mappings SELECT *, '' FROM mappings_before_addresses;
DROP TABLE mappings_before_addresses;
"""
"""Stores written before external addresses: their rows hold the default address ('')."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: which policy the persisted leases were granted under."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Clock:
    """Converts between the core's monotonic seconds and persisted wall-clock seconds."""

    def __init__(self, wall: float | None = None, mono: float | None = None) -> None:
        self._offset = (time.time() if wall is None else wall) - (
            time.monotonic() if mono is None else mono
        )

    def to_wall(self, mono: float) -> float:
        return mono + self._offset

    def to_mono(self, wall: float) -> float:
        return wall - self._offset


STATE_DIRECTORY_MODE = 0o700
STATE_FILE_MODE = 0o600
"""The store holds every client, mapping and description, and the secret UPnP control-URL
token: no other local user may read it (nor list the directory)."""

SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


class StateDirectoryError(ValueError):
    """The state directory cannot be made private to the daemon's user."""


def secure_state_directory(directory: Path, names: Iterable[str] = ()) -> None:
    """Create `directory` (0700) or tighten it and the files `names` in it (0600).

    Refuses with StateDirectoryError what chmod cannot make private: a directory or file
    owned by another user (that user could swap or reopen it), or one that is not a
    directory or regular file (a symlink could point anywhere)."""
    directory.mkdir(mode=STATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    uid = os.geteuid()
    _tighten(directory, stat.S_ISDIR, "a directory", STATE_DIRECTORY_MODE, uid)
    for name in names:
        path = directory / name
        if os.path.lexists(path):
            _tighten(path, stat.S_ISREG, "a regular file", STATE_FILE_MODE, uid)


def _tighten(path: Path, kind: Any, what: str, mode: int, uid: int) -> None:
    info = path.lstat()
    if not kind(info.st_mode):
        raise StateDirectoryError(f"state: {path} is not {what}")
    if info.st_uid != uid:
        raise StateDirectoryError(
            f"state: {path} is owned by uid {info.st_uid}, not by the daemon's user (uid"
            f" {uid}); chown it to uid {uid} or choose another [state] directory"
        )
    if stat.S_IMODE(info.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(info.st_mode) & mode)


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """The lease store file (`:memory:` for tests and `--dry-run`) in WAL mode with
    synchronous=NORMAL, `schema` created, the file and its directory private to the daemon:
    one way to open it for the mapping and the pinhole stores alike."""
    private = str(path) != ":memory:"
    files = [path.name + suffix for suffix in ("", *SQLITE_SIDE_FILES)]
    if private:
        secure_state_directory(path.parent, files)
    # SQLite creates the -wal and -shm files itself: a private umask while it opens them
    # (and chmod afterwards, for files an older version left behind) keeps them 0600.
    mask = os.umask(0o077)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
    finally:
        os.umask(mask)
    if private:
        secure_state_directory(path.parent, files)
    return db


class LeaseStore:
    """Mappings and a little daemon state (the epoch's start) in one SQLite file."""

    def __init__(self, path: Path, *, checkpoint_thread: bool = False) -> None:
        """With checkpoint_thread (the daemon's store), checkpoints run on a thread of their
        own instead of inside whichever commit fills the WAL past SQLite's threshold."""
        self.path = path
        self._db = open_database(path, _SCHEMA)
        self._migrate()
        self._checkpoints: _Checkpointer | None = None
        if checkpoint_thread and str(path) != ":memory:":
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpoints = _Checkpointer(path)

    def _migrate(self) -> None:
        """Bring a store of an older igd to this schema (its leases kept)."""
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(mappings)")]
        if columns and "external_address" not in columns:
            # The key changes, which SQLite's ALTER TABLE cannot do: copy the rows over.
            schema = _SCHEMA.split(";")[0] + ";"
            self._db.executescript("BEGIN;" + _MIGRATE_ADDRESS.format(schema=schema) + "COMMIT;")

    def load(self, clock: Clock, *, now: float) -> list[Mapping]:
        """Every unexpired mapping, in monotonic time; expired rows are deleted."""
        wall_now = clock.to_wall(now)
        with self._transaction():
            self._db.execute("DELETE FROM mappings WHERE expires <= ?", (wall_now,))
        rows = self._db.execute("SELECT * FROM mappings ORDER BY created").fetchall()
        loader = _Loader(clock)
        return [loader.mapping(row) for row in rows]

    def apply(self, removed: Iterable[Mapping], added: Iterable[Mapping], clock: Clock) -> None:
        """Persist one change atomically: delete removed keys, then write added mappings."""
        with self._transaction():
            self._db.executemany(_DELETE, [_key_row(m.key) for m in removed])
            self._db.executemany(_UPSERT, [_row_of(m, clock) for m in added])

    def replace(
        self, keys: Iterable[MappingKey], mappings: Iterable[Mapping], clock: Clock
    ) -> None:
        """Make the rows of these keys hold exactly these mappings (whose keys are among
        them), atomically, whatever the rows held before."""
        mappings = list(mappings)
        kept = {m.key for m in mappings}
        gone = [_key_row(k) for k in keys if k not in kept]
        with self._transaction():
            if gone:
                self._db.executemany(_DELETE, gone)
            if mappings:
                self._db.executemany(_UPSERT, [_row_of(m, clock) for m in mappings])

    def clear(self) -> None:
        """Forget every mapping."""
        with self._transaction():
            self._db.execute("DELETE FROM mappings")

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.stop()
        # The last connection to close checkpoints what is left and removes the WAL.
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._checkpoints)


class _Transaction:
    """BEGIN … COMMIT, or ROLLBACK on error (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection, checkpoints: _Checkpointer | None) -> None:
        self._db = db
        self._checkpoints = checkpoints

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")
        if kind is None and self._checkpoints is not None:
            self._checkpoints.wake()


class _Checkpointer:
    """A thread that copies committed WAL frames into the database file, a second after a
    commit wakes it. A checkpoint fsyncs the WAL and the database (synchronous=NORMAL):
    inside a commit that blocked the event loop for the flush, and cost every request
    waiting behind it. PASSIVE never blocks the writer, and the thread's own connection
    runs SQLite without the GIL, beside the event loop."""

    def __init__(self, path: Path) -> None:
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path,), name="igd-checkpoint", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Something was committed: checkpoint it soon."""
        if not self._wakeup.is_set():
            self._wakeup.set()

    def stop(self) -> None:
        """End the thread (the store's close checkpoints what is left)."""
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _run(self, path: Path) -> None:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        failing = False
        try:
            while True:
                self._wakeup.wait()
                if self._stopping.wait(CHECKPOINT_DELAY):
                    return
                self._wakeup.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:
                    # The commits themselves still land in the WAL; say so once, not per try.
                    if not failing:
                        log.warning("lease store: checkpoint failed (the WAL grows): %s", error)
                    failing = True
                else:
                    if failing:
                        log.info("lease store: checkpoints work again")
                    failing = False
        finally:
            db.close()


def _key_row(key: MappingKey) -> tuple[str, int, str, str]:
    return (
        str(key.protocol),
        key.external_port,
        _text(key.remote_host),
        _text(key.external_address),
    )


def _text(address: IPv4Address | None) -> str:
    """A key's optional address as stored ('' for none)."""
    return "" if address is None else address_text(address)


def _row_of(mapping: Mapping, clock: Clock) -> tuple[object, ...]:
    key = mapping.key
    return (
        str(key.protocol),
        key.external_port,
        _text(key.remote_host),
        address_text(mapping.internal_address),
        mapping.internal_port,
        str(mapping.owner.mechanism),
        address_text(mapping.owner.client),
        mapping.owner.nonce,
        mapping.description,
        clock.to_wall(mapping.created),
        clock.to_wall(mapping.expires),
        " ".join(f"{f.network}:{f.port}" for f in mapping.filters) if mapping.filters else "",
        mapping.peer_port,
        _text(key.external_address),
    )


class _Loader:
    """Builds mappings from rows, sharing one object per distinct address and owner: a
    restore of 50,000 leases from a few hundred clients then costs far less time and memory."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.addresses: dict[str, IPv4Address] = {}
        self.owners: dict[tuple[str, str, bytes | None], Owner] = {}

    def address(self, text: str) -> IPv4Address:
        found = self.addresses.get(text)
        if found is None:
            found = self.addresses[text] = IPv4Address(text)
        return found

    def mapping(self, row: tuple[Any, ...]) -> Mapping:
        (protocol, port, remote, internal, internal_port, mechanism, client, nonce,
         description, created, expires, filters, peer_port, external) = row  # fmt: skip
        owner_key = (mechanism, client, nonce)
        owner = self.owners.get(owner_key)
        if owner is None:
            owner = Owner(Mechanism(mechanism), self.address(client), nonce)
            self.owners[owner_key] = owner
        return Mapping(
            key=MappingKey(
                Protocol(protocol),
                port,
                self.address(remote) if remote else None,
                self.address(external) if external else None,
            ),
            internal_address=self.address(internal),
            internal_port=internal_port,
            owner=owner,
            created=self.clock.to_mono(created),
            expires=self.clock.to_mono(expires),
            description=description,
            filters=tuple(_filter_of(text) for text in filters.split()) if filters else (),
            peer_port=peer_port,
        )


def _filter_of(text: str) -> RemoteFilter:
    network, _, port = text.rpartition(":")
    return RemoteFilter(IPv4Network(network), int(port))
