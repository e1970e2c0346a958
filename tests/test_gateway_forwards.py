"""Static forwards in the gateway core: they hold their ports against every mechanism, and a
reload changes only what changed."""

from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network

from igd.decision import Reason
from igd.gateway import Gateway, Granted, Refused
from igd.model import MappingKey, MapRequest, Mechanism, Protocol
from igd.policy import Policy

A = IPv4Address("192.168.1.10")
SERVER = "192.168.1.100"
WALL = 1_800_000_000.0

BASE = """
[defaults]
action = "allow"
min_lease = 1

[[forwards]]
name = "portal"
protocols = ["tcp"]
external_ports = "443"
internal_address = "192.168.1.100"
internal_port = 8443

[[forwards]]
name = "ssh"
protocols = ["tcp"]
external_ports = "2222"
internal_address = "192.168.1.101"
internal_port = 22
"""


def gateway(text: str = BASE) -> Gateway:
    g = Gateway(Policy.parse(text))
    g.sync_forwards(None, now=0, wall=WALL)
    return g


def ask(
    port: int, *, exact: bool, mechanism: Mechanism = Mechanism.NATPMP, **kw: object
) -> MapRequest:
    fields: dict[str, object] = dict(
        mechanism=mechanism,
        client=A,
        protocol=Protocol.TCP,
        internal_address=A,
        internal_port=port,
        external_port=port,
        lifetime=600,
        exact_port=exact,
    )
    fields.update(kw)
    return MapRequest(**fields)  # type: ignore[arg-type]


def test_dynamic_requests_never_take_a_forwards_port() -> None:
    g = gateway()
    exact = g.map(ask(443, exact=True, mechanism=Mechanism.UPNP), now=1)
    assert isinstance(exact, Refused)
    assert exact.deny.reason is Reason.PORT_IN_USE
    assert exact.existing is not None and exact.existing.description == "portal"
    moved = g.map(ask(443, exact=False), now=1)
    assert isinstance(moved, Granted)
    assert moved.mapping.external_port != 443
    # The companion port (RFC 6886 §3.3) and the port for one remote host are held too.
    udp = g.map(ask(443, exact=True, protocol=Protocol.UDP), now=1)
    assert isinstance(udp, Refused) and udp.deny.reason is Reason.PORT_IN_USE
    remote = g.map(
        ask(443, exact=True, mechanism=Mechanism.UPNP, remote_host=IPv4Address("203.0.113.9")),
        now=1,
    )
    assert isinstance(remote, Refused) and remote.deny.reason is Reason.PORT_IN_USE


def test_a_client_cannot_renew_a_forward_from_its_internal_endpoint() -> None:
    g = gateway()
    server = IPv4Address(SERVER)
    renew = g.map(ask(8443, exact=False, client=server, internal_address=server), now=1)
    assert isinstance(renew, Granted)
    assert not renew.renewal
    assert renew.mapping.external_port != 443
    assert g.table.get(MappingKey(Protocol.TCP, 443)).description == "portal"  # type: ignore[union-attr]


def test_reload_leaves_unchanged_forwards_alone_and_replaces_changed_ones() -> None:
    g = gateway()
    portal = g.table.get(MappingKey(Protocol.TCP, 443))
    ssh = g.table.get(MappingKey(Protocol.TCP, 2222))
    changed = BASE.replace("internal_port = 22\n", "internal_port = 2022\n")
    change = g.reload(Policy.parse(changed), now=5, wall=WALL + 5)
    assert [m.description for m in change.removed] == ["ssh"]
    assert [(m.description, m.internal_port) for m in change.added] == [("ssh", 2022)]
    assert change.removed[0] is ssh
    # The unchanged forward is the very same entry: nothing to commit, no kernel change.
    assert g.table.get(MappingKey(Protocol.TCP, 443)) is portal
    assert not g.reload(Policy.parse(changed), now=6, wall=WALL + 6)


def test_reload_removes_dropped_forwards_and_displaces_mappings_in_a_new_ones_way() -> None:
    g = gateway()
    taken = g.map(ask(8080, exact=True), now=1)
    assert isinstance(taken, Granted)
    text = BASE.split("[[forwards]]")[0] + (
        '[[forwards]]\nname = "web"\nprotocols = ["tcp"]\nexternal_ports = "8080"\n'
        'internal_address = "192.168.1.100"\n'
    )
    change = g.reload(Policy.parse(text), now=2, wall=WALL)
    assert {m.description for m in change.removed} == {"portal", "ssh", ""}
    assert taken.mapping in change.removed
    assert [m.description for m in change.added] == ["web"]
    assert [m.description for m in g.table] == ["web"]


def test_until_is_the_expiry_and_a_passed_until_installs_nothing() -> None:
    text = BASE + 'until = "2027-01-15T08:00:00Z"\n'
    g = Gateway(Policy.parse(text))
    end = datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    g.sync_forwards(None, now=100, wall=end - 60)
    ssh = g.table.get(MappingKey(Protocol.TCP, 2222))
    assert ssh is not None and ssh.expires == 160
    assert [m.description for m in g.expire(now=160).removed] == ["ssh"]
    late = Gateway(Policy.parse(text))
    late.sync_forwards(None, now=0, wall=end)
    assert [m.description for m in late.table] == ["portal"]


def test_restore_takes_forwards_from_the_policy_not_the_store() -> None:
    old = gateway()
    persisted = list(old.table)
    changed = BASE.replace('name = "portal"', 'name = "portal v2"')
    g = Gateway(Policy.parse(changed))
    assert g.restore(persisted, now=0) == persisted
    g.sync_forwards(None, now=0, wall=WALL)
    assert sorted(m.description for m in g.table) == ["portal v2", "ssh"]


def test_forwards_to_no_lan_host_are_not_installed() -> None:
    g = Gateway(Policy.parse(BASE))
    g.internal_networks = (IPv4Network("192.168.1.0/26"),)
    change = g.sync_forwards(None, now=0, wall=WALL)
    assert change.added == ()


def test_forwards_do_not_count_against_the_gateways_quota() -> None:
    g = gateway(BASE.replace("min_lease = 1\n", "min_lease = 1\nmax_mappings = 1\n"))
    assert len(g.table) == 2
    first = g.map(ask(8080, exact=False), now=1)
    assert isinstance(first, Granted)
    second = g.map(ask(8081, exact=False), now=1)
    assert isinstance(second, Refused) and second.deny.reason is Reason.GATEWAY_QUOTA
