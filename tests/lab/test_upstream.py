"""Double NAT end to end (lab/cascade.py): igd-server behind another gateway mirrors what it
grants upstream, and LAN clients are told the endpoint the WAN really reaches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.bench_upstream import MAX_WINDOW, RATE_FIRST_PORT, load_batch, rate_lab
from lab.cascade import CascadeLab, UpstreamSite
from lab.demo import DemoError, connect, natpmp_map, public_address, start_service
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions
from lab.miniupnpd import version as miniupnpd_version
from lab.netns import LabCommandError, LabError

REPO = Path(__file__).resolve().parents[2]
IGD_SERVER = str(Path(os.sys.executable).parent / "igd-server")
UPSTREAM_POLICY = REPO / "policies" / "lab-upstream.toml"
LAN_POLICY = REPO / "policies" / "lab.toml"


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except (DemoError, LabError, LabCommandError):
            found = None  # not answering yet
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def upstream_listed(lab: CascadeLab) -> list[dict[str, Any]]:
    """`igd-server list --json` of the upstream gateway."""
    argv = [IGD_SERVER, "list", "--json", "--config", str(lab.workdir / "upstream.toml")]
    return json.loads(lab.run(lab.upstream, argv).stdout)  # type: ignore[no-any-return]


def status(lab: CascadeLab) -> dict[str, Any]:
    """Our gateway's status over its control socket (what `igd-server status` shows)."""
    code = (
        "import json, sys\n"
        "from igd.server.config import Config\n"
        "from igd.server.control import ask\n"
        "print(json.dumps(ask(Config.load(sys.argv[1]).control_socket, 'status')))\n"
    )
    out = lab.python(lab.gateway, ["-c", code, str(lab.gateway_config)]).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def cascade() -> Iterator[CascadeLab]:
    with CascadeLab() as built:
        yield built


# A restart is told from the epoch (RFC 6887 §8.5, RFC 6886 §3.6): an upstream killed a
# second or two after it started has an epoch its successor soon catches up with, which no
# client can tell apart. Real gateways run longer; the lab's upstream is this old at least.
MIN_UPSTREAM_AGE = 6.0


def start_both(lab: CascadeLab, policy: Path = UPSTREAM_POLICY, **upstream: Any) -> float:
    """Start the upstream igd-server (with `policy`) and ours (mirroring `auto` unless told);
    when the upstream started (monotonic)."""
    started = time.monotonic()
    lab.start_upstream(lab.write_upstream_config(policy))
    # The upstream answers NAT-PMP on the middle network (natpmpc in our gateway's host).
    wait_until(
        lambda: "Public IP address" in lab.run(
            lab.gateway, ["natpmpc", "-g", lab.upstream.address], check=False, timeout=10
        ).stdout,
        15, "the upstream gateway",
    )  # fmt: skip
    config = lab.write_gateway_config(
        LAN_POLICY, upstream={"mode": "auto", **upstream}, network={"address_poll_interval": 0.5}
    )
    lab.start_gateway(config)
    # Our gateway reports the upstream's public address once it has probed it.
    wait_until(
        lambda: public_address(lab, lab.lan[0]) == lab.upstream.external_address,
        20, "the public address over NAT-PMP",
    )  # fmt: skip
    return started


def age_upstream(started: float) -> None:
    time.sleep(max(0.0, started + MIN_UPSTREAM_AGE - time.monotonic()))


def test_natpmpc_mapping_reaches_through_both_nats_and_delete_closes_both(
    cascade: CascadeLab,
) -> None:
    lab = cascade
    start_both(lab)
    service = start_service(lab, lab.lan[0], 8080)
    try:
        mapped = natpmp_map(lab, lab.lan[0], 18080, 8080)
        assert mapped.public_port == 18080
        assert 0 < mapped.lifetime <= 3600
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
        assert "hello from the LAN service" in answer
        held = upstream_listed(lab)
        assert [(m["external_port"], m["internal_address"], m["internal_port"]) for m in held] == [
            (18080, lab.gateway.external_address, 18080)
        ]
        chain = status(lab)["upstream"]
        assert chain["public_address"] == lab.upstream.external_address
        assert chain["local_external_address"] == lab.gateway.external_address
        assert (chain["mirrored"], chain["failing"]) == (1, 0)
        argv = [IGD_SERVER, "status", "--config", str(lab.gateway_config)]
        shown = lab.run(lab.gateway, argv).stdout
        assert (
            f"upstream:         {lab.gateway.external_address} -> {lab.upstream.external_address}"
            f" via pcp (gateway {lab.upstream.address}), double-nat; 1 mirrored, 0 failing"
        ) in shown
        natpmp_map(lab, lab.lan[0], 18080, 8080, lifetime=0)
        wait_until(lambda: upstream_listed(lab) == [], 10, "the upstream mapping to go")
        with pytest.raises(DemoError):
            connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
    finally:
        service.kill()


