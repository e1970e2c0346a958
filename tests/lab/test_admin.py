"""The admin's commands end to end: the real daemon in the lab's gateway, LAN hosts mapping with
Debian's natpmpc, `igd-server delete` and `flush --client` run in the gateway, a WAN host that
can no longer connect, a plain GENA subscriber that hears each change, and the
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

# A plain GENA subscriber: finds the gateway by a unicast M-SEARCH, SUBSCRIBEs to the
# WANIPConnection events, and prints "ready", then one JSON line per NOTIFY it receives.
GENA_LISTENER = r"""
import json, re, socket, sys, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urljoin

ME, GATEWAY, SECONDS = sys.argv[1], sys.argv[2], float(sys.argv[3])
ST = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
search = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
search.bind((ME, 0))
search.settimeout(5)
search.sendto(("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"
               f'MAN: "ssdp:discover"\r\nMX: 1\r\nST: {ST}\r\n\r\n').encode(), (GATEWAY, 1900))
answer = search.recv(4096).decode()
location = re.search(r"(?im)^location:\s*(\S+)", answer).group(1)
description = urllib.request.urlopen(location, timeout=5).read().decode()
service = re.search(r"service:WANIPConnection:\d</serviceType>.*?<eventSubURL>([^<]+)<",
                    description, re.S)

class Notified(BaseHTTPRequestHandler):
    def do_NOTIFY(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        print(json.dumps(dict(re.findall(r"<(\w+)>([^<]*)</\1>", body))), flush=True)
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass

server = HTTPServer((ME, 0), Notified)
threading.Thread(target=server.serve_forever, daemon=True).start()
callback = f"<http://{ME}:{server.server_port}/>"
subscribe = urllib.request.Request(urljoin(location, service.group(1)), method="SUBSCRIBE",
    headers={"CALLBACK": callback, "NT": "upnp:event", "TIMEOUT": "Second-300"})
urllib.request.urlopen(subscribe, timeout=5).close()
print("ready", flush=True)
time.sleep(SECONDS)
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
            lan2,
            ["-c", GENA_LISTENER, lan2.address, lab.gateway.address, "60"],
            stdout=subprocess.PIPE,
            text=True,
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
