"""The client library and the `igd` command against this project's igd-server (NAT-PMP, PCP
and UPnP IGD) in the namespace lab: mapping, reachability, renewal, restart recovery,
release, refusal, and the synchronous wrapper."""

from __future__ import annotations

import json
import secrets
import select
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from lab.bench_client import client_python
from lab.demo import DemoError, connect, start_service, wait_for_gateway
from tests.lab.client_run import IGD, igd, renew_script, state_file
from tests.lab.test_pinholes_gateway import kernel as pinholes

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "lab.toml"
FLUSH = {"table": "igd", "on_stop": "flush"}
UPNP = {"enabled": True}  # igd_version "auto": IGD:2, and IGD:1 to v1-only control points
# miniupnpc and most control points take a reserved external address (the lab's default
# documentation range) for "not connected"; this range looks public and exists only in labs.
PUBLIC_LOOKING_WAN = "100.128.7.0/24"


def start_gateway(lab: Lab, *, ipv6: bool = False, **upnp: object) -> None:
    """igd-server with NAT-PMP, PCP and UPnP (and PCP over IPv6 if `ipv6`); waits until
    NAT-PMP and UPnP HTTP answer."""
    sections: dict[str, dict[str, object]] = {"nftables": FLUSH, "upnp": {**UPNP, **upnp}}
    if ipv6:
        sections["ipv6"] = {"enabled": True}
    config = lab.write_gateway_config(POLICY, **sections)  # type: ignore[arg-type]
    lab.start_gateway(config)
    wait_for_gateway(lab)
    deadline = time.monotonic() + 10
    while lab.gateway_log().count("UPnP HTTP listening") < lab.gateway_log().count("--- "):
        if time.monotonic() > deadline:
            raise AssertionError(f"UPnP did not start:\n{lab.gateway_log()}")
        time.sleep(0.05)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(prefix=f"igdcli2{secrets.token_hex(3)}", wan_hosts=1, lan_hosts=1) as built:
        start_gateway(built)
        yield built


@pytest.fixture
def public_lab() -> Iterator[Lab]:
    with Lab(
        prefix=f"igdcli2{secrets.token_hex(3)}",
        wan_hosts=1,
        lan_hosts=1,
        wan_network=PUBLIC_LOOKING_WAN,
    ) as built:
        start_gateway(built)
        yield built


def kernel_ports(lab: Lab) -> list[int]:
    out = lab.run(lab.gateway, ["nft", "-j", "list", "map", "ip", "igd", "portmap"], check=False)
    if out.returncode != 0:
        return []
    ports = []
    for item in json.loads(out.stdout)["nftables"]:
        for element in item.get("map", {}).get("elem", []):
            key = element[0]["elem"]["val"] if "elem" in element[0] else element[0]
            ports.append(int(key["concat"][1]))
    return sorted(ports)


_MAP_CHECK_RELEASE = """
import asyncio, json, sys
from igd.client import PortMapper
async def main():
    async with PortMapper() as pm:
        m = await pm.map(int(sys.argv[1]), "tcp", lifetime=600, via=sys.argv[2] or None,
                         description="lab test")
        print(json.dumps(m.to_dict()), flush=True)
        sys.stdin.readline()  # the test checks reachability, then lets us release
asyncio.run(main())
print(json.dumps({"released": True}))
"""


@pytest.mark.parametrize("via", ["pcp", "natpmp", "upnp", ""])
def test_map_reaches_the_lan_service_and_release_removes_it(lab: Lab, via: str) -> None:
    start_service(lab, "lan1", 8080)
    proc = lab.python_popen(
        "lan1", ["-c", _MAP_CHECK_RELEASE, "8080", via],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the client did not map in time"
    mapping = json.loads(proc.stdout.readline())
    assert mapping["mechanism"] == (via or "pcp")  # PCP is preferred when both work
    assert mapping["external_address"] == lab.gateway.external_address
    assert kernel_ports(lab) == [mapping["external_port"]]
    answer = connect(lab, "wan1", lab.gateway.external_address, mapping["external_port"])
    assert "hello" in answer
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"released": True}
    proc.wait(10)
    assert kernel_ports(lab) == []
    with pytest.raises(DemoError):
        connect(lab, "wan1", lab.gateway.external_address, mapping["external_port"])