def test_client_library_over_pcp_gets_the_public_endpoint(cascade: CascadeLab) -> None:
    lab = cascade
    start_both(lab)
    service = start_service(lab, lab.lan[0], 8081)
    code = (
        "import asyncio, json\n"
        "from igd.client import PortMapper\n"
        "async def main():\n"
        "    pm = PortMapper()\n"
        "    m = await pm.map(8081, 'tcp', external_port=28081, lifetime=600, via='pcp')\n"
        "    print(json.dumps(m.to_dict()), flush=True)\n"
        "    await m.detach()\n"
        "    await pm.close()\n"
        "asyncio.run(main())\n"
    )
    try:
        got = json.loads(lab.python(lab.lan[0], code, timeout=60).stdout.splitlines()[-1])
        assert got["external_address"] == lab.upstream.external_address
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, got["external_port"])
        assert "hello from the LAN service" in answer
    finally:
        service.kill()


def test_upstream_refusal_reaches_the_client(cascade: CascadeLab) -> None:
    lab = cascade
    start_both(lab)
    # Our policy grants 2323; the upstream's refuses it: NAT-PMP NOT_AUTHORIZED (2).
    argv = ["natpmpc", "-g", lab.gateway.address, "-a", "2323", "2323", "tcp", "600"]
    out = lab.run(lab.lan[0], argv, check=False, timeout=10)
    assert out.returncode != 0
    assert "not authorized" in out.stdout + out.stderr
    assert "Mapped public port" not in out.stdout
    # Nothing is left behind: the local mapping went with the refusal.
    assert upstream_listed(lab) == []
    chain = status(lab)["upstream"]
    assert chain["last_error"] and "2323" in chain["last_error"]


def test_upstream_restart_is_repaired(cascade: CascadeLab) -> None:
    lab = cascade
    started = start_both(lab)
    service = start_service(lab, lab.lan[0], 8082)
    try:
        mapped = natpmp_map(lab, lab.lan[0], 18082, 8082)
        age_upstream(started)
        # The upstream loses its state: killed, its lease store and kernel table gone.
        lab.stop_upstream(signal.SIGKILL)
        for path in (lab.workdir / "upstream-state").glob("leases.sqlite*"):
            path.unlink()
        lab.run(lab.upstream, ["nft", "delete", "table", "ip", "igd"])
        with pytest.raises(DemoError):
            connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
        lab.start_upstream(lab.workdir / "upstream.toml")
        # Its new epoch reaches our mirror (announcement or next answer), which maps again.
        wait_until(
            lambda: [m["external_port"] for m in upstream_listed(lab)] == [18082],
            20, "the upstream mapping to be re-created",
        )  # fmt: skip
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
        assert "hello from the LAN service" in answer
    finally:
        service.kill()


def test_upstream_that_goes_away_is_reported_then_repaired(cascade: CascadeLab) -> None:
    lab = cascade
    started = start_both(lab, check_interval=1.0)
    service = start_service(lab, lab.lan[0], 8085)
    try:
        mapped = natpmp_map(lab, lab.lan[0], 18085, 8085)
        age_upstream(started)
        lab.stop_upstream(signal.SIGKILL)
        for path in (lab.workdir / "upstream-state").glob("leases.sqlite*"):
            path.unlink()
        lab.run(lab.upstream, ["nft", "delete", "table", "ip", "igd"])
        wait_until(lambda: not status(lab)["upstream"]["reachable"], 15, "the outage reported")
        assert "does not answer" in status(lab)["upstream"]["last_error"]
        lab.start_upstream(lab.workdir / "upstream.toml")
        wait_until(
            lambda: [m["external_port"] for m in upstream_listed(lab)] == [18085],
            20, "the upstream mapping to be re-created",
        )  # fmt: skip
        wait_until(lambda: status(lab)["upstream"]["reachable"], 10, "the upstream back")
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
        assert "hello from the LAN service" in answer
    finally:
        service.kill()


