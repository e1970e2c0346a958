"""WANIPv6FirewallControl:1 actions on the pinhole service (memory backend, in-memory store):
the spec's codes and owner rules, through the same dispatch as every UPnP action."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from igd.pinhole import PinholeRules
from igd.proto.description import DeviceTree, ServiceKind
from igd.proto.soap import SoapRequest
from igd.server.backends.pinholes import MemoryPinholeBackend, entries_of
from igd.server.interfaces import ExternalAddress
from igd.server.pinhole_store import PinholeStore
from igd.server.pinholes import PinholeService
from igd.server.upnp.actions import Actions
from igd.server.upnp.errors import UpnpError
from igd.server.upnp.pinholes import PinholeActions

LAN = IPv6Network("2001:db8:0:77::/64")
GATEWAY = IPv6Address("2001:db8:0:77::1")
A = IPv6Address("2001:db8:0:77::a")
A_TEMPORARY = IPv6Address("2001:db8:0:77:5c1e:2a:9f1:77")
B = IPv6Address("2001:db8:0:77::b")
FC = ServiceKind.WAN_IPV6_FIREWALL_CONTROL
TYPE = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
TREE = DeviceTree.build("3f2c1e7a-4b5d-4c6e-8f90-0123456789ab", 2, pinholes=True)
HOSTS = {A: "aa", A_TEMPORARY: "aa", B: "bb", IPv4Address("192.168.77.10"): "aa"}


def same_host(a: object, b: object) -> bool:
    """A neighbour table in which A's addresses share one MAC."""
    return a == b or (a in HOSTS and HOSTS.get(a) == HOSTS.get(b))  # type: ignore[index]


class Gateway:
    """The dispatch and a memory pinhole service, at a fixed clock."""

    def __init__(self, tmp: Path | None = None, **rules: object) -> None:
        self.backend = MemoryPinholeBackend()
        self.store = PinholeStore(tmp or Path(":memory:"))
        defaults: dict[str, object] = {"own_addresses": frozenset({GATEWAY})}
        self.service = PinholeService(
            PinholeRules((LAN,), **(defaults | rules)),  # type: ignore[arg-type]
            self.backend,
            self.store,
        )
        actions = PinholeActions(self.service, same=same_host, clock=lambda: 100.0)
        self.actions = Actions(None, ExternalAddress("lo"), "lo", pinholes=actions)  # type: ignore[arg-type]

    async def call(self, action: str, client: IPv4Address | IPv6Address = A,
                   **args: object) -> dict[str, str]:  # fmt: skip
        request = SoapRequest(TYPE, action, tuple((k, str(v)) for k, v in args.items()))
        response = await self.actions.invoke(TREE, FC, 1, request, client)
        return dict(response.arguments)

    async def add(self, client: IPv4Address | IPv6Address = A, **change: object) -> int:
        args: dict[str, object] = {
            "RemoteHost": "", "RemotePort": 0, "InternalClient": A,
            "InternalPort": 8080, "Protocol": 6, "LeaseTime": 600,
        }  # fmt: skip
        return int((await self.call("AddPinhole", client, **(args | change)))["UniqueID"])


async def refused(coroutine: object) -> int:
    with pytest.raises(UpnpError) as caught:
        await coroutine  # type: ignore[misc]
    return caught.value.code


@pytest.fixture
async def gw() -> Gateway:
    made = Gateway()
    await made.service.restore(now=100.0)
    return made


async def test_add_returns_a_unique_id_and_the_same_tuple_renews_it(gw: Gateway) -> None:
    first = await gw.add()
    assert 0 < first <= 0xFFFF
    assert await gw.add(LeaseTime=1200) == first  # §2.4.4: same 5-tuple, same UniqueID
    assert await gw.add(InternalPort=8081) != first
    hole = gw.service.by_uid(first)
    assert hole is not None and hole.remaining(100.0) == 1200
    assert gw.backend.held  # committed to the kernel side


