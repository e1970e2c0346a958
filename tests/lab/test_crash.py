"""kill -9 under load: every mapping the daemon acknowledged survives, and nothing else does.

The daemon runs in the lab's gateway with the kernel's nftables and its SQLite lease store.
LAN hosts drive NAT-PMP, PCP (raw datagrams, several in flight) and UPnP (async-upnp-client)
at it; at a random moment the daemon gets SIGKILL, and after a restart every mapping whose
success answer had arrived is in `igd-server list` and in the kernel, every acknowledged
deletion stays deleted, the kernel holds no entry without a lease, and a PCP mapping still
answers only to its own nonce. Several rounds, each with new ports, so the earlier rounds'
mappings must survive every later kill too.

The moments are drawn from a seed, printed, and taken from IGD_CRASH_SEED when set.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from igd.model import Protocol
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpRequest, PcpResponse, PcpResult
from lab import Host, Lab
from tests.lab.conftest import StartGateway
from tests.lab.probe import exchange
from tests.lab.test_natpmp_gateway import kernel, listed

ROUNDS = 4
LOAD = Path(__file__).with_name("crash_load.py")
HTTP_PORT = 5000
ROUND_PORTS = 3000  # each load process uses base .. base + 3000 (NAT-PMP, PCP, UPnP)
FIRST_PORT = 20000
POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 2
max_mappings_per_client = 5000
max_mappings = 20000

[[rules]]
name = "lab LAN to self"
action = "allow"
clients = ["192.168.77.0/24"]
protocols = ["tcp", "udp"]
internal_ports = "1024-65535"
external_ports = "1024-65535"
"""

Key = tuple[str, str, str, int]  # host, mechanism, protocol, internal port


def start(gateway: StartGateway, lab: Lab, policy: Path) -> None:
    """Start (or restart) the daemon and wait until NAT-PMP and UPnP both answer."""
    before = lab.gateway_log().count("UPnP HTTP listening")
    gateway(policy, upnp={"enabled": True, "http_port": HTTP_PORT, "igd_version": 2})
    deadline = time.monotonic() + 15
    while lab.gateway_log().count("UPnP HTTP listening") <= before:
        assert time.monotonic() < deadline, f"UPnP did not start:\n{lab.gateway_log()}"
        time.sleep(0.05)


def description_url(lab: Lab) -> str:
    """The IGD description's URL, from the daemon's log (its path holds a random token)."""
    for line in reversed(lab.gateway_log().splitlines()):
        if "UPnP IGD serving version" in line:
            path = line.rsplit(" at ", 1)[1].split(",")[0].strip()
            return f"http://{lab.gateway.address}:{HTTP_PORT}{path}"
    raise AssertionError(f"no description URL in the log:\n{lab.gateway_log()}")


def acknowledged(lines: str, host: str) -> list[tuple[str, Key, int, str]]:
    """(operation, key, external port, PCP nonce) for every success a load process printed,
    in order."""
    found = []
    for line in lines.splitlines():
        event: dict[str, Any] = json.loads(line)
        if event["op"] in ("map", "deleting", "delete"):
            key = (host, event["mech"], event["protocol"], event["internal"])
            found.append((event["op"], key, int(event.get("external", 0)), event.get("nonce", "")))
    return found


def pcp_delete(lab: Lab, host: Host, protocol: str, port: int, nonce: bytes) -> PcpResponse:
    """A PCP MAP delete (lifetime 0) from `host`; the answer."""
    number = Protocol(protocol).number
    data = PcpMapData(nonce, number, port, 0, pcp.mapped(IPv4Address(0)))
    request = PcpRequest(PcpOpcode.MAP, 0, pcp.mapped(IPv4Address(host.address)), data)
    reply = exchange(lab, host, lab.gateway.address, pcp.encode_request(request))
    assert reply is not None, "no PCP answer"
    return pcp.decode_response(reply)