@pytest.mark.parametrize("mode", ["natpmp", "pcp"])
def test_our_restart_keeps_one_upstream_mapping(cascade: CascadeLab, mode: str) -> None:
    lab = cascade
    start_both(lab, mode=mode)
    service = start_service(lab, lab.lan[0], 8083)
    try:
        mapped = natpmp_map(lab, lab.lan[0], 18083, 8083)
        config = lab.gateway_config
        assert config is not None
        lab.stop_gateway()
        lab.start_gateway(config)
        wait_until(
            lambda: [m["external_port"] for m in upstream_listed(lab)] == [18083],
            20, "the upstream mapping after our restart",
        )  # fmt: skip
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
        assert "hello from the LAN service" in answer
        assert len(upstream_listed(lab)) == 1
    finally:
        service.kill()


@pytest.mark.skipif(miniupnpd_version() is None, reason="Debian's miniupnpd is not installed")
def test_miniupnpd_upstream_natpmpc_reaches_through_both_nats() -> None:
    # miniupnpd refuses a private or documentation WAN address: a public-looking one.
    with CascadeLab(public_network=PUBLIC_LOOKING_WAN) as lab:
        site = UpstreamSite(lab).as_lab()
        with Miniupnpd(site, MiniupnpdOptions(min_lifetime=2)) as mini:
            config = lab.write_gateway_config(LAN_POLICY, upstream={"mode": "auto"})
            lab.start_gateway(config)
            wait_until(
                lambda: public_address(lab, lab.lan[0]) == lab.upstream.external_address,
                20, "the public address over NAT-PMP",
            )  # fmt: skip
            service = start_service(lab, lab.lan[0], 8084)
            try:
                mapped = natpmp_map(lab, lab.lan[0], 18084, 8084)
                answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
                assert "hello from the LAN service" in answer
                chain = status(lab)["upstream"]
                assert (chain["mirrored"], chain["mechanism"]) == (1, "pcp")
                assert mini.rule_count() == 1
                natpmp_map(lab, lab.lan[0], 18084, 8084, lifetime=0)
                wait_until(lambda: mini.rule_count() == 0, 10, "miniupnpd to drop its rule")
                with pytest.raises(DemoError):
                    connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
            finally:
                service.kill()


def test_upnp_mirroring_onto_igd_server(cascade: CascadeLab) -> None:
    lab = cascade
    lab.start_upstream(lab.write_upstream_config(UPSTREAM_POLICY, upnp={"enabled": True}))
    wait_until(
        lambda: "Public IP address" in lab.run(
            lab.gateway, ["natpmpc", "-g", lab.upstream.address], check=False, timeout=10
        ).stdout,
        15, "the upstream gateway",
    )  # fmt: skip
    lab.start_gateway(lab.write_gateway_config(LAN_POLICY, upstream={"mode": "upnp"}))
    service = start_service(lab, lab.lan[0], 8086)
    try:
        mapped = wait_until(
            lambda: natpmp_map(lab, lab.lan[0], 18086, 8086), 20, "our gateway to answer"
        )
        mapped = natpmp_map(lab, lab.lan[0], 18086, 8086)  # the renewal finds the public port
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
        assert "hello from the LAN service" in answer
        held = upstream_listed(lab)
        assert [(m["mechanism"], m["internal_port"]) for m in held] == [("upnp", 18086)]
        assert status(lab)["upstream"]["mechanism"] == "upnp"
        natpmp_map(lab, lab.lan[0], 18086, 8086, lifetime=0)
        wait_until(lambda: upstream_listed(lab) == [], 10, "the upstream mapping to go")
    finally:
        service.kill()


def test_kill_9_of_our_gateway_renews_the_same_pcp_upstream_mappings(cascade: CascadeLab) -> None:
    # A killed gateway releases nothing: the upstream keeps its PCP mappings under the killed
    # run's nonces. The next run asks with the same nonces (kept in its state directory), so
    # the upstream renews them rather than refusing another nonce (RFC 6887 §11.1).
    lab = cascade
    start_both(lab, mode="pcp")
    service = start_service(lab, lab.lan[0], 8087)
    try:
        mapped = natpmp_map(lab, lab.lan[0], 18087, 8087)
        natpmp_map(lab, lab.lan[0], 18088, 8088)
        before = sorted((m["internal_port"], m["external_port"]) for m in upstream_listed(lab))
        assert [port for port, _ in before] == [18087, 18088]
        config = lab.gateway_config
        assert config is not None
        lab.stop_gateway(signal.SIGKILL)
        assert len(upstream_listed(lab)) == 2  # still held upstream, nobody released them
        logged = len(lab.gateway_log())
        lab.start_gateway(config)
        wait_until(
            lambda: status(lab)["upstream"]["mirrored"] == 2, 20, "both mirrored again"
        )  # fmt: skip
        after = sorted((m["internal_port"], m["external_port"]) for m in upstream_listed(lab))
        assert after == before  # each exactly once, the same public ports
        assert status(lab)["upstream"]["failing"] == 0
        assert "upstream refused" not in lab.gateway_log()[logged:]
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
        assert "hello from the LAN service" in answer
    finally:
        service.kill()