@pytest.mark.parametrize(
    ("change", "wanted"),
    [
        ({"InternalClient": ""}, 708),
        ({"InternalClient": "*"}, 708),
        ({"InternalPort": 0}, 706),
        ({"Protocol": 65535}, 707),
        ({"Protocol": 1}, 705),
        ({"LeaseTime": 0}, 402),
        ({"LeaseTime": 86401}, 402),
        ({"RemoteHost": "192.0.2.1"}, 402),
        ({"InternalClient": "nonsense"}, 402),
        ({"InternalClient": GATEWAY}, 606),
        ({"InternalClient": B}, 606),
        ({"InternalPort": 80}, 606),
    ],
)
async def test_add_refusals_have_the_spec_codes(
    gw: Gateway, change: dict[str, object], wanted: int
) -> None:
    assert await refused(gw.add(**change)) == wanted
    assert not gw.backend.held and gw.service.count() == 0


async def test_quota_and_a_full_table_are_pinhole_space_exhausted() -> None:
    gw = Gateway(max_per_client=1)
    await gw.service.restore(now=100.0)
    await gw.add()
    assert await refused(gw.add(InternalPort=8081)) == 701


async def test_no_lan_prefix_means_inbound_pinholes_not_allowed() -> None:
    gw = Gateway()
    gw.service._holes.rules = PinholeRules(())  # an [ipv6] section with no LAN prefix
    status = await gw.call("GetFirewallStatus")
    assert status == {"FirewallEnabled": "1", "InboundPinholeAllowed": "0"}
    assert await refused(gw.add()) == 703


async def test_only_the_owner_host_updates_deletes_and_reads(gw: Gateway) -> None:
    uid = await gw.add()
    for action, extra in (("UpdatePinhole", {"NewLeaseTime": 60}), ("DeletePinhole", {}),
                          ("GetPinholePackets", {}), ("CheckPinholeWorking", {})):  # fmt: skip
        assert await refused(gw.call(action, B, UniqueID=uid, **extra)) == 606
        assert await refused(gw.call(action, A, UniqueID=uid + 100, **extra)) == 704
    # The same host from its temporary address (one MAC in the neighbour table).
    await gw.call("UpdatePinhole", A_TEMPORARY, UniqueID=uid, NewLeaseTime=900)
    hole = gw.service.by_uid(uid)
    assert hole is not None and hole.remaining(100.0) == 900
    await gw.call("DeletePinhole", A_TEMPORARY, UniqueID=uid)
    assert gw.service.by_uid(uid) is None and not gw.backend.held


async def test_a_host_may_ask_from_another_address_but_not_for_another_host(gw: Gateway) -> None:
    uid = await gw.add(A_TEMPORARY)
    hole = gw.service.by_uid(uid)
    assert hole is not None and hole.owner.client == A  # the host, by its InternalClient
    assert await gw.add() == uid  # and from its main address it renews the same pinhole
    assert await gw.add(IPv4Address("192.168.77.10")) == uid  # or over IPv4
    assert await refused(gw.add(IPv4Address("192.168.77.11"))) == 606


async def test_packets_and_working_follow_the_kernel_counters(gw: Gateway) -> None:
    uid = await gw.add()
    assert await refused(gw.call("CheckPinholeWorking", UniqueID=uid)) == 709
    assert await gw.call("GetPinholePackets", UniqueID=uid) == {"PinholePackets": "0"}
    hole = gw.service.by_uid(uid)
    assert hole is not None
    gw.backend.counts[entries_of(hole)[0]] = 7
    assert await gw.call("GetPinholePackets", UniqueID=uid) == {"PinholePackets": "7"}
    assert await gw.call("CheckPinholeWorking", UniqueID=uid) == {"IsWorking": "1"}


async def test_outbound_timeout_reads_conntrack(gw: Gateway, tmp_path: Path) -> None:
    actions = gw.actions.pinholes
    assert actions is not None
    actions.conntrack = tmp_path
    (tmp_path / "nf_conntrack_udp_timeout_stream").write_text("180\n")
    args = {"RemoteHost": "", "RemotePort": 0, "InternalClient": A, "InternalPort": 5000}
    udp = await gw.call("GetOutboundPinholeTimeout", Protocol=17, **args)
    assert udp == {"OutboundPinholeTimeout": "180"}
    tcp = await gw.call("GetOutboundPinholeTimeout", Protocol=6, **args)
    assert tcp == {"OutboundPinholeTimeout": "7440"}  # unreadable: RFC 6092 REC-35's floor
    assert await refused(gw.call("GetOutboundPinholeTimeout", Protocol=58, **args)) == 705


