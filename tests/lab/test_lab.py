"""The namespace lab itself: addressing, isolation, multicast, cleanup, and the demo's steps."""

from __future__ import annotations

import secrets
import select
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from lab import LAB_PREFIX, Lab, LabError, cleanup_stale, list_netns
from lab.cli import main as lab_cli
from lab.demo import (
    GREETING,
    DemoError,
    connect,
    natpmp_map,
    run_demo,
    start_service,
    wait_for_gateway,
)
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_POLICY = REPO / "policies" / "lab.toml"

_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5350))
s.settimeout(float(sys.argv[1]))
print("ready", flush=True)
try:
    data, peer = s.recvfrom(512)
    print(data.decode(), peer[0])
except TimeoutError:
    print("nothing")
"""


def ping(lab: Lab, host: str, address: str) -> bool:
    return lab.run(host, ["ping", "-c1", "-W1", address], check=False).returncode == 0


def lab_namespaces(prefix: str) -> list[str]:
    return [ns for ns in list_netns() if ns.startswith(prefix)]


def wait_ready(proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    assert readable and proc.stdout.readline().strip() == "ready"


def test_lan_hosts_reach_the_gateway_and_each_other(lab: Lab) -> None:
    for host in lab.lan:
        assert ping(lab, host.name, lab.gateway.address), host
    assert ping(lab, "lan1", lab.lan[1].address)


def test_wan_hosts_reach_the_gateway_external_address(lab: Lab) -> None:
    for host in lab.wan:
        assert ping(lab, host.name, lab.gateway.external_address), host
    assert ping(lab, "wan1", lab.wan[1].address)


def test_lan_and_wan_do_not_reach_each_other_without_the_daemon(lab: Lab) -> None:
    # The gateway forwards but has no NAT of its own, and the WAN has no route to the LAN:
    # whatever crosses later was opened by the daemon.
    assert not ping(lab, "lan1", lab.wan[0].address)
    result = lab.run("wan1", ["ping", "-c1", "-W1", lab.lan[0].address], check=False)
    assert result.returncode != 0
    assert "unreachable" in (result.stdout + result.stderr).lower()


def test_ipv6_is_routed_between_wan_and_lan_with_no_filter(lab: Lab) -> None:
    # No NAT on IPv6: the WAN routes the LAN prefix via the gateway, which forwards it
    # unfiltered, so the pinhole tests start from a network where everything gets through.
    gw = lab.gateway
    assert gw.address6.startswith("2001:db8:") and gw.external_address6.startswith("2001:db8:")
    assert len({h.address6 for h in (*lab.wan, *lab.lan)}) == len(lab.wan) + len(lab.lan)
    assert ping(lab, "lan1", gw.address6)
    assert ping(lab, "wan1", gw.external_address6)
    assert ping(lab, "wan1", lab.lan[0].address6)
    assert ping(lab, "lan2", lab.wan[1].address6)
    assert lab.lan[0].address6 in lab.describe()


def test_a_lab_without_ipv6_has_no_ipv6_addresses() -> None:
    with Lab(wan_network6=None, lan_network6=None) as lab:
        assert lab.lan[0].address6 == ""
        out = lab.run("lan1", ["ip", "-6", "addr", "show", "scope", "global"]).stdout
        assert "inet6" not in out


def test_multicast_from_the_gateway_reaches_every_lan_host_and_not_the_wan(lab: Lab) -> None:
    listeners = {
        host: lab.python_popen(
            host, ["-c", _LISTENER, "5" if host.startswith("lan") else "1.5"],
            stdout=subprocess.PIPE, text=True,
        )
        for host in ("lan1", "lan2", "wan1")
    }  # fmt: skip
    for proc in listeners.values():
        wait_ready(proc)
    # No IP_MULTICAST_IF: the lab's route for 224.0.0.0/4 must send it out of br-lan, as a
    # NAT-PMP announcement (RFC 6886 §3.2.1) is sent.
    lab.python(
        "gw",
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'announce', ('224.0.0.1', 5350))",
    )
    got = {host: proc.communicate(timeout=10)[0].strip() for host, proc in listeners.items()}
    assert got == {
        "lan1": f"announce {lab.gateway.address}",
        "lan2": f"announce {lab.gateway.address}",
        "wan1": "nothing",
    }


def test_teardown_removes_everything_even_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        sleeper = lab.popen("lan1", ["sleep", "60"])
        assert len(lab_namespaces(lab.prefix)) == 6
        raise RuntimeError("boom")
    assert lab_namespaces(lab.prefix) == []
    assert not lab.workdir.exists()
    assert sleeper.poll() is not None
    lab.teardown()  # idempotent


def test_sigterm_tears_the_lab_down() -> None:
    prefix = f"igdlab{secrets.token_hex(3)}"
    script = textwrap.dedent(
        """
        import sys, time
        from lab import Lab
        with Lab(sys.argv[1]) as lab:
            print(lab.popen("gw", ["sleep", "60"]).pid, flush=True)
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, prefix], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        sleeper_pid = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "ready"
        assert len(lab_namespaces(prefix)) == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        cleanup_stale(f"{prefix}-")
    assert lab_namespaces(prefix) == []
    assert not Path(f"/proc/{sleeper_pid}").exists()