def test_upstream_that_is_ourselves_is_a_loop_and_mirroring_stops(cascade: CascadeLab) -> None:
    lab = cascade
    # A mistaken [upstream] gateway: our own LAN address. Every upstream request would come
    # back to us; mirroring is turned off instead, said in the log and the status.
    config = lab.write_gateway_config(
        LAN_POLICY, upstream={"mode": "pcp", "gateway": lab.gateway.address}
    )
    lab.start_gateway(config)
    wait_until(lambda: status(lab)["upstream"]["verdict"] == "loop", 20, "the loop reported")
    chain = status(lab)["upstream"]
    assert not chain["active"] and "loop" in chain["last_error"]
    assert "mirroring loop" in lab.gateway_log()
    argv = [IGD_SERVER, "status", "--config", str(config)]
    shown = lab.run(lab.gateway, argv).stdout
    assert "upstream:         pcp, loop: not mirroring" in shown
    assert "upstream error:   mirroring loop" in shown
    # Clients are served with the local endpoint, and nothing multiplies.
    mapped = natpmp_map(lab, lab.lan[0], 18091, 8091)
    assert (mapped.public_port, mapped.lifetime) == (18091, 3600)
    assert public_address(lab, lab.lan[0]) == lab.gateway.external_address
    time.sleep(1.0)
    argv = [IGD_SERVER, "list", "--json", "--config", str(config)]
    ours = json.loads(lab.run(lab.gateway, argv).stdout)
    assert [m["external_port"] for m in ours] == [18091]


def test_more_mappings_than_the_client_librarys_default_bound_are_all_mirrored() -> None:
    # PortMapper holds 256 mappings by default; the gateway's mirror raises it to
    # [upstream] max_mappings, so every one of 300 grants gets its upstream mapping.
    lab = rate_lab("pcp")
    try:
        report = load_batch(lab, RATE_FIRST_PORT, 300, MAX_WINDOW, 60)
        answers = report["answers"].values()
        assert len(answers) == 300
        assert all(result == 0 and lifetime > 30 for result, lifetime, _ in answers)
        held = upstream_listed(lab)
        assert len(held) == 300
        assert {m["internal_port"] for m in held} == set(
            range(RATE_FIRST_PORT, RATE_FIRST_PORT + 300)
        )
        chain = status(lab)["upstream"]
        assert (chain["mirrored"], chain["failing"]) == (300, 0)
    finally:
        lab.teardown()


# The upstream grants only ports of one range, never the local port: the public port differs.
_RANGED_UPSTREAM = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 2
[[rules]]
name = "middle network, {ports}"
action = "allow"
clients = ["192.168.1.0/24"]
internal_ports = "1024-65535"
external_ports = "{ports}"
"""

# In lan1: a PCP client maps 8095 (suggesting 18095), renews with PREFER_FAILURE for the port
# it was told, prints both answers, then prints the first Mapping Update for its nonce.
_PCP_CLIENT = """
import asyncio, json, secrets, sys
from igd.client.pcp import PcpClient
from igd.model import Protocol
from igd.proto import pcp
from igd.proto.pcp import PcpOpcode
async def main():
    client = PcpClient(sys.argv[1])
    updates = asyncio.Queue()
    client.on_unsolicited = updates.put_nowait
    await client.open()
    nonce = secrets.token_bytes(12)
    first = await client.map(Protocol.TCP, 8095, 600, nonce=nonce, external_port=18095)
    renewed = await client.map(Protocol.TCP, 8095, 600, nonce=nonce,
                               external_port=first.external_port, prefer_failure=True)
    print(json.dumps([first.external_port, renewed.external_port,
                      str(renewed.external_address)]), flush=True)
    async with asyncio.timeout(float(sys.argv[2])):
        while True:
            update = await updates.get()
            if update.opcode is PcpOpcode.MAP and update.data.nonce == nonce:
                break
    address = pcp.unmapped(update.data.external_address)
    print(json.dumps([update.data.external_port, str(address), update.lifetime]), flush=True)
