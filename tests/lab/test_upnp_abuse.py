"""The real daemon's UPnP server under attack from a LAN host holding many addresses:
slowloris from 40 addresses (half-sent heads or bodies) leaves another client served, and
garbage leaves no traceback.

Two namespaces of our own (tests/netns.py): the gateway, running `python -m igd.server` with
nftables, and one LAN host on a veth pair, holding the client's address and the attackers'.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from igd.server.upnp.http import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT
from tests.netns import Netns, create, require_root

REPO = Path(__file__).resolve().parents[2]
ATTACK = Path(__file__).with_name("upnp_attack.py")
NET = "10.199.0"
GATEWAY = f"{NET}.1"
CLIENT = f"{NET}.2"
ATTACKERS = [f"{NET}.{i}" for i in range(10, 50)]  # 40 addresses x 8 > MAX_CONNECTIONS
ROUNDS = 40


@dataclass
class Site:
    gateway: Netns
    lan: Netns
    log: Path

    def attack(self, *args: str, timeout: float = 240) -> dict[str, int]:
        """Run the attack script in the LAN host; its JSON result."""
        done = self.lan.run(sys.executable, str(ATTACK), *args, timeout=timeout)
        result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    require_root()
    gateway = create("igdabgw")
    lan = create("igdablan")
    daemon: subprocess.Popen[bytes] | None = None
    try:
        gateway.run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
                    "netns", lan.name)  # fmt: skip
        gateway.run("ip", "addr", "add", f"{GATEWAY}/24", "dev", "lan0")
        gateway.run("ip", "link", "set", "lan0", "up")
        # The external side only needs an address: a veth pair with both ends in the gateway.
        gateway.run("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1")
        gateway.run("ip", "addr", "add", "203.0.113.1/24", "dev", "wan0")
        gateway.run("ip", "link", "set", "wan0", "up")
        gateway.run("ip", "link", "set", "wan1", "up")
        addresses = [CLIENT, *ATTACKERS]
        lan.run(
            "ip", "-batch", "-", input="".join(f"addr add {a}/24 dev eth0\n" for a in addresses)
        )
        lan.run("ip", "link", "set", "eth0", "up")
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        config = tmp_path / "igd.toml"
        config.write_text(
            f"""
[network]
external_interface = "wan0"
internal_interfaces = ["lan0"]
allow_private_external = true
[state]
directory = "{state}"
[policy]
file = "{REPO / "policies" / "lab.toml"}"
[natpmp]
enabled = false
[pcp]
enabled = false
[upnp]
enabled = true
http_port = 5000
igd_version = 2
[nftables]
on_stop = "flush"
"""
        )
        log = tmp_path / "daemon.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                ["ip", "netns", "exec", gateway.name, sys.executable, "-m", "igd.server",
                 "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while "UPnP HTTP listening" not in log.read_text(errors="replace"):
            assert daemon.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield Site(gateway, lan, log)
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        lan.delete()
        gateway.delete()


@pytest.mark.parametrize("half", ["head", "body"])
def test_slowloris_from_40_addresses_leaves_another_client_served(site: Site, half: str) -> None:
    assert len(ATTACKERS) * MAX_CONNECTIONS_PER_CLIENT > MAX_CONNECTIONS
    result = site.attack(
        "slowloris", GATEWAY, CLIENT, *ATTACKERS, "--half", half,
        "--per-address", str(MAX_CONNECTIONS_PER_CLIENT), "--rounds", str(ROUNDS),
    )  # fmt: skip
    assert result["held"] >= MAX_CONNECTIONS - 8  # the attack did fill the server
    assert result["served"] >= ROUNDS - 2, result  # miniupnpd: 40 of 40; we were at 0 of 40
    log = site.log.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_garbage_leaves_no_traceback_and_few_lines(site: Site) -> None:
    before = len(site.log.read_text(errors="replace").splitlines())
    result = site.attack("garbage", GATEWAY, CLIENT, "--datagrams", "2000", "--requests", "200")
    assert result["served"] == result["rounds"]
    log = site.log.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    # 2,200 bad inputs: one line per kind per minute, not one each.
    assert len(log.splitlines()) - before < 20, log[-3000:]
