"""The admin's commands end to end: the real daemon in the lab's gateway, LAN hosts mapping with
Debian's natpmpc, `igd-server delete` and `flush --client` run in the gateway, a WAN host that
can no longer connect, a GENA subscriber (async-upnp-client) that hears each change, and the
audit log that records it all across a logrotate-style rename + SIGHUP."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from lab.demo import DemoError, connect, igd_server_argv, natpmp_map, start_service
from tests.lab.test_natpmp_gateway import kernel, listed, wait_until

# Prints one JSON line per GENA event it receives (after "ready" once subscribed).
GENA_LISTENER = r"""
import asyncio, json, sys
from async_upnp_client.aiohttp import AiohttpNotifyServer, AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.search import async_search

ME, SECONDS = sys.argv[1], float(sys.argv[2])
ST = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"

async def main():
    locations = []
    async def found(headers):
        locations.append(headers.get("location"))
    await async_search(found, timeout=2, search_target=ST, source=(ME, 0))
    requester = AiohttpRequester()
    device = await UpnpFactory(requester).async_create_device(locations[0])
    server = AiohttpNotifyServer(requester, (ME, 0))
    await server.async_start_server()
    igd = IgdDevice(device, server.event_handler)
    def on_event(service, variables):
        print(json.dumps({v.name: str(v.value) for v in variables}), flush=True)
    igd.on_event = on_event
    await igd.async_subscribe_services()
    print("ready", flush=True)
    await asyncio.sleep(SECONDS)
    await igd.async_unsubscribe_services()
    await server.async_stop_server()

asyncio.run(main())
"""


def admin(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`igd-server ARGS --config <the lab's>` run in the gateway."""
    argv = [*igd_server_argv(), *args, "--config", str(lab.gateway_config)]
    proc = lab.run(lab.gateway, argv, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"igd-server {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
        )
    return proc


class Events:
    """Lines a GENA listener in a LAN host prints, read as they arrive."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self.out = proc.stdout

    def line(self, timeout: float) -> str:
        readable, _, _ = select.select([self.out], [], [], timeout)
        if not readable:
            raise AssertionError("the GENA listener printed nothing in time")
        line = self.out.readline()
        if not line:
            raise AssertionError(f"the GENA listener exited {self.proc.wait()}")
        return line.strip()

    def entries(self, wanted: str, timeout: float = 15) -> list[str]:
        """PortMappingNumberOfEntries values seen until it reads `wanted`."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while wanted not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no GENA event with {wanted} entries; saw {seen}")
            event = json.loads(self.line(left))
            if "PortMappingNumberOfEntries" in event:
                seen.append(event["PortMappingNumberOfEntries"])
        return seen


def audit_lines(*paths: Path) -> list[dict[str, Any]]:
    found = []
    for path in paths:
        found += [json.loads(line) for line in path.read_text().splitlines()]
    return found


def test_delete_and_flush_reach_the_kernel_gena_and_the_audit_log(lab: Lab, gateway: Any) -> None:
    audit = lab.workdir / "audit.jsonl"
    gateway(upnp={"enabled": True, "http_port": 5000}, log={"audit_file": str(audit)})
    lan1, lan2 = lab.lan[0], lab.lan[1]
    service = start_service(lab, lan1, 8080)
    try:
        natpmp_map(lab, lan1, 18080, 8080)
        natpmp_map(lab, lan1, 18081, 8081, protocol="udp")
        natpmp_map(lab, lan2, 18082, 8082)
        assert "hello from the LAN service" in connect(
            lab, lab.wan[0], lab.gateway.external_address, 18080
        )
        listener = lab.python_popen(
            lan2, ["-c", GENA_LISTENER, lan2.address, "60"], stdout=subprocess.PIPE, text=True
        )
        events = Events(listener)
        assert events.line(20) == "ready"
        assert events.entries("3")[-1] == "3"  # the initial event

        status = json.loads(admin(lab, "status", "--json").stdout)
        assert status["mappings"] == 3 and status["by_mechanism"] == {"natpmp": 3}
        assert status["external_address"] == lab.gateway.external_address

        deleted = json.loads(admin(lab, "delete", "tcp", "18080", "--json").stdout)
        assert (deleted["client"], deleted["internal_port"]) == (lan1.address, 8080)
        # The command returned: the kernel no longer forwards, and the WAN host cannot connect.
        assert {e.external_port for e in kernel(lab)} == {18081, 18082}
        with pytest.raises(DemoError):
            connect(lab, lab.wan[0], lab.gateway.external_address, 18080)
        assert events.entries("2")[-1] == "2"
        missing = admin(lab, "delete", "tcp", "18080", check=False)
        assert missing.returncode == 1 and "no mapping tcp 18080" in missing.stderr

        # logrotate's way: rename, then SIGHUP; nothing is lost on either side.
        audit.rename(audit.with_name("audit.jsonl.1"))
        gateway_process = lab.gateway_process
        assert gateway_process is not None
        gateway_process.send_signal(signal.SIGHUP)
        wait_until(audit.exists, 10, "the audit log to be reopened")

        flushed = admin(lab, "flush", "--client", lan1.address)
        assert "removed 1 mapping" in flushed.stdout and "18081" in flushed.stdout
        assert [m["external_port"] for m in listed(lab)] == [18082]
        assert {e.external_port for e in kernel(lab)} == {18082}
        assert events.entries("1")[-1] == "1"
    finally:
        service.kill()

    wait_until(lambda: len(audit_lines(audit)) >= 1, 10, "the flush in the audit log")
    before, after = audit_lines(audit.with_name("audit.jsonl.1")), audit_lines(audit)
    assert [(a["event"], a["client"], a["mapping"]["external_port"]) for a in before] == [
        ("grant", lan1.address, 18080),
        ("grant", lan1.address, 18081),
        ("grant", lan2.address, 18082),
        ("removal", lan1.address, 18080),
    ]
    assert before[0]["mechanism"] == "natpmp" and before[0]["rule"] == "lab LAN to self"
    assert before[3]["cause"] == "deleted-by-admin"
    assert [(a["event"], a["cause"], a["mapping"]["external_port"]) for a in after] == [
        ("removal", "deleted-by-admin", 18081)
    ]
    log = lab.gateway_log()
    assert "(deleted by the admin)" in log and "(flushed by the admin)" in log
    assert "Traceback" not in log


def test_reload_shows_policy_errors_and_exits_non_zero(lab: Lab, gateway: Any) -> None:
    policy = lab.workdir / "policy.toml"
    good = (Path(__file__).resolve().parents[2] / "policies" / "lab.toml").read_text()
    policy.write_text(good)
    gateway(policy)
    natpmp_map(lab, lab.lan[0], 18080, 8080)
    policy.write_text(good + '\n[[rules]]\nname = "typo"\nacton = "deny"\n')
    failed = admin(lab, "reload", check=False)
    assert failed.returncode == 1
    assert "keeping the current policy" in failed.stderr and "acton" in failed.stderr
    assert "did you mean 'action'" in failed.stderr and "Traceback" not in failed.stderr
    assert [m["external_port"] for m in listed(lab)] == [18080]
    policy.write_text(good.replace('"1024-65535"', '"20000-65535"'))
    done = admin(lab, "reload")
    assert "1 mappings it no longer allows removed" in done.stdout
    assert listed(lab) == [] and kernel(lab) == set()