asyncio.run(main())
"""


def test_pcp_renewal_and_mapping_update_name_the_upstream_port(cascade: CascadeLab) -> None:
    lab = cascade
    first_range, second_range = "40000-49999", "50000-59999"
    policy = lab.workdir / "ranged-upstream.toml"
    policy.write_text(_RANGED_UPSTREAM.format(ports=first_range))
    started = start_both(lab, policy, mode="pcp", check_interval=1.0)
    service = start_service(lab, lab.lan[0], 8095)
    client = lab.python_popen(
        lab.lan[0], ["-c", _PCP_CLIENT, lab.gateway.address, "40"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stderr is not None
        line = client.stdout.readline()
        assert line, client.stderr.read()
        told, renewed, address = json.loads(line)
        # Told the upstream's port; the PREFER_FAILURE renewal of that port succeeds.
        assert 40000 <= told <= 49999 and renewed == told
        assert address == lab.upstream.external_address
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, told)
        assert "hello from the LAN service" in answer
        # The upstream loses its state and comes back granting another range: the mirror
        # re-creates the mapping on a new public port, and the PCP client hears of it in a
        # Mapping Update (RFC 6887 §14.2) carrying that port, not our local 18095.
        age_upstream(started)
        lab.stop_upstream(signal.SIGKILL)
        for path in (lab.workdir / "upstream-state").glob("leases.sqlite*"):
            path.unlink()
        lab.run(lab.upstream, ["nft", "delete", "table", "ip", "igd"])
        policy.write_text(_RANGED_UPSTREAM.format(ports=second_range))
        lab.start_upstream(lab.workdir / "upstream.toml")
        line = client.stdout.readline()
        assert line, client.stderr.read()
        port, address, lifetime = json.loads(line)
        assert 50000 <= port <= 59999 and address == lab.upstream.external_address
        assert 0 < lifetime <= 600
        answer = connect(lab, lab.wan[0], lab.upstream.external_address, port)
        assert "hello from the LAN service" in answer
    finally:
        client.kill()
        service.kill()


@pytest.mark.skipif(miniupnpd_version() is None, reason="Debian's miniupnpd is not installed")
def test_kill_9_of_our_gateway_with_miniupnpd_upstream_leaves_one_mapping_each() -> None:
    # miniupnpd 2.3.1 renews a MAP for a held internal endpoint whatever its nonce, so this
    # shows interoperation (no duplicate, no refusal), not the nonce rule igd-server enforces.
    with CascadeLab(public_network=PUBLIC_LOOKING_WAN) as lab:
        site = UpstreamSite(lab).as_lab()
        with Miniupnpd(site, MiniupnpdOptions(min_lifetime=2)) as mini:
            config = lab.write_gateway_config(LAN_POLICY, upstream={"mode": "pcp"})
            lab.start_gateway(config)
            wait_until(
                lambda: public_address(lab, lab.lan[0]) == lab.upstream.external_address,
                20, "the public address over NAT-PMP",
            )  # fmt: skip
            service = start_service(lab, lab.lan[0], 8096)
            try:
                mapped = natpmp_map(lab, lab.lan[0], 18096, 8096)
                natpmp_map(lab, lab.lan[0], 18097, 8097)
                assert mini.rule_count() == 2
                lab.stop_gateway(signal.SIGKILL)
                logged = len(lab.gateway_log())
                lab.start_gateway(config)
                wait_until(lambda: status(lab)["upstream"]["mirrored"] == 2, 20, "mirrored again")
                assert mini.rule_count() == 2  # renewed, not doubled
                assert "upstream refused" not in lab.gateway_log()[logged:]
                answer = connect(lab, lab.wan[0], lab.upstream.external_address, mapped.public_port)
                assert "hello from the LAN service" in answer
            finally:
                service.kill()


PEER_CODE = """
import json, socket, sys
from ipaddress import IPv4Address
from igd.proto import pcp
from igd.proto.pcp import PcpOpcode, PcpPeerData, PcpRequest
gateway, client, remote = sys.argv[1], IPv4Address(sys.argv[2]), IPv4Address(sys.argv[3])
data = PcpPeerData(bytes(range(12)), 6, 8095, 0, pcp.mapped(IPv4Address(0)), 443,
                   pcp.mapped(remote))
