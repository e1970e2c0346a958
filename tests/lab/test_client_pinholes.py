"""The client's IPv6 pinholes against igd-server's PCP over IPv6 (`[ipv6] enabled`): a LAN
host's service is reached from the WAN over IPv6 only while our client holds a pinhole,
through the library and through `igd map --ipv6`; unmap and release close it again."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lab import Lab
from tests.lab.client_run import IGD, igd, state_file
from tests.lab.conftest import LAB_POLICY, StartGateway
from tests.lab.test_pinholes_gateway import PORT, kernel, reaches, service, start
from tests.lab.test_upnp_pinholes import start as start_upnp

pytestmark = pytest.mark.lab
__all__ = ["service"]  # the fixture, used by name

_HOLD = """
import asyncio, json, sys
from igd.client import PortMapper
async def main():
    async with PortMapper() as pm:
        p = await pm.pinhole(int(sys.argv[1]), "tcp", lifetime=int(sys.argv[2]))
        print(json.dumps({**p.to_dict(), "repr": repr(p)}), flush=True)
        kinds = []
        p.subscribe(lambda e: kinds.append(e.kind.value))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(json.dumps({"kinds": kinds}), flush=True)
    # leaving the block released the pinhole
asyncio.run(main())
"""


def test_the_library_opens_a_pinhole_the_wan_then_reaches_and_release_closes_it(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway)  # the lab policy's min_lease is 2 s
    assert not reaches(lab, "wan1", lan1)  # the router's default deny (RFC 6092)
    holder = lab.python_popen(
        "lan1", ["-c", _HOLD, str(PORT), "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    pinhole = json.loads(holder.stdout.readline())
    # A pure firewall: the address and port to publish are this host's own (RFC 6887 §11.3).
    assert (pinhole["mechanism"], pinhole["family"]) == ("pcp", 6)
    assert (pinhole["external_address"], pinhole["external_port"]) == (lan1.address6, PORT)
    assert pinhole["internal_address"] == lan1.address6 and pinhole["lifetime"] == 2
    assert [lan1.address6, "tcp", PORT] in kernel(lab)
    assert reaches(lab, "wan1", lan1) and reaches(lab, "wan2", lan1)
    # A 2 s lease outlived: the keeper renewed it over IPv6 with the same nonce.
    lab.run("lan1", ["sleep", "4"])
    assert reaches(lab, "wan1", lan1)
    out, _ = holder.communicate("\n", timeout=30)
    kinds = json.loads(out.splitlines()[-1])["kinds"]
    assert kinds.count("renewed") >= 2 and "failed" not in kinds, kinds
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)


def test_igd_map_ipv6_twice_list_and_unmap_across_runs(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway)
    code, first = igd(lab, "map", f"{PORT}/tcp", "--ipv6", "--lifetime", "600")
    assert code == 0, first
    assert (first["external_address"], first["external_port"]) == (lan1.address6, PORT)
    assert reaches(lab, "wan1", lan1)  # `igd map` leaves it open for its lifetime
    # Another run refreshes it with the nonce the state file kept (a new one is refused).
    code, again = igd(lab, "map", f"{PORT}/tcp", "--ipv6", "--lifetime", "600")
    assert code == 0, again
    assert again["nonce"] == first["nonce"]
    assert "refreshed the mapping of an earlier run (state file)" in again["notes"]
    code, rows = igd(lab, "list")
    assert code == 0
    assert [(r["internal_address"], r["internal_port"], r["mechanism"]) for r in rows] == [
        (lan1.address6, PORT, "pcp")
    ]
    code, closed = igd(lab, "unmap", f"{PORT}/tcp", "--ipv6")
    assert code == 0, closed
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)
    assert igd(lab, "list") == (0, [])
    code, error = igd(lab, "unmap", f"{PORT}/tcp", "--ipv6")
    assert (code, error["type"]) == (4, "NoSuchMapping")


def test_igd_map_both_maps_ipv4_and_opens_ipv6(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway)
    code, both = igd(lab, "map", f"{PORT}/tcp", "--both", "--lifetime", "600")
    assert code == 0, both
    assert both["errors"] == []
    assert both["ipv4"]["external_address"] == lab.gateway.external_address
    assert both["ipv6"]["external_address"] == lan1.address6
    assert reaches(lab, "wan1", lan1)
    code, rows = igd(lab, "list")
    assert sorted(r["internal_address"] for r in rows) == sorted([lan1.address, lan1.address6])
    assert igd(lab, "unmap", f"{PORT}/tcp", "--ipv6")[0] == 0
    assert igd(lab, "unmap", f"{PORT}/tcp")[0] == 0
    assert igd(lab, "list") == (0, [])


def test_probe_reports_ipv6_pinhole_capability(lab: Lab, gateway: StartGateway) -> None:
    start(lab, gateway)
    code, report = igd(lab, "probe")
    assert code == 0, report
    six = report["ipv6"]
    assert six["router"] == lab.gateway.address6
    assert six["local_address"] == lab.lan[0].address6
    assert six["pcp"]["available"] and isinstance(six["pcp"]["epoch"], int)
    # UPnP is off in this config: the report says why there are no UPnP pinholes.
    assert six["upnp"]["available"] is False and six["upnp"]["error"]


def test_without_ipv6_on_the_router_a_pinhole_is_a_typed_error(
    lab: Lab, gateway: StartGateway
) -> None:
    gateway()  # [ipv6] off: nothing answers PCP over IPv6
    code, error = igd(lab, "map", f"{PORT}/tcp", "--ipv6", "--timeout", "8")
    assert code == 3, error
    assert error["type"] in ("NoGatewayError", "GatewayTimeout")
    code, report = igd(lab, "probe")
    assert report["ipv6"]["pcp"]["available"] is False


_WATCH = """
import asyncio, json, sys
from igd.client import EventKind, PortMapper
async def main():
    async with PortMapper(recovery_delay=0.5) as pm:
        p = await pm.pinhole(int(sys.argv[1]), "tcp", lifetime=600)
        print(json.dumps(p.to_dict()), flush=True)
        event = await p.wait_for(EventKind.RECREATED, within=20)
        print(json.dumps({"event": event.kind.value, "lifetime": p.lifetime}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


def test_a_router_that_lost_its_pinholes_is_noticed_by_its_announcement(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway)
    watcher = lab.python_popen(
        "lan1", ["-c", _WATCH, str(PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert watcher.stdin is not None and watcher.stdout is not None
    assert json.loads(watcher.stdout.readline())["family"] == 6
    assert reaches(lab, "wan1", lan1)
    # The router restarts with none of its state (another state directory): the pinhole is
    # gone from the kernel, and its epoch starts again. Its ANNOUNCE to [ff02::1]:5350 makes
    # the client ask, see the epoch go back (RFC 6887 §8.5) and open the pinhole again, long
    # before the 600 s lease would have been renewed.
    # RFC 6887 §8.5 allows 2 s of slack: a restart sooner than that after the last answer
    # cannot be told from the epochs, so the router runs a while first.
    lab.run("lan1", ["sleep", "4"])
    lab.stop_gateway()
    config = lab.write_gateway_config(LAB_POLICY, state_name="fresh", ipv6={"enabled": True})
    lab.start_gateway(config)
    event = json.loads(watcher.stdout.readline())
    assert event["event"] == "recreated", lab.gateway_log()[-2000:]
    assert [lan1.address6, "tcp", PORT] in kernel(lab)
    assert reaches(lab, "wan1", lan1)
    watcher.communicate("\n", timeout=30)


def test_igd_map_ipv6_via_upnp_opens_renews_and_unmap_closes_on_igd_server(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start_upnp(lab, gateway)
    assert not reaches(lab, "wan1", lan1)
    code, first = igd(lab, "map", f"{PORT}/tcp", "--ipv6", "--via", "upnp", "--lifetime", "600")
    assert code == 0, (first, lab.gateway_log()[-3000:])
    assert (first["mechanism"], first["family"]) == ("upnp", 6), first
    assert (first["external_address"], first["external_port"]) == (lan1.address6, PORT)
    assert isinstance(first["unique_id"], int)
    assert [lan1.address6, "tcp", PORT] in kernel(lab)
    assert reaches(lab, "wan1", lan1)
    # Another run: UpdatePinhole with the UniqueID the state file kept, not a second pinhole.
    code, again = igd(lab, "map", f"{PORT}/tcp", "--ipv6", "--lifetime", "600")
    assert code == 0, again
    assert (again["mechanism"], again["unique_id"]) == ("upnp", first["unique_id"]), again
    assert kernel(lab) == [[lan1.address6, "tcp", PORT]]
    code, closed = igd(lab, "unmap", f"{PORT}/tcp", "--ipv6")
    assert code == 0, closed
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)
    assert igd(lab, "list") == (0, [])


_HOLD_UPNP = """
import asyncio, json, sys
from igd.client import PortMapper
async def main():
    async with PortMapper() as pm:
        p = await pm.pinhole(int(sys.argv[1]), "tcp", lifetime=2, via="upnp")
        print(json.dumps(p.to_dict()), flush=True)
        kinds = []
        p.subscribe(lambda e: kinds.append(e.kind.value + (f": {e.error}" if e.error else "")))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(json.dumps({"kinds": kinds, "id": p.unique_id}), flush=True)
asyncio.run(main())
"""


def test_the_library_holds_a_upnp_pinhole_on_igd_server_renewing_it_until_release(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start_upnp(lab, gateway)
    holder = lab.python_popen(
        "lan1", ["-c", _HOLD_UPNP, str(PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    pinhole = json.loads(holder.stdout.readline())
    assert (pinhole["mechanism"], pinhole["family"]) == ("upnp", 6), pinhole
    assert reaches(lab, "wan1", lan1)
    # A lease of 2 s outlived twice over: UpdatePinhole kept it open all along.
    lab.run("lan1", ["sleep", "5"])
    assert reaches(lab, "wan1", lan1)
    out, _ = holder.communicate("\n", timeout=30)
    result = json.loads(out.splitlines()[-1])
    assert result["kinds"].count("renewed") >= 2, result
    assert not any(k.startswith("failed") for k in result["kinds"]), result
    assert result["id"] == pinhole["unique_id"]
    # Leaving the block sent DeletePinhole.
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)


def test_igd_map_keep_via_upnp_holds_the_pinhole_until_sigterm(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start_upnp(lab, gateway)
    argv = [IGD, "--json", "--state-file", state_file(lab), "map", f"{PORT}/tcp", "--ipv6"]
    proc = lab.popen(
        "lan1", [*argv, "--via", "upnp", "--lifetime", "300", "--keep"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    pinhole = json.loads(proc.stdout.readline())
    assert (pinhole["mechanism"], pinhole["family"]) == ("upnp", 6), pinhole
    assert reaches(lab, "wan1", lan1)
    proc.terminate()
    assert proc.wait(15) == 0
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)


def test_probe_reports_upnp_pinholes_on_igd_server(lab: Lab, gateway: StartGateway) -> None:
    start_upnp(lab, gateway)
    code, report = igd(lab, "probe")
    assert code == 0, report
    upnp = report["ipv6"]["upnp"]
    assert upnp["available"], report["ipv6"]
    assert (upnp["firewall_enabled"], upnp["inbound_pinhole_allowed"]) == (True, True)
    assert upnp["location"].startswith(f"http://[{lab.gateway.address6}]:")


_REMOTE = """
import json, sys
from igd.client import SyncPortMapper
with SyncPortMapper() as pm:
    p = pm.pinhole(int(sys.argv[1]), "tcp", lifetime=600, via=sys.argv[2], remote=sys.argv[3])
    print(json.dumps(p.to_dict()), flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("via", ["pcp", "upnp"])
def test_a_pinhole_for_one_remote_peer_lets_in_that_peer_only(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str], via: str
) -> None:
    lan1, wan1 = lab.lan[0], lab.wan[0]
    start_upnp(lab, gateway)
    holder = lab.python_popen(
        "lan1", ["-c", _REMOTE, str(PORT), via, wan1.address6],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    line = holder.stdout.readline()
    assert line, lab.gateway_log()[-2000:]
    assert json.loads(line)["mechanism"] == via
    # PCP FILTER (RFC 6887 §13.3) or UPnP RemoteHost: wan1 gets in, wan2 does not.
    assert reaches(lab, "wan1", lan1)
    assert not reaches(lab, "wan2", lan1)
    holder.communicate("\n", timeout=30)
    assert not reaches(lab, "wan1", lan1)


_EXPOSE = """
import json, sys
from igd.client import SyncPortMapper
with SyncPortMapper() as pm:
    both = pm.expose(int(sys.argv[1]), "tcp", lifetime=600)
    print(json.dumps({"four": both.mapping and both.mapping.to_dict(),
                      "six": both.pinhole and both.pinhole.to_dict(),
                      "errors": [str(e) for e in both.errors]}), flush=True)
    sys.stdin.readline()
    both.release()
    print(json.dumps({"released": [both.mapping.released, both.pinhole.released]}), flush=True)
"""


def test_sync_expose_maps_ipv4_and_opens_ipv6_until_release(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway)
    holder = lab.python_popen(
        "lan1", ["-c", _EXPOSE, str(PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    both = json.loads(holder.stdout.readline())
    assert both["errors"] == [], both
    assert both["four"]["external_address"] == lab.gateway.external_address
    assert (both["six"]["family"], both["six"]["external_address"]) == (6, lan1.address6)
    assert reaches(lab, "wan1", lan1)
    out, _ = holder.communicate("\n", timeout=30)
    assert json.loads(out.splitlines()[-1]) == {"released": [True, True]}
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)


_MOVE = """
import asyncio, json, sys
from igd.client import EventKind, PortMapper
async def main():
    async with PortMapper(network_check=1, recovery_delay=0.5) as pm:
        p = await pm.pinhole(int(sys.argv[1]), "tcp", lifetime=600, via=sys.argv[2])
        print(json.dumps(p.to_dict()), flush=True)
        event = await p.wait_for(EventKind.RECREATED, within=30)
        print(json.dumps({"event": event.kind.value, **p.to_dict()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


@pytest.mark.parametrize("via", ["pcp", "upnp"])
def test_a_held_pinhole_moves_to_the_new_address_after_a_lan_renumbering(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str], tmp_path: Path, via: str
) -> None:
    lan1, gw = lab.lan[0], lab.gateway
    # A policy naming the ISP's whole delegation (a /60) admits the LAN after it moves.
    policy = tmp_path / "delegation.toml"
    policy.write_text(
        LAB_POLICY.read_text().replace('"2001:db8:0:77::/64"', '"2001:db8:0:70::/60"')
    )
    start_upnp(lab, gateway, policy)
    holder = lab.python_popen(
        "lan1", ["-c", _MOVE, str(PORT), via],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    first = json.loads(holder.stdout.readline())
    assert (first["mechanism"], first["internal_address"]) == (via, lan1.address6)
    new_gw, new_lan1 = "2001:db8:0:78::1", lan1.address6.replace(":77:", ":78:")
    lab.run(gw, ["ip", "-6", "addr", "add", f"{new_gw}/64", "dev", gw.interface, "nodad"])
    lab.run(gw, ["ip", "-6", "addr", "del", f"{gw.address6}/64", "dev", gw.interface])
    lab.run(lan1, ["ip", "-6", "addr", "add", f"{new_lan1}/64", "dev", lan1.interface, "nodad"])
    lab.run(lan1, ["ip", "-6", "addr", "del", f"{lan1.address6}/64", "dev", lan1.interface])
    lab.run(lan1, ["ip", "-6", "route", "replace", "default", "via", new_gw])
    lab.run("wan1", ["ip", "-6", "route", "add", "2001:db8:0:78::/64", "via",
                     gw.external_address6])  # fmt: skip
    # The client's network watch sees the new router and address and opens the pinhole
    # again there (the gateway removed the old one: off the new prefix).
    line = holder.stdout.readline()
    assert line, lab.gateway_log()[-3000:]
    moved = json.loads(line)
    assert moved["event"] == "recreated"
    assert (moved["mechanism"], moved["internal_address"]) == (via, new_lan1)
    assert moved["external_address"] == new_lan1
    deadline = time.monotonic() + 5
    while [new_lan1, "tcp", PORT] not in kernel(lab) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernel(lab) == [[new_lan1, "tcp", PORT]]
    assert reaches(lab, "wan1", replace(lan1, address6=new_lan1))
    holder.communicate("\n", timeout=30)
    assert kernel(lab) == []
