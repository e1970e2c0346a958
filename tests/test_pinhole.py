"""The pinhole core: the admin's rules, ownership, quota, expiry and undo."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv6Address, IPv6Network

from igd.model import Mechanism, Protocol
from igd.pinhole import (
    PinholeChange,
    PinholeDeny,
    PinholeKey,
    PinholeOwner,
    PinholeRequest,
    PinholeRules,
    Pinholes,
    Refusal,
)

LAN = IPv6Network("2001:db8:0:77::/64")
A = IPv6Address("2001:db8:0:77::a")
B = IPv6Address("2001:db8:0:77::b")
GW = IPv6Address("2001:db8:0:77::1")


def request(client: IPv6Address = A, internal: IPv6Address | None = None, port: int = 8080,
            nonce: bytes = b"a" * 12, lifetime: int = 600) -> PinholeRequest:  # fmt: skip
    key = PinholeKey(internal or client, Protocol.TCP, port)
    return PinholeRequest(key, PinholeOwner(Mechanism.PCP, client, nonce), lifetime)


def why(result: object) -> Refusal | None:
    return result.refusal if isinstance(result, PinholeDeny) else None


def table(**rules: object) -> Pinholes:
    return Pinholes(PinholeRules((LAN,), own_addresses=frozenset({GW}), **rules))  # type: ignore[arg-type]


def test_a_lan_host_opens_renews_and_closes_its_own_pinhole() -> None:
    holes = table()
    opened = holes.open(request(), now=0)
    assert isinstance(opened, PinholeChange) and opened.added[0].expires == 600
    renewed = holes.open(request(lifetime=1200), now=100)
    assert isinstance(renewed, PinholeChange) and renewed.removed == opened.added
    assert holes.get(request().key).expires == 1300  # type: ignore[union-attr]
    closed = holes.close(request().key, request().owner)
    assert isinstance(closed, PinholeChange) and len(holes) == 0


def test_default_deny_outside_the_lan_prefixes_low_ports_and_the_gateway() -> None:
    holes = table()
    outsider = IPv6Address("2001:db8:0:1::2")
    assert why(holes.open(request(client=outsider), now=0)) is Refusal.NOT_ALLOWED
    assert why(holes.open(request(port=22), now=0)) is Refusal.NOT_ALLOWED
    assert why(holes.open(request(client=GW), now=0)) is Refusal.NOT_ALLOWED
    assert why(holes.open(request(client=LAN.network_address), now=0)) is Refusal.NOT_ALLOWED
    assert len(holes) == 0


def test_secure_mode_refuses_third_party_pinholes_unless_turned_off() -> None:
    assert why(table().open(request(internal=B), now=0)) is Refusal.THIRD_PARTY
    assert isinstance(table(secure_mode=False).open(request(internal=B), now=0), PinholeChange)


def test_another_client_or_nonce_cannot_touch_a_pinhole() -> None:
    holes = table(secure_mode=False)
    holes.open(request(), now=0)
    assert why(holes.open(request(nonce=b"x" * 12), now=1)) is Refusal.NOT_OWNER
    thief = request(client=B, internal=A)
    assert why(holes.open(thief, now=1)) is Refusal.NOT_OWNER
    assert why(holes.close(thief.key, thief.owner)) is Refusal.NOT_OWNER
    assert holes.get(request().key).expires == 600  # type: ignore[union-attr]


def test_quota_per_client() -> None:
    holes = table(max_per_client=2)
    for port in (2000, 2001):
        assert isinstance(holes.open(request(port=port), now=0), PinholeChange)
    assert why(holes.open(request(port=2002), now=0)) is Refusal.QUOTA
    assert isinstance(holes.open(request(port=2000), now=1), PinholeChange)  # renewal
    assert isinstance(holes.open(request(client=B, port=2002), now=0), PinholeChange)


def test_the_whole_table_is_bounded_too() -> None:
    holes = table(max_pinholes=2)
    clients = [IPv6Address(f"2001:db8:0:77::{i:x}") for i in range(0x10, 0x13)]
    assert isinstance(holes.open(request(client=clients[0]), now=0), PinholeChange)
    assert isinstance(holes.open(request(client=clients[1]), now=0), PinholeChange)
    assert why(holes.open(request(client=clients[2]), now=0)) is Refusal.FULL
    assert isinstance(holes.open(request(client=clients[0]), now=1), PinholeChange)  # renewal


def test_lifetimes_are_clamped_and_expiry_removes_at_the_deadline() -> None:
    holes = table()
    holes.open(request(lifetime=5), now=0)  # raised to 120 s (RFC 6887 §15)
    holes.open(request(port=9000, lifetime=10**6), now=0)  # cut to 24 h
    holes.open(request(lifetime=5), now=50)  # renewal moves the deadline to 170
    assert holes.expire(now=169).removed == ()
    assert [h.key.internal_port for h in holes.expire(now=170).removed] == [8080]
    assert holes.next_deadline() == 86400


def test_undo_restores_what_the_change_replaced() -> None:
    holes = table()
    first = holes.open(request(), now=0)
    second = holes.open(request(lifetime=3000), now=10)
    assert isinstance(first, PinholeChange) and isinstance(second, PinholeChange)
    holes.undo(second)
    assert holes.get(request().key) == first.added[0]
    holes.undo(first)
    assert len(holes) == 0 and holes.of_client(A) == []


def test_restore_drops_expired_and_no_longer_allowed_pinholes() -> None:
    holes = table()
    kept = holes.open(request(), now=0)
    low = holes.open(request(port=1500), now=0)
    assert isinstance(kept, PinholeChange) and isinstance(low, PinholeChange)
    stricter = table(min_port=2000)
    dropped = stricter.restore([*kept.added, *low.added], now=10)
    assert dropped == list(low.added) and len(stricter) == 1
    assert table().restore(kept.added, now=600) == list(kept.added)  # expired


def test_unique_ids_are_kept_by_renewals_and_handed_out_again_only_when_free() -> None:
    holes = table()
    first = holes.open(request(), now=0)
    second = holes.open(request(port=8081), now=0)
    assert isinstance(first, PinholeChange) and isinstance(second, PinholeChange)
    uid = first.added[0].uid
    assert uid and second.added[0].uid != uid
    renewed = holes.open(request(lifetime=900), now=10)
    assert isinstance(renewed, PinholeChange) and renewed.added[0].uid == uid
    assert holes.by_uid(uid) == renewed.added[0]
    holes.close(request().key, request().owner)
    assert holes.by_uid(uid) is None
    # The freed id is not the next one handed out: the counter goes on.
    third = holes.open(request(port=8082), now=20)
    assert isinstance(third, PinholeChange) and third.added[0].uid not in (uid, 0)


def test_restore_keeps_stored_unique_ids_and_numbers_the_rest() -> None:
    holes = table()
    opened = holes.open(request(), now=0)
    assert isinstance(opened, PinholeChange)
    stored = replace(opened.added[0], uid=4242)
    clash = replace(holes.open(request(port=9000), now=0).added[0], uid=4242)  # type: ignore[union-attr]
    legacy = replace(clash, key=replace(clash.key, internal_port=9001), uid=0)
    again = table()
    assert again.restore([stored, clash, legacy], now=1) == []
    assert again.by_uid(4242) == stored
    uids = {hole.uid for hole in again}
    assert len(uids) == 3 and 0 not in uids