request = PcpRequest(PcpOpcode.PEER, 600, pcp.mapped(client), data)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(5)
    sock.sendto(pcp.encode_request(request), (gateway, 5351))
    answer = pcp.decode_response(sock.recv(1100))
print(json.dumps({"result": answer.result.name, "lifetime": answer.lifetime,
                  "address": str(pcp.unmapped(answer.data.external_address)),
                  "port": answer.data.external_port}))
"""


def test_pcp_peer_answer_names_the_public_endpoint_and_is_held_upstream(
    cascade: CascadeLab,
) -> None:
    lab = cascade
    start_both(lab)
    argv = ["-c", PEER_CODE, lab.gateway.address, lab.lan[0].address, lab.wan[0].address]
    got = json.loads(lab.python(lab.lan[0], argv, timeout=30).stdout.splitlines()[-1])
    assert got["result"] == "SUCCESS"
    # RFC 7648: the remote peer sees the upstream's endpoint, so the client is told that.
    assert got["address"] == lab.upstream.external_address
    assert 0 < got["lifetime"] <= 600
    argv = [IGD_SERVER, "list", "--json", "--config", str(lab.gateway_config)]
    ours = json.loads(lab.run(lab.gateway, argv).stdout)
    assert len(ours) == 1
    local_port = ours[0]["external_port"]
    held = upstream_listed(lab)
    assert [(m["external_port"], m["internal_address"], m["internal_port"]) for m in held] == [
        (got["port"], lab.gateway.external_address, local_port)
    ]
    # Deleting the local PEER mapping (PEER itself never deletes, RFC 6887 §15) releases it.
    argv = [IGD_SERVER, "delete", "tcp", str(local_port), "--remote-host", lab.wan[0].address,
            "--config", str(lab.gateway_config)]  # fmt: skip
    lab.run(lab.gateway, argv)
    wait_until(lambda: upstream_listed(lab) == [], 10, "the upstream mapping to go")


def test_two_gateways_mirroring_onto_each_other_stop_with_a_loop(cascade: CascadeLab) -> None:
    lab = cascade
    # The upstream is told (wrongly) that our gateway is its upstream: each mirrors onto the
    # other. Mirroring must stop with the verdict "loop" instead of a storm of ports.
    upstream_config = lab.write_upstream_config(
        UPSTREAM_POLICY, upstream={"mode": "pcp", "gateway": lab.gateway.external_address}
    )
    lab.start_upstream(upstream_config)
    wait_until(
        lambda: "Public IP address" in lab.run(
            lab.gateway, ["natpmpc", "-g", lab.upstream.address], check=False, timeout=10
        ).stdout,
        15, "the upstream gateway",
    )  # fmt: skip
    config = lab.write_gateway_config(
        LAN_POLICY, upstream={"mode": "pcp"}, network={"address_poll_interval": 0.5}
    )
    lab.start_gateway(config)
    wait_until(lambda: natpmp_map(lab, lab.lan[0], 18096, 8096), 20, "our gateway to map")

    def upstream_status() -> dict[str, Any]:
        argv = [IGD_SERVER, "status", "--json", "--config", str(upstream_config)]
        return json.loads(lab.run(lab.upstream, argv).stdout)  # type: ignore[no-any-return]

    # The upstream finds at start that its "upstream" is on its own LAN (the only way our
    # gateway can answer it, as gateways serve their LAN only): a loop, mirroring off there.
    wait_until(lambda: upstream_status()["upstream"]["verdict"] == "loop", 20, "the loop")
    theirs_chain = upstream_status()["upstream"]
    assert not theirs_chain["active"] and "mirroring loop" in theirs_chain["last_error"]
    assert "mirroring loop" in lab.upstream_log()
    time.sleep(2.0)  # what a storm would have made by now
    argv = [IGD_SERVER, "list", "--json", "--config", str(config)]
    ours = json.loads(lab.run(lab.gateway, argv).stdout)
    theirs = upstream_listed(lab)
    # No port storm: the client's mapping here, its one mirror upstream, no echo back to us.
    assert [m["external_port"] for m in ours] == [18096]
    assert [(m["external_port"], m["internal_address"]) for m in theirs] == [
        (18096, lab.gateway.external_address)
    ]
    chain = status(lab)["upstream"]
    assert (chain["verdict"], chain["mirrored"], chain["failing"]) == ("double-nat", 1, 0)
