"""NAT-PMP end to end: the real daemon in the gateway namespace, the kernel's nftables,
Debian's natpmpc and raw datagrams from LAN and WAN hosts."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from igd.model import Protocol
from igd.proto import natpmp
from igd.proto.natpmp import NatPmpExternalAddressResponse, NatPmpResult
from igd.proto.pcp import PcpOpcode, PcpResponse
from igd.server.backends import KernelEntry
from igd.server.backends.nft_listing import parse_entries
from lab import Lab
from lab.demo import DemoError, connect, natpmp_map, start_service
from tests.lab.probe import exchange, listen_for_announcements, request_map

REPO = Path(__file__).resolve().parents[2]
FAST = {"address_poll_interval": 0.5}


def kernel(lab: Lab) -> set[KernelEntry]:
    """What the gateway's kernel forwards now (our nftables table)."""
    out = lab.run(lab.gateway, ["nft", "-j", "list", "table", "ip", "igd"]).stdout
    return parse_entries(json.loads(out), "igd")


def listed(lab: Lab) -> list[dict[str, object]]:
    """`igd-server list --json` from the running daemon."""
    argv = [
        str(Path(os.sys.executable).parent / "igd-server"),
        "list",
        "--json",
        "--config",
        str(lab.gateway_config),
    ]
    return json.loads(lab.run(lab.gateway, argv).stdout)  # type: ignore[no-any-return]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def entry(lab: Lab, host_index: int, external: int, internal: int) -> KernelEntry:
    from ipaddress import IPv4Address

    return KernelEntry(
        Protocol.TCP, external, None, IPv4Address(lab.lan[host_index].address), internal
    )