def test_acknowledged_mappings_survive_kill_9_under_load(
    lab: Lab, gateway: StartGateway, tmp_path: Path
) -> None:
    seed = int(os.environ.get("IGD_CRASH_SEED") or secrets.randbits(32))
    print(f"crash test seed {seed} (IGD_CRASH_SEED={seed} repeats these kill moments)")
    rng = random.Random(seed)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    start(gateway, lab, policy)
    url = description_url(lab)
    present: dict[Key, int] = {}  # acknowledged and not deleted since: its external port
    nonces: dict[Key, bytes] = {}  # PCP mappings' nonces
    deleted: set[Key] = set()  # acknowledged deletions
    seen = {"natpmp": 0, "pcp": 0, "upnp": 0, "delete": 0}
    for round_ in range(ROUNDS):
        loads = []
        for index, host in enumerate(lab.lan):
            base = FIRST_PORT + (round_ * len(lab.lan) + index) * ROUND_PORTS
            argv = [
                str(LOAD),
                f"--gateway={lab.gateway.address}",
                f"--me={host.address}",
                f"--upnp={url}",
                f"--base={base}",
                f"--seed={rng.randrange(2**32)}",
                "--seconds=15",
            ]
            proc = lab.python_popen(host, argv, stdout=subprocess.PIPE, text=True)
            loads.append((host.name, proc))
        kill_after = rng.uniform(0.8, 2.5)
        time.sleep(kill_after)
        assert lab.stop_gateway(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(0.3)  # answers already on the wire still arrive
        for name, proc in loads:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=10)
            for op, key, external, nonce in acknowledged(out, name):
                if op == "map":
                    present[key] = external
                    nonces[key] = bytes.fromhex(nonce)
                    seen[key[1]] += 1
                elif op == "deleting":
                    present.pop(key)  # sent: gone or not, both are right until answered
                else:
                    deleted.add(key)
                    seen["delete"] += 1
        start(gateway, lab, policy)
        context = f"seed {seed}, round {round_}, killed after {kill_after:.2f} s"
        leases = {
            (m["protocol"], m["external_port"], m["internal_address"], m["internal_port"])
            for m in listed(lab)
        }
        forwarded = {
            (str(e.protocol), e.external_port, str(e.internal_address), e.internal_port)
            for e in kernel(lab)
        }
        assert forwarded == leases, f"{context}: kernel and lease store differ"
        address = {host.name: host.address for host in lab.lan}
        wanted = {
            (protocol, external, address[host], internal)
            for (host, _, protocol, internal), external in present.items()
        }
        assert not wanted - leases, f"{context}: acknowledged but lost: {wanted - leases}"
        gone = {(protocol, address[host], internal) for host, _, protocol, internal in deleted}
        resurrected = {(p, a, i) for p, _, a, i in leases} & gone
        assert not resurrected, f"{context}: acknowledged deletions came back: {resurrected}"
    print(f"acknowledged over {ROUNDS} kills: {seen}")
    # Ownership survived too (RFC 6887 §11.3): a PCP mapping made before the kills can be
    # deleted with its own nonce and with no other.
    survivors = sorted((k for k in present if k[1] == "pcp"), key=lambda k: k[3])
    assert survivors, f"seed {seed}: no PCP mapping survived to delete"
    hosts = {host.name: host for host in lab.lan}
    for key in {survivors[0], survivors[-1]}:  # from the first round and from the last
        host, _, protocol, internal = key
        wrong = pcp_delete(lab, hosts[host], protocol, internal, bytes(12))
        assert wrong.result is PcpResult.NOT_AUTHORIZED, f"seed {seed}: {key} {wrong}"
        right = pcp_delete(lab, hosts[host], protocol, internal, nonces[key])
        assert right.result is PcpResult.SUCCESS, f"seed {seed}: {key} {right}"
        remaining = {(str(e.protocol), e.external_port) for e in kernel(lab)}
        assert (protocol, present[key]) not in remaining, f"seed {seed}: {key} still forwarded"
    assert all(seen.values()), f"every mechanism and deletions were exercised: {seen}"
    assert "Traceback" not in lab.gateway_log()
