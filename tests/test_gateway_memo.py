"""What the gateway core and the policy remember between requests is dropped when what it was
worked out from changes: a reload, new own addresses, new internal networks."""

import random
from ipaddress import IPv4Address, IPv4Network

from igd.decision import Allow, Deny, Reason
from igd.gateway import Gateway, Granted, Refused
from igd.model import MapRequest, Mechanism, Protocol
from igd.policy import Policy
from igd.ports import PortSet

A = IPv4Address("192.168.1.10")
B = IPv4Address("192.168.1.11")
LAN = (IPv4Network("192.168.1.0/24"),)

ALLOW_NATPMP = """
[defaults]
action = "deny"

[[rules]]
name = "natpmp only"
action = "allow"
clients = ["192.168.1.10/32"]
via = ["natpmp"]
external_ports = "2000-3000"
"""

DENY_A = """
[defaults]
action = "deny"

[[rules]]
name = "everyone but A"
action = "allow"
clients = ["192.168.1.11/32"]
"""


def request(
    client: IPv4Address = A, port: int = 2500, mechanism: Mechanism = Mechanism.NATPMP
) -> MapRequest:
    return MapRequest(
        mechanism=mechanism,
        client=client,
        protocol=Protocol.TCP,
        internal_address=client,
        internal_port=port,
        external_port=port,
        lifetime=600,
    )


def test_a_policy_decides_each_requester_and_mechanism_on_its_own() -> None:
    policy = Policy.parse(ALLOW_NATPMP)
    table = Gateway(policy).table
    for _ in range(2):  # the second round is answered from what the first remembered
        allowed = policy.evaluate(request(), table, now=0.0)
        assert isinstance(allowed, Allow) and allowed.rule == "natpmp only"
        assert allowed.external_ports == PortSet.parse("2000-3000")
        assert isinstance(policy.evaluate(request(mechanism=Mechanism.PCP), table, now=0.0), Deny)
        assert isinstance(policy.evaluate(request(client=B), table, now=0.0), Deny)


def test_a_reload_forgets_the_old_policys_decisions() -> None:
    gateway = Gateway(Policy.parse(ALLOW_NATPMP), rng=random.Random(1), internal_networks=LAN)
    assert isinstance(gateway.map(request(), now=0.0), Granted)
    removed = gateway.reload(Policy.parse(DENY_A), now=1.0, wall=1.0)
    assert len(removed.removed) == 1
    refused = gateway.map(request(port=2600), now=2.0)
    assert isinstance(refused, Refused) and refused.deny.reason is Reason.POLICY_DENIED
    assert isinstance(gateway.map(request(client=B, port=2600), now=2.0), Granted)


def test_new_own_addresses_and_networks_change_the_target_check() -> None:
    gateway = Gateway(Policy.parse(ALLOW_NATPMP), internal_networks=LAN)
    assert gateway.target_problem(A) is None
    gateway.own_addresses = frozenset({A})
    assert "gateway's own address" in (gateway.target_problem(A) or "")
    gateway.own_addresses = frozenset()
    assert gateway.target_problem(A) is None
    gateway.internal_networks = (IPv4Network("10.0.0.0/8"),)
    assert "outside the internal networks" in (gateway.target_problem(A) or "")


def test_port_membership_at_the_interval_edges() -> None:
    ports = PortSet.parse("21, 137-139, 1024-65535")
    inside = {21, 137, 138, 139, 1024, 65535}
    for port in (0, 20, 21, 22, 136, 137, 139, 140, 1023, 1024, 65535, 65536):
        assert (port in ports) is (port in inside)
    assert "21" not in ports
