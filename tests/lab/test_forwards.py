"""Admin-defined forwards and a rule's remote_hosts in the kernel (issue 11): the real daemon,
nftables in namespaces, WAN hosts inside and outside the allowed sources, natpmpc and upnpc
asking for a forward's port, a reload watched with `nft monitor`, `until` reached."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from igd.model import Protocol
from lab import Lab
from lab.demo import DemoError, connect, natpmp_map, start_service
from tests.lab.conftest import LAB_POLICY
from tests.lab.probe import request_map
from tests.lab.test_natpmp_gateway import kernel, listed, wait_until
from tests.lab.test_upnp_gateway import PUBLIC_LOOKING_WAN, V2, upnpc

PORTAL, SHELL = 8443, 2222


def forwards_policy(lab: Lab, *, shell_port: int = 22, until: str | None = None) -> str:
    """The lab policy plus two forwards: the portal for wan1 only, a shell for anyone."""
    portal, shell = lab.lan[0].address, lab.lan[1].address
    text = LAB_POLICY.read_text() + (
        f'\n[[forwards]]\nname = "portal"\nprotocols = ["tcp"]\nexternal_ports = "{PORTAL}"\n'
        f'internal_address = "{portal}"\ninternal_port = 8080\n'
        f'remote_hosts = ["{lab.wan[0].address}"]\nowner = "ops"\npurpose = "customers"\n'
        f'\n[[forwards]]\nname = "shell"\nprotocols = ["tcp"]\nexternal_ports = "{SHELL}"\n'
        f'internal_address = "{shell}"\ninternal_port = {shell_port}\n'
    )
    if until is not None:
        text += f'until = "{until}"\n'
    return text


def reachable(lab: Lab, host: str, port: int) -> bool:
    try:
        connect(lab, host, lab.gateway.external_address, port, timeout=1.5)
    except DemoError:
        return False
    return True


@pytest.fixture
def lab() -> Any:
    """Public-looking WAN addresses, so upnpc takes the gateway as connected."""
    with Lab(prefix=f"igdfwd{secrets.token_hex(3)}", wan_network=PUBLIC_LOOKING_WAN) as built:
        yield built


def test_a_forward_admits_only_its_remote_hosts(lab: Lab, gateway: Any, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(forwards_policy(lab))
    gateway(policy)
    start_service(lab, lab.lan[0], 8080, "portal")
    start_service(lab, lab.lan[1], 22, "shell")
    assert "portal" in connect(lab, "wan1", lab.gateway.external_address, PORTAL)
    assert not reachable(lab, "wan2", PORTAL)  # outside remote_hosts: dropped in the kernel
    assert "shell" in connect(lab, "wan2", lab.gateway.external_address, SHELL)
    rows = {row["external_port"]: row for row in listed(lab)}
    assert rows[PORTAL]["mechanism"] == "static"
    assert rows[PORTAL]["description"] == "portal"
    assert rows[PORTAL]["remote_sources"] == [f"{lab.wan[0].address}/32"]
    # The documented table, from the running daemon over the control socket.
    argv = [str(Path(sys.executable).parent / "igd-server"), "forwards", "export"]
    argv += ["--config", str(lab.gateway_config), "--all", "--format", "json"]
    exported = json.loads(lab.run(lab.gateway, argv).stdout)
    assert [(r["name"], r["public_address"], r["owner"]) for r in exported] == [
        ("portal", lab.gateway.external_address, "ops"),
        ("shell", lab.gateway.external_address, ""),
    ]


def test_clients_never_get_a_forwards_port(lab: Lab, gateway: Any, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(forwards_policy(lab))
    gateway(policy, upnp=V2)
    wait_until(lambda: "UPnP HTTP listening" in lab.gateway_log(), 10, "UPnP")
    moved = natpmp_map(lab, "lan2", SHELL, SHELL)
    assert moved.public_port not in (0, SHELL)
    refused = upnpc(lab, "lan2", "-a", lab.lan[1].address, "22", str(SHELL), "TCP", check=False)
    assert "718" in refused
    # NAT-PMP deletion from the forward's own host touches nothing of the forward.
    natpmp_map(lab, "lan2", 0, 22, lifetime=0)
    assert any(e.external_port == SHELL for e in kernel(lab))
    assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, PORTAL, 600).external_port != PORTAL


def test_reload_swaps_a_changed_forward_and_leaves_the_other_alone(
    lab: Lab, gateway: Any, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(forwards_policy(lab))
    proc = gateway(policy)
    start_service(lab, lab.lan[0], 8080, "portal")
    start_service(lab, lab.lan[1], 2022, "new shell")
    before = {e.external_port: e for e in kernel(lab)}
    # Every element change in the gateway's kernel during the reload (bounded: 20 s).
    monitor = lab.popen(
        lab.gateway,
        ["timeout", "20", "nft", "monitor", "elements"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    policy.write_text(forwards_policy(lab, shell_port=2022))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "policy reloaded" in lab.gateway_log(), 10, "the reload")
    time.sleep(0.5)
    monitor.terminate()
    events, _ = monitor.communicate(timeout=10)
    after = {e.external_port: e for e in kernel(lab)}
    assert after[PORTAL] == before[PORTAL]
    assert after[SHELL].internal_port == 2022
    assert str(PORTAL) not in events  # the unchanged forward never blinked
    assert str(SHELL) in events
    assert "new shell" in connect(lab, "wan2", lab.gateway.external_address, SHELL)
    assert "portal" in connect(lab, "wan1", lab.gateway.external_address, PORTAL)


def test_until_removes_a_forward_when_reached(lab: Lab, gateway: Any, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    end = datetime.fromtimestamp(time.time() + 6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    policy.write_text(forwards_policy(lab, until=end))
    gateway(policy)
    start_service(lab, lab.lan[1], 22, "shell")
    assert "shell" in connect(lab, "wan2", lab.gateway.external_address, SHELL)
    wait_until(lambda: all(e.external_port != SHELL for e in kernel(lab)), 15, "the forward to end")
    assert not reachable(lab, "wan2", SHELL)
    assert [row["description"] for row in listed(lab)] == ["portal"]
    assert f"expired tcp external {SHELL}" in lab.gateway_log()
    # Started again after its end, the daemon does not install it and says why.
    lab.stop_gateway()
    gateway(policy)
    assert [row["description"] for row in listed(lab)] == ["portal"]
    assert "forward 'shell' ended at" in lab.gateway_log()


def test_a_rules_remote_hosts_restrict_dynamic_mappings_in_the_kernel(
    lab: Lab, gateway: Any, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        LAB_POLICY.read_text().replace(
            'external_ports = "1024-65535"',
            f'external_ports = "1024-65535"\nremote_hosts = ["{lab.wan[0].address}"]',
        )
    )
    gateway(policy)
    start_service(lab, lab.lan[0], 8080, "lan service")
    granted = natpmp_map(lab, "lan1", 18080, 8080)  # NAT-PMP has no FILTER: the rule's apply
    assert "lan service" in connect(lab, "wan1", lab.gateway.external_address, granted.public_port)
    assert not reachable(lab, "wan2", granted.public_port)
    (row,) = listed(lab)
    assert row["remote_sources"] == [f"{lab.wan[0].address}/32"]
    assert "remote sources limited to" in lab.gateway_log()
