"""The kernel drops a request flood before it costs the daemon anything, per source, while
other clients are still answered (issue 8, item 3). Real daemon, real kernel, raw datagrams.
Not timed: a burst far over the configured burst size is over the limit however fast it goes."""

from __future__ import annotations

import json
from typing import Any

from igd.model import Protocol
from lab import Lab
from tests.lab.probe import request_map

FLOOD = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    s.sendto(bytes(2), (sys.argv[1], 5351))  # NAT-PMP external address requests
"""
LIMITS = {"requests_per_second_per_client": 5, "burst_per_client": 5}
SYN_FLOOD = """
import socket, sys, time
opened = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((sys.argv[1], int(sys.argv[3])))  # one SYN each, not waited for
    opened.append(s)
time.sleep(0.5)
"""
CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
print("connected")
"""


def guard_drops(lab: Lab, port: int = 5351) -> dict[str, int]:
    """Packets the counted rules of the daemon's input chain for `port` dropped."""
    out = lab.run(lab.gateway, ["nft", "-j", "list", "chain", "ip", "igd", "input"]).stdout
    found = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        text = json.dumps(rule["expr"])
        counters = [e["counter"]["packets"] for e in rule["expr"] if "counter" in e]
        if counters and str(port) in text:
            found["source" if "_over" in text else "total"] = counters[0]
    return found


def test_kernel_drops_one_sources_flood_and_answers_another(lab: Lab, gateway: Any) -> None:
    gateway(limits=LIMITS)
    assert guard_drops(lab) == {"source": 0, "total": 0}
    lab.python(lab.lan[0], ["-c", FLOOD, lab.gateway.address, "500"])
    dropped = guard_drops(lab)
    assert dropped["source"] >= 450  # all but the burst and a few tokens
    # Another host is answered: its requests never meet the flooder's limit.
    assert request_map(lab, lab.lan[1], Protocol.UDP, 4000, 4000, 600).result == 0
    assert "Traceback" not in lab.gateway_log()


def test_kernel_drops_one_sources_connection_flood_to_upnp(lab: Lab, gateway: Any) -> None:
    gateway(limits=LIMITS, upnp={"enabled": True, "http_port": 5000})
    assert guard_drops(lab, 5000) == {"source": 0, "total": 0}
    lab.python(lab.lan[0], ["-c", SYN_FLOOD, lab.gateway.address, "300", "5000"])
    assert guard_drops(lab, 5000)["source"] >= 250  # SYN retransmits may add a few
    out = lab.python(lab.lan[1], ["-c", CONNECT, lab.gateway.address, "5000"]).stdout
    assert out.strip() == "connected"
