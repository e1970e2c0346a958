"""The lease store: what is committed comes back after a restart, expired leases do not."""

import sqlite3
import threading
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol, RemoteFilter
from igd.server.store import Clock, LeaseStore

CLIENT = IPv4Address("192.168.1.10")


def mapping(port: int, expires: float, **kw: object) -> Mapping:
    filters = (
        RemoteFilter(IPv4Network("198.51.100.0/24"), 0),
        RemoteFilter(IPv4Network("192.0.2.7/32"), 443),
    )
    return Mapping(
        key=MappingKey(Protocol.UDP, port, kw.pop("remote", None)),  # type: ignore[arg-type]
        internal_address=CLIENT,
        internal_port=port + 1,
        owner=Owner(Mechanism.PCP, CLIENT, b"\x01" * 12),
        created=1.0,
        expires=expires,
        description="game server ✓",
        filters=filters if port % 2 else (),
        peer_port=int(str(kw.pop("peer_port", 0))),
    )


def test_round_trip_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite"
    wanted = [
        mapping(1000, 500.0),
        mapping(1001, 900.0, remote=IPv4Address("198.51.100.9"), peer_port=3478),
    ]
    clock = Clock(wall=10_000.0, mono=0.0)
    store = LeaseStore(path)
    store.apply([], wanted, clock)
    store.close()
    # A later process: its monotonic clock starts elsewhere, the wall clock moved on 100 s.
    later = Clock(wall=10_100.0, mono=50.0)
    restored = LeaseStore(path).load(later, now=50.0)
    assert [m.key for m in restored] == [m.key for m in wanted]
    assert restored[0].expires == 450.0  # 400 s of lease were left, in the new clock
    assert restored[1].owner == wanted[1].owner
    assert restored[1].description == "game server ✓"
    assert restored[1].filters == wanted[1].filters and restored[0].filters == ()
    assert restored[1].peer_port == 3478 and restored[1].is_peer


def test_expired_leases_are_dropped_on_load(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite")
    clock = Clock(wall=0.0, mono=0.0)
    store.apply([], [mapping(1, 10.0), mapping(2, 30.0)], clock)
    assert [m.external_port for m in store.load(clock, now=20.0)] == [2]
    assert [m.external_port for m in store.load(clock, now=0.0)] == [2]


def test_renewal_and_removal(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite")
    clock = Clock(wall=0.0, mono=0.0)
    old = mapping(1, 10.0)
    store.apply([], [old], clock)
    store.apply([old], [mapping(1, 99.0)], clock)
    assert [m.expires for m in store.load(clock, now=0)] == [99.0]
    store.apply([mapping(1, 99.0)], [], clock)
    assert store.load(clock, now=0) == []


def test_meta_survives_reopen(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite")
    store.set_meta("epoch_start", "123.5")
    store.close()
    assert LeaseStore(tmp_path / "l.sqlite").get_meta("epoch_start") == "123.5"


def test_one_port_on_two_external_addresses_persists_apart(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite"
    default = mapping(2000, 500.0)
    second = replace(default, key=replace(default.key, external_address=SECOND))
    clock = Clock(wall=10_000.0, mono=0.0)
    store = LeaseStore(path)
    store.apply([], [default, second], clock)
    store.apply([default], [], clock)
    store.close()
    restored = LeaseStore(path).load(clock, now=0.0)
    assert [m.key for m in restored] == [second.key]


def test_a_store_from_before_external_addresses_keeps_its_leases(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite"
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.execute(
        "INSERT INTO mappings VALUES"
        " ('tcp', 8080, '', '192.168.1.10', 8080, 'pcp', '192.168.1.10', NULL, 'web',"
        " 10000.0, 10600.0, '', 0)"
    )
    old.commit()
    old.close()
    clock = Clock(wall=10_000.0, mono=0.0)
    store = LeaseStore(path)
    (restored,) = store.load(clock, now=0.0)
    # Its rows hold the default address; the same port on another address can join it.
    assert restored.key == MappingKey(Protocol.TCP, 8080) and restored.description == "web"
    moved = replace(restored, key=replace(restored.key, external_address=SECOND))
    store.apply([], [moved], clock)
    assert {m.key for m in store.load(clock, now=0.0)} == {restored.key, moved.key}


SECOND = IPv4Address("203.0.113.9")
OLD_SCHEMA = """
CREATE TABLE mappings (
    protocol TEXT NOT NULL, external_port INTEGER NOT NULL, remote_host TEXT NOT NULL,
    internal_address TEXT NOT NULL, internal_port INTEGER NOT NULL, mechanism TEXT NOT NULL,
    client TEXT NOT NULL, nonce BLOB, description TEXT NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL, filters TEXT NOT NULL, peer_port INTEGER NOT NULL,
    PRIMARY KEY (protocol, external_port, remote_host)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


def _rows_in_database_file(path: Path, copy: Path) -> int:
    """Mappings in the database file alone, without its WAL (what a checkpoint copied)."""
    copy.write_bytes(path.read_bytes())
    db = sqlite3.connect(copy)
    try:
        return int(db.execute("SELECT count(*) FROM mappings").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not even the schema has been copied
    finally:
        db.close()


def test_checkpoint_thread_copies_commits_into_the_database_file(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite"
    store = LeaseStore(path, checkpoint_thread=True)
    try:
        clock = Clock(wall=0.0, mono=0.0)
        for port in range(1000, 1200):
            store.apply([], [mapping(port, 900.0)], clock)  # one commit each, as under load
        # No commit checkpointed on its own (SQLite's would at 1,000 WAL pages): the thread
        # does, a second after the first commit woke it.
        deadline = time.monotonic() + 10
        while _rows_in_database_file(path, tmp_path / "copy") < 200:
            assert time.monotonic() < deadline, "the checkpoint thread copied nothing"
            time.sleep(0.1)
    finally:
        store.close()
    threads = [t for t in threading.enumerate() if t.name == "igd-checkpoint"]
    assert threads == []  # close() ended it
    assert len(LeaseStore(path).load(Clock(wall=0.0, mono=0.0), now=0.0)) == 200