@pytest.mark.parametrize("via", ["pcp", "natpmp", "upnp"])
def test_renews_on_its_own_past_the_first_lifetime(lab: Lab, via: str) -> None:
    started = time.monotonic()
    result = client_python(lab, "lan1", renew_script(via, 7))
    assert result["kinds"] == ["renewed"] * 4  # no failure, no loss in between
    assert result["lifetime"] == 2
    assert time.monotonic() - started > 4  # four renewals at half of 2 s: past 2 lifetimes
    assert "expired" not in lab.gateway_log()


_WATCH = """
import asyncio, json, sys
from igd.client import PortMapper
async def main():
    async with PortMapper(recovery_delay=0.5) as pm:
        m = await pm.map(8080, "tcp", lifetime=120, via=sys.argv[1])
        m.subscribe(lambda e: print(json.dumps({"event": e.kind.value,
                                                 "port": e.external_port}), flush=True))
        print(json.dumps({"event": "mapped", "port": m.external_port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


def _next_event(proc: subprocess.Popen[str], kind: str, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        event: dict[str, Any] = json.loads(proc.stdout.readline() or "{}")
        if event.get("event") == kind:
            return event
    raise AssertionError(f"no {kind!r} event within {timeout} s")


@pytest.mark.parametrize("via", ["pcp", "natpmp", "upnp"])
def test_recreates_the_mapping_after_a_restart_that_lost_state(lab: Lab, via: str) -> None:
    start_service(lab, "lan1", 8080)
    proc = lab.python_popen(
        "lan1", ["-c", _WATCH, via], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    port = _next_event(proc, "mapped", 20)["port"]
    assert kernel_ports(lab) == [port]
    # RFC 6887 §8.5 tolerates 2 s of clock skew: a restart is visible in the epoch once the
    # gateway had been up for longer than that.
    time.sleep(3)
    assert lab.stop_gateway() == 0
    assert kernel_ports(lab) == []  # on_stop = "flush": the gateway forgot everything
    restarted = time.monotonic()
    lab.start_gateway(lab.gateway_config or "")
    # The new epoch (announcements at start) or the new BOOTID (SSDP NOTIFY at start) tells
    # the client; 0-0.5 s later it re-maps.
    assert _next_event(proc, "recreated", 10)["port"] == port
    assert time.monotonic() - restarted < 10
    assert "restored 0 of 0 persisted mappings" in lab.gateway_log().rsplit("--- ", 1)[-1]
    assert kernel_ports(lab) == [port]
    assert "hello" in connect(lab, "wan1", lab.gateway.external_address, port)
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(15)
    assert kernel_ports(lab) == []


@pytest.mark.parametrize("via", ["pcp", "natpmp", "upnp"])
def test_policy_refusal_is_a_typed_error_and_exit_code_4(lab: Lab, via: str) -> None:
    code, error = igd(lab, "map", "23/tcp", "--via", via)  # lab.toml: "no telnet"
    assert code == 4
    assert (error["type"], error["advice"], error["mechanism"]) == (
        "NotAuthorized", "not-authorized", via,
    )  # fmt: skip
    if via == "upnp":
        assert error["code"] == 606  # IGD:2 Action Not Authorized
    # A policy refusal is not "try again later" (RFC 6887 §7.4: it holds for its lifetime).
    assert error["retry_after"] is None
    if via == "pcp":
        assert error["error_lifetime"] > 0
    assert kernel_ports(lab) == []
    assert "refused" in lab.gateway_log()


def test_igd1_policy_refusal_is_718_and_no_port_is_taken(lab: Lab) -> None:
    # IGD:1 has no 606: a refusal is 718 ConflictInMappingEntry, which the client cannot
    # tell from a taken port. It tries other ports (the policy refuses those too), then
    # says so with the typed error for 718, still exit code 4.
    lab.stop_gateway()
    start_gateway(lab, igd_version=1)
    code, error = igd(lab, "map", "23/tcp", "--via", "upnp")
    assert code == 4
    assert (error["type"], error["advice"], error["code"]) == ("PortUnavailable", "other-port", 718)
    assert kernel_ports(lab) == []


def test_probe_reports_double_nat_for_the_documentation_address(lab: Lab) -> None:
    code, report = igd(lab, "probe")
    assert code == 0
    assert report["external_address"] == lab.gateway.external_address  # 203.0.113.1
    assert report["verdict"] == "double-nat"
    for mechanism in ("pcp", "natpmp", "upnp"):
        assert report["mechanisms"][mechanism]["available"], report["mechanisms"][mechanism]
        assert report["mechanisms"][mechanism]["address_kind"] == "reserved"
    assert igd(lab, "ip") == (0, {"external_address": "203.0.113.1", "verdict": "double-nat"})


def test_probe_sees_all_three_mechanisms_and_a_public_address(public_lab: Lab) -> None:
    lab = public_lab
    code, report = igd(lab, "probe")
    assert code == 0
    assert (report["verdict"], report["chosen"]) == ("public", "pcp")
    assert report["external_address"] == lab.gateway.external_address
    for mechanism in ("pcp", "natpmp", "upnp"):
        assert report["mechanisms"][mechanism]["available"], report["mechanisms"][mechanism]
        assert report["mechanisms"][mechanism]["external_address"] == lab.gateway.external_address
        assert report["mechanisms"][mechanism]["address_kind"] == "public"
    upnp = report["mechanisms"]["upnp"]["detail"]
    assert "WANIPConnection:2" in upnp and f"http://{lab.gateway.address}:5000/" in upnp
    assert "igd-server" in upnp
    [device] = {d["location"]: d for d in report["upnp_devices"]}.values()
    assert device["source"] == [lab.gateway.address, 1900]
    trace = report["trace"]
    assert "chosen: pcp" in trace[-1]
    for heard in ("pcp: available", "natpmp: available", f"{lab.gateway.address}:1900 names"):
        assert any(heard in line for line in trace), (heard, trace)


def test_cli_map_leaves_the_mapping_and_unmap_removes_it(lab: Lab) -> None:
    code, mapping = igd(lab, "map", "8443/tcp", "--via", "natpmp", "--lifetime", "300")
    assert code == 0 and mapping["external_port"] == 8443
    assert kernel_ports(lab) == [8443]
    assert igd(lab, "unmap", "8443/tcp", "--via", "natpmp")[0] == 0
    assert kernel_ports(lab) == []


@pytest.mark.parametrize("via", ["pcp", "natpmp", "upnp", ""])
def test_cli_map_twice_refreshes_and_list_unmap_work_across_runs(lab: Lab, via: str) -> None:
    forced = ["--via", via] if via else []
    code, first = igd(lab, "map", "8080/tcp", *forced, "--lifetime", "300")
    assert code == 0, first
    port, mechanism = first["external_port"], first["mechanism"]
    assert mechanism == (via or "pcp")
    # The lease end, wall clock: what a user compares with `date`.
    left = datetime.fromisoformat(first["expires_at"]) - datetime.now(UTC)
    assert 290 < left.total_seconds() <= 301 and 290 < first["remaining"] <= 300
    # A second run refreshes the same mapping (PCP: same nonce; a new one is refused).
    code, second = igd(lab, "map", "8080/tcp", *forced, "--lifetime", "300")
    assert code == 0, second
    assert (second["mechanism"], second["external_port"], second["nonce"]) == (
        mechanism, port, first["nonce"],
    )  # fmt: skip
    assert any("earlier run" in note for note in second["notes"])
    assert kernel_ports(lab) == [port]
    code, rows = igd(lab, "list")  # this user's mappings, whatever the mechanism
    assert code == 0
    assert [(r["mechanism"], r["internal_port"], r["external_port"]) for r in rows] == [
        (mechanism, 8080, port)
    ]
    assert igd(lab, "unmap", "8080/tcp")[0] == 0  # no --via, no --nonce: the state knows
    assert kernel_ports(lab) == []
    assert igd(lab, "list") == (0, [])


# In the lab's LAN, where no host answers (the packets stay in the test's namespaces).
ABSENT = "192.168.77.99"


def test_timeout_bounds_the_whole_command(lab: Lab) -> None:
    started = time.monotonic()
    code, error = igd(
        lab, "--timeout", "1", "--gateway", ABSENT, "map", "8080/tcp", "--via", "natpmp"
    )
    assert time.monotonic() - started < 5  # was 30 s: the library's request timeout
    assert (code, error["type"], error["advice"]) == (3, "GatewayTimeout", "check-network")


def test_a_named_gateway_is_the_only_one_used(lab: Lab) -> None:
    # igd-server on the real gateway answers the multicast SSDP search; it must not be used
    # when the user named another address.
    code, error = igd(lab, "map", "8080/tcp", "--via", "upnp", "--gateway", ABSENT)
    assert code == 3, error
    assert ABSENT in error["error"]
    assert kernel_ports(lab) == []
    code, report = igd(lab, "probe", "--gateway", ABSENT, "--timeout", "3")
    assert (code, report["chosen"]) == (3, None)
    assert not report["mechanisms"]["upnp"]["available"]
    assert report["upnp_devices"] == []
    # The debug trace shows why: the real gateway answered and was left out.
    ignored = f"ignoring http://{lab.gateway.address}:5000/"
    assert any(ignored in line for line in report["trace"]), report["trace"]


_ASYNC_WITH = """
import asyncio, json, sys
from igd.client import PortMapper
async def main():
    async with PortMapper(**json.loads(sys.argv[1])) as pm:
        async with pm.map(8080, "tcp", lifetime=600) as m:
            again = await pm.map(8080, "tcp", lifetime=600)
            probed = pm.last_probe and sorted(r.mechanism.value for r in pm.last_probe.reports)
            print(json.dumps({"mechanism": m.mechanism.value, "port": m.external_port,
                              "same": again is m, "probed": probed}), flush=True)
            sys.stdin.readline()
        print(json.dumps({"held": len(pm.mappings)}), flush=True)
        sys.stdin.readline()
asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("options", "mechanism", "probed"),
    [
        ({}, "pcp", ["natpmp", "pcp", "upnp"]),
        ({"disable": ["pcp", "natpmp"]}, "upnp", ["upnp"]),
        ({"force": "natpmp"}, "natpmp", None),  # forced: no probe at all
    ],
)
def test_async_with_releases_and_mechanisms_can_be_turned_off_or_forced(
    lab: Lab, options: dict[str, Any], mechanism: str, probed: list[str] | None
) -> None:
    proc = lab.python_popen(
        "lan1", ["-c", _ASYNC_WITH, json.dumps(options)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the client did not map in time"
    inside = json.loads(proc.stdout.readline())
    # Mapping the same port again in one process gives the same mapping, not a refusal.
    assert (inside["mechanism"], inside["same"], inside["probed"]) == (mechanism, True, probed)
    assert kernel_ports(lab) == [inside["port"]]
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"held": 0}
    assert kernel_ports(lab) == []  # released at the end of the block, mapper still open
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(15) == 0


def test_every_default_route_gateway_is_probed(lab: Lab) -> None:
    # The preferred default route leads to an address where nothing answers; the second
    # one to the gateway. Probing only the first route's gateway found nothing.
    for command in (
        ["ip", "route", "del", "default"],
        ["ip", "route", "add", "default", "via", ABSENT, "metric", "10"],
        ["ip", "route", "add", "default", "via", lab.gateway.address, "metric", "20"],
    ):
        lab.run("lan1", command)
    code, report = igd(lab, "probe")
    assert code == 0, report
    assert (report["gateway"], report["chosen"]) == (lab.gateway.address, "pcp")
    assert f"default route via {ABSENT}: nothing answers" in report["trace"]
    code, mapping = igd(lab, "map", "8080/tcp", "--lifetime", "300")
    assert code == 0, mapping
    assert kernel_ports(lab) == [mapping["external_port"]]
    assert igd(lab, "unmap", "8080/tcp")[0] == 0
    assert kernel_ports(lab) == []


_MOVE = """
import asyncio, json, sys
from igd.client import PortMapper
async def main():
    async with PortMapper(network_check=0.5, recovery_delay=0.5) as pm:
        m = await pm.map(8080, "tcp", lifetime=120)
        m.subscribe(lambda e: print(json.dumps({"event": e.kind.value, "port": e.external_port,
                                                 "internal": str(m.internal_address)}),
                                    flush=True))
        print(json.dumps({"event": "mapped", "port": m.external_port,
                          "internal": str(m.internal_address)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


def test_a_new_local_address_is_noticed_and_the_mapping_made_again(lab: Lab) -> None:
    start_service(lab, "lan1", 8080)
    proc = lab.python_popen(
        "lan1", ["-c", _MOVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    mapped = _next_event(proc, "mapped", 20)
    assert mapped["internal"] == lab.lan[0].address
    moved = "192.168.77.50"
    lab.run("lan1", ["ip", "address", "add", f"{moved}/24", "dev", "eth0"])
    # From now on the host speaks from the new address (as after a DHCP renumbering).
    lan = "192.168.77.0/24"
    lab.run("lan1", ["ip", "route", "replace", lan, "dev", "eth0", "scope", "link", "src", moved])
    event = _next_event(proc, "recreated", 10)
    assert event["internal"] == moved
    # The gateway still holds the old mapping until its lease ends, so the new one may have
    # another port; whichever it got, it reaches the service at the new address.
    assert event["port"] in kernel_ports(lab)
    assert "hello" in connect(lab, "wan1", lab.gateway.external_address, event["port"])
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(15)


def doc_examples() -> list[str]:
    """The complete programs of docs/client.md (its ```python blocks)."""
    text = (REPO / "docs" / "client.md").read_text()
    return [block.split("\n```", 1)[0] for block in text.split("```python\n")[1:]]


def test_every_python_example_in_the_docs_runs(lab: Lab) -> None:
    examples = doc_examples()
    assert len(examples) >= 6
    lab.stop_gateway()
    start_gateway(lab, ipv6=True)  # the pinhole example needs PCP over IPv6
    # The examples use the default state directory; point it into the lab's workdir.
    prelude = f"import os; os.environ['XDG_STATE_HOME'] = {str(lab.workdir)!r}\n"
    for example in examples:
        proc = lab.python("lan1", prelude + example, check=False, timeout=60)
        assert proc.returncode == 0, (example, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert kernel_ports(lab) == []  # every example cleaned up after itself
    assert pinholes(lab) == []


def test_no_gateway_is_exit_code_3(lab: Lab) -> None:
    lab.stop_gateway()
    argv = [IGD, "--timeout", "0.5", "--state-file", state_file(lab), "probe"]
    proc = lab.run("lan1", argv, check=False, timeout=60)
    assert proc.returncode == 3


# A program without asyncio: it blocks in input() and sleeps while the wrapper's own thread
# renews the mapping (lifetime 2 s), then releases it by hand and closes.
_SYNC = """
import json, sys, time
from igd.client import EventKind, SyncPortMapper
with SyncPortMapper() as pm:
    m = pm.map(8080, "tcp", lifetime=2, via=sys.argv[1], description="sync")
    print(json.dumps({"mapped": m.to_dict(), "lifetime": m.lifetime,
                      "expires": m.expires is not None}), flush=True)
    sys.stdin.readline()
    time.sleep(3)  # past the first lifetime: the background thread renews
    renewed = m.wait_for(EventKind.RENEWED, within=5)
    print(json.dumps({"renewed": renewed.kind.value, "port": m.external_port}), flush=True)
    before = m.expires_at
    answer = m.renew()  # blocks until the gateway granted the lease again
    print(json.dumps({"renew": answer, "later": m.expires_at > before}), flush=True)
    events = m.events()  # a blocking iterator: the next renewal comes within a second
    print(json.dumps({"next": next(events).kind.value}), flush=True)
    events.close()
    sys.stdin.readline()
    m.release()
    print(json.dumps({"released": m.released}), flush=True)
print(json.dumps({"closed": True}), flush=True)
"""


@pytest.mark.parametrize("via", ["pcp", "upnp"])
def test_sync_wrapper_maps_reads_renews_and_releases(lab: Lab, via: str) -> None:
    start_service(lab, "lan1", 8080)
    proc = lab.python_popen(
        "lan1", ["-c", _SYNC, via], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the client did not map in time"
    first = json.loads(proc.stdout.readline())
    mapping = first["mapped"]
    assert (mapping["mechanism"], mapping["internal_port"]) == (via, 8080)
    assert mapping["external_address"] == lab.gateway.external_address
    assert (first["lifetime"], first["expires"]) == (2, True)
    assert kernel_ports(lab) == [mapping["external_port"]]
    assert "hello" in connect(lab, "wan1", lab.gateway.external_address, mapping["external_port"])
    proc.stdin.write("\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    assert ready, "no renewal reported"
    assert json.loads(proc.stdout.readline()) == {
        "renewed": "renewed", "port": mapping["external_port"],
    }  # fmt: skip
    assert kernel_ports(lab) == [mapping["external_port"]]  # still there after 2 lifetimes
    assert json.loads(proc.stdout.readline()) == {"renew": None, "later": True}
    assert json.loads(proc.stdout.readline()) == {"next": "renewed"}
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"released": True}
    assert kernel_ports(lab) == []
    assert json.loads(proc.stdout.readline()) == {"closed": True}
    assert proc.wait(15) == 0