def test_granted_mapping_forwards_and_deleting_closes(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    gateway()
    service = start_service(lab, lab.lan[0], 8080)
    try:
        mapped = natpmp_map(lab, lab.lan[0], 18080, 8080)
        assert (mapped.public_port, mapped.lifetime) == (18080, 3600)
        assert kernel(lab) == {entry(lab, 0, 18080, 8080)}
        answer = connect(lab, lab.wan[0], lab.gateway.external_address, 18080)
        assert "hello from the LAN service" in answer
        assert [m["external_port"] for m in listed(lab)] == [18080]
        natpmp_map(lab, lab.lan[0], 18080, 8080, lifetime=0)
        assert kernel(lab) == set()
        with pytest.raises(DemoError):
            connect(lab, lab.wan[0], lab.gateway.external_address, 18080)
    finally:
        service.kill()


def test_denied_request_gets_code_2_and_no_kernel_entry(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    gateway()
    denied = request_map(lab, lab.lan[0], Protocol.TCP, 23, 23, 600)
    assert (denied.result, denied.internal_port, denied.external_port, denied.lifetime) == (
        NatPmpResult.NOT_AUTHORIZED,
        23,
        0,
        0,
    )
    with pytest.raises(DemoError, match=r"(?i)not authorized|refused"):
        natpmp_map(lab, lab.lan[0], 23, 23)
    assert kernel(lab) == set()
    assert "refused natpmp 192.168.77.10" in lab.gateway_log()
    assert "'no telnet'" in lab.gateway_log()


def test_quota_exhaustion_is_out_of_resources(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    gateway()
    for port in range(20000, 20016):  # lab.toml: max_mappings_per_client = 16
        assert request_map(lab, lab.lan[0], Protocol.UDP, port, port, 600).result == 0
    over = request_map(lab, lab.lan[0], Protocol.UDP, 20016, 20016, 600)
    assert over.result == NatPmpResult.OUT_OF_RESOURCES
    assert len(kernel(lab)) == 16
    # Another host has its own quota.
    assert request_map(lab, lab.lan[1], Protocol.UDP, 20016, 20016, 600).result == 0


def test_lease_expiry_removes_the_kernel_entry(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    gateway()
    granted = request_map(lab, lab.lan[0], Protocol.TCP, 9000, 9000, 2)  # min_lease is 2
    assert granted.lifetime == 2 and len(kernel(lab)) == 1
    wait_until(lambda: not kernel(lab), 5, "the expired mapping to leave the kernel")
    assert listed(lab) == []
    assert "expired tcp external 9000" in lab.gateway_log()


def test_sighup_with_stricter_policy_removes_what_it_no_longer_allows(
    lab: Lab,
    gateway,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    policy = tmp_path / "policy.toml"
    original = (REPO / "policies" / "lab.toml").read_text()
    policy.write_text(original)
    proc = gateway(policy)
    request_map(lab, lab.lan[0], Protocol.TCP, 8080, 8080, 600)
    request_map(lab, lab.lan[0], Protocol.TCP, 9090, 9090, 600)
    policy.write_text("this is [not toml")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "keeping the current policy" in lab.gateway_log(), 5, "the bad reload")
    assert len(kernel(lab)) == 2
    policy.write_text(original.replace('internal_ports = "23"', 'internal_ports = "23,9090"'))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(kernel(lab)) == 1, 5, "the reload to remove a mapping")
    assert kernel(lab) == {entry(lab, 0, 8080, 8080)}
    assert "the reloaded policy refuses it" in lab.gateway_log()
    assert request_map(lab, lab.lan[0], Protocol.TCP, 9090, 9090, 600).result == 2


def test_kill_9_and_restart_restores_unexpired_mappings(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    proc = gateway()
    first = request_map(lab, lab.lan[0], Protocol.TCP, 8080, 8080, 600)
    request_map(lab, lab.lan[1], Protocol.UDP, 5000, 5000, 600)
    request_map(lab, lab.lan[0], Protocol.TCP, 7000, 7000, 2)
    before = kernel(lab)
    assert len(before) == 3
    proc.kill()
    proc.wait()
    time.sleep(2.5)  # the 2-second lease ends while the daemon is down
    gateway()
    survivors = {e for e in before if e.external_port != 7000}
    assert kernel(lab) == survivors
    assert {m["external_port"] for m in listed(lab)} == {8080, 5000}
    again = request_map(lab, lab.lan[0], Protocol.TCP, 8080, 8080, 600)
    assert again.external_port == 8080
    assert again.epoch >= first.epoch + 2  # the epoch continued across the restart
    service = start_service(lab, lab.lan[0], 8080)
    try:
        assert "hello" in connect(lab, lab.wan[0], lab.gateway.external_address, 8080)
    finally:
        service.kill()


def test_clean_stop_with_flush_removes_everything(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    gateway(nftables={"table": "igd", "on_stop": "flush"})
    request_map(lab, lab.lan[0], Protocol.TCP, 8080, 8080, 600)
    assert lab.stop_gateway() == 0
    table = lab.run(lab.gateway, ["nft", "list", "table", "ip", "igd"], check=False)
    assert table.returncode != 0  # the table is gone
    gateway(nftables={"table": "igd", "on_stop": "flush"})
    assert listed(lab) == []


def test_requests_from_the_wan_side_get_no_answer(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    gateway()
    wan = lab.wan[0]
    lab.run(wan, ["ip", "route", "add", "192.168.77.0/24", "via", lab.gateway.external_address])
    wire = natpmp.encode_request(natpmp.NatPmpMapRequest(Protocol.TCP, 8080, 8080, 600))
    assert exchange(lab, wan, lab.gateway.external_address, wire) is None
    assert exchange(lab, wan, lab.gateway.address, wire) is None
    assert exchange(lab, wan, lab.gateway.address, bytes(2)) is None
    assert kernel(lab) == set()


def test_announcements_at_start_and_on_address_change(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    collect = listen_for_announcements(lab, lab.lan[1], 6.0)
    gateway(network=FAST)
    ext = lab.gateway.external_interface
    time.sleep(1.0)
    # Another subnet: deleting a primary address also deletes secondaries of its subnet.
    lab.run(lab.gateway, ["ip", "addr", "add", "198.51.100.77/24", "dev", ext])
    lab.run(lab.gateway, ["ip", "addr", "del", f"{lab.gateway.external_address}/24", "dev", ext])
    seen = collect()
    addresses = [str(r.address) for _, r in seen if isinstance(r, NatPmpExternalAddressResponse)]
    assert all(source == lab.gateway.address for source, _ in seen)
    assert addresses.count(lab.gateway.external_address) >= 3  # 0, 0.25, 0.75 s ...
    assert "198.51.100.77" in addresses
    announces = [r for _, r in seen if isinstance(r, PcpResponse)]
    assert len(announces) == len(addresses)  # a PCP ANNOUNCE beside each NAT-PMP one
    assert all(r.opcode is PcpOpcode.ANNOUNCE and r.result == 0 for r in announces)
    reply = exchange(lab, lab.lan[0], lab.gateway.address, bytes(2))
    assert reply is not None
    response = natpmp.decode_response(reply)
    assert isinstance(response, NatPmpExternalAddressResponse)
    assert str(response.address) == "198.51.100.77"
    assert response.epoch < 5  # a new external address starts a new epoch


def test_malformed_and_unknown_packets_do_not_hurt(lab: Lab, gateway) -> None:  # type: ignore[no-untyped-def]
    gateway()
    lan = lab.lan[0]
    target = lab.gateway.address
    assert exchange(lab, lan, target, b"\x00\x02\x00\x00") is None  # truncated map request
    unsupported = exchange(lab, lan, target, b"\x00\x09" + bytes(10))
    assert unsupported is not None and unsupported[1] == 0x89 and unsupported[3] == 5
    version = exchange(lab, lan, target, b"\x01\x00")
    assert version is not None and version[:4] == b"\x00\x80\x00\x01"
    pcp = exchange(lab, lan, target, b"\x02\x01" + bytes(58))
    assert pcp is not None and pcp[3] == 12  # PCP: the client address field is not the source
    future = exchange(lab, lan, target, b"\x03\x01" + bytes(22))
    assert future is not None and future[:4] == b"\x02\x81\x00\x01"  # UNSUPP_VERSION, use 2
    assert request_map(lab, lan, Protocol.TCP, 8080, 8080, 60).result == 0


def test_restart_with_a_changed_policy_drops_what_it_refuses(
    lab: Lab,
    gateway,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    original = (REPO / "policies" / "lab.toml").read_text()
    policy.write_text(original)
    gateway(policy)
    request_map(lab, lab.lan[0], Protocol.TCP, 8080, 8080, 600)
    request_map(lab, lab.lan[0], Protocol.TCP, 9090, 9090, 600)
    assert lab.stop_gateway() == 0
    policy.write_text(original.replace('internal_ports = "23"', 'internal_ports = "23,9090"'))
    gateway(policy)
    assert kernel(lab) == {entry(lab, 0, 8080, 8080)}
    assert "1 refused by the policy" in lab.gateway_log()
    assert lab.stop_gateway() == 0
    gateway(policy)  # same policy again: nothing more to recheck or drop
    assert kernel(lab) == {entry(lab, 0, 8080, 8080)}
    assert lab.gateway_log().count("0 refused by the policy") >= 2
