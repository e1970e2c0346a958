"""The lease store: what is committed comes back after a restart, expired leases do not."""

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