async def test_unique_ids_survive_a_restart(tmp_path: Path) -> None:
    first = Gateway(tmp_path / "leases.sqlite")
    await first.service.restore(now=100.0)
    ids = [await first.add(InternalPort=port) for port in (8080, 8081, 8082)]
    await first.call("DeletePinhole", UniqueID=ids[0])
    await first.service.stop(flush=False)
    second = Gateway(tmp_path / "leases.sqlite")
    await second.service.restore(now=100.0)
    assert [second.service.by_uid(uid) is not None for uid in ids] == [False, True, True]
    assert await second.add(InternalPort=8082) == ids[2]
    assert await second.add(InternalPort=8080) not in ids[1:]


async def test_ipv4_port_mapping_actions_are_refused_over_ipv6() -> None:
    actions = Actions(None, ExternalAddress("lo"), "lo")  # type: ignore[arg-type]
    request = SoapRequest("urn:schemas-upnp-org:service:WANIPConnection:2", "DeletePortMapping",
                          (("NewRemoteHost", ""), ("NewExternalPort", "80"),
                           ("NewProtocol", "TCP")))  # fmt: skip
    with pytest.raises(UpnpError) as caught:
        await actions.invoke(TREE, ServiceKind.WAN_IP_CONNECTION, 2, request, A)
    assert caught.value.code == 606


async def test_a_store_from_before_unique_ids_is_read_and_numbered(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "leases.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE pinholes (internal_address TEXT NOT NULL, protocol TEXT NOT NULL,"
        " internal_port INTEGER NOT NULL, remote TEXT NOT NULL, mechanism TEXT NOT NULL,"
        " client TEXT NOT NULL, nonce BLOB, description TEXT NOT NULL, created REAL NOT NULL,"
        " expires REAL NOT NULL, filters TEXT NOT NULL,"
        " PRIMARY KEY (internal_address, protocol, internal_port, remote)) WITHOUT ROWID"
    )
    db.execute("INSERT INTO pinholes VALUES (?, 'tcp', 8080, '', 'upnp', ?, NULL, '', ?, ?, '')",
               (str(A), str(A), 1.0, 4e9))  # fmt: skip
    db.commit()
    db.close()
    gw = Gateway(path)
    assert await gw.service.restore(now=100.0) == 1
    (hole,) = gw.service.pinholes()
    assert hole.uid > 0 and await gw.add() == hole.uid


HOSTILE = ["", " ", "-1", "0", "65536", "4294967296", "99999999999999999999", "²", "٣", "1e3",
           "0x50", "*", "::", "::ffff:192.168.77.10", "fe80::1%eth0", "fe80::1%", "ff02::1",
           "2001:db8:0:77::a/64", "[2001:db8:0:77::a]", "192.168.77.10", "A" * 3000, "\x00",
           "%00", "&lol;"]  # fmt: skip


async def test_hostile_arguments_get_upnp_errors_never_an_exception_or_a_change(
    gw: Gateway,
) -> None:
    uid = await gw.add()
    valid: dict[str, dict[str, object]] = {
        "GetOutboundPinholeTimeout": {"RemoteHost": "", "RemotePort": 0, "InternalClient": A,
                                      "InternalPort": 5000, "Protocol": 17},
        "AddPinhole": {"RemoteHost": "", "RemotePort": 0, "InternalClient": A,
                       "InternalPort": 8081, "Protocol": 6, "LeaseTime": 600},
        "UpdatePinhole": {"UniqueID": uid, "NewLeaseTime": 600},
        "DeletePinhole": {"UniqueID": uid},
        "GetPinholePackets": {"UniqueID": uid},
        "CheckPinholeWorking": {"UniqueID": uid},
    }  # fmt: skip
    for action, args in valid.items():
        for name in args:
            for value in HOSTILE:
                for client in (A, B, IPv4Address("192.168.77.11")):
                    try:
                        await gw.call(action, client, **(args | {name: value}))
                    except UpnpError:
                        pass
        # A missing argument is 402 (the missing-argument CVEs in miniupnpd).
        for name in args:
            trimmed = {k: v for k, v in args.items() if k != name}
            assert await refused(gw.call(action, A, **trimmed)) == 402
    # Whatever was opened on the way, A's first pinhole is still there, still A's.
    hole = gw.service.by_uid(uid)
    assert hole is not None and hole.owner.client == A
    assert all(h.key.internal_address == A for h in gw.service.pinholes())