def test_cleanup_stale_removes_a_lab_left_behind() -> None:
    lab = Lab().build()
    try:
        sleeper = lab.popen("gw", ["sleep", "60"])
        lab.detach()  # as if its process had been killed
        with pytest.raises(LabError, match="already exists"):
            Lab(lab.prefix).build()
        removed = cleanup_stale(f"{lab.prefix}-")
        assert set(lab.namespaces()) | {str(lab.workdir)} == set(removed)
        assert lab_namespaces(lab.prefix) == []
        assert not lab.workdir.exists()
        assert sleeper.wait(timeout=5) < 0
    finally:
        cleanup_stale(f"{lab.prefix}-")


def test_gateway_config_is_accepted_by_the_daemon(lab: Lab) -> None:
    from igd.server.config import Config

    path = lab.write_gateway_config(LAB_POLICY, upnp={"enabled": True, "http_port": 5555})
    data = tomllib.loads(path.read_text())
    assert data["network"] == {
        "external_interface": "wan0",
        "internal_interfaces": ["br-lan"],
        "allow_private_external": True,  # 203.0.113.1 is a documentation address
    }
    assert Path(data["state"]["directory"]).parent == lab.workdir
    config = Config.load(path)
    assert config.policy_file == LAB_POLICY
    assert config.upnp_enabled and config.upnp_http_port == 5555
    assert config.natpmp_enabled and config.pcp_enabled


def test_cli_up_exec_down(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = f"igdlab{secrets.token_hex(3)}"
    try:
        assert lab_cli(["up", "--prefix", prefix, "--lan-hosts", "1"]) == 0
        assert f"{prefix}-lan1" in capsys.readouterr().out
        out = subprocess.run(
            [REPO / "dev.sh", "lab", "exec", "--prefix", prefix, "lan1", "--", "ip", "-br", "addr"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "192.168.77.10/24" in out
        assert lab_cli(["down", "--prefix", prefix]) == 0
        assert lab_namespaces(prefix) == []
    finally:
        cleanup_stale(f"{prefix}-")


def test_demo_steps_against_the_reference_gateway() -> None:
    # The demo's steps, run against Debian's miniupnpd: proves the lab's data path (DNAT
    # from the WAN to a LAN service) and that the steps read natpmpc's output right.
    # Its defaults: NAT-PMP (and PCP), secure mode, the LAN's ports 1024-65535 allowed.
    with (
        Lab(wan_network=PUBLIC_LOOKING_WAN, wan_hosts=1, lan_hosts=1) as lab,
        Miniupnpd(lab),
    ):
        gw, lan = lab.gateway, lab.lan[0]
        assert wait_for_gateway(lab) == gw.external_address
        start_service(lab, lan, 8080)
        mapping = natpmp_map(lab, lan, 8080, 8080, "tcp", 3600)
        assert (mapping.public_port, mapping.private_port, mapping.lifetime) == (8080, 8080, 3600)
        answer = connect(lab, "wan1", gw.external_address, 8080)
        assert answer == f"{GREETING} (you are {lab.wan[0].address})\n"

        assert natpmp_map(lab, lan, 8080, 8080, "tcp", 0).lifetime == 0
        with pytest.raises(DemoError, match="ConnectionRefused"):
            connect(lab, "wan1", gw.external_address, 8080)
    assert lab_namespaces(lab.prefix) == []


def test_the_demo_passes_and_cleans_up() -> None:
    lines: list[str] = []
    assert run_demo(write=lines.append) == 0, "\n".join(lines)
    assert lines[-1].startswith("Demo passed")
    prefix = lines[1].split()[1]  # "lab igdlab1a2b3c (files in ...)"
    assert prefix.startswith(LAB_PREFIX) and lab_namespaces(prefix) == []


def test_a_failing_demo_says_where_and_still_cleans_up(tmp_path: Path) -> None:
    lines: list[str] = []
    assert run_demo(tmp_path / "missing-policy.toml", write=lines.append) == 1
    failed = next(line for line in lines if line.startswith("FAILED"))
    assert "Starting the gateway" in failed
    assert any("exited with code" in line for line in lines)
    prefix = lines[1].split()[1]
    assert prefix.startswith(LAB_PREFIX) and lab_namespaces(prefix) == []
