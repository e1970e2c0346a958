"""The gateway's own services are never handed out (issue 8, item 1): the real daemon in a lab
gateway that itself listens on ports, real NAT-PMP/PCP datagrams and Debian's upnpc."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from igd.model import Protocol
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpPreferFailure, PcpRequest, PcpResult
from igd.server.hostports import MAX_AGE
from lab import Lab
from lab.demo import DemoError, connect, start_service, wait_for_gateway
from tests.lab.conftest import LAB_POLICY
from tests.lab.probe import exchange, request_map

ROUTER = "the router's own service"
LISTENER = """
import socket, sys, time
kind = socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET, kind)
s.bind((sys.argv[2], int(sys.argv[3])))
if kind == socket.SOCK_STREAM:
    s.listen()
print("ready", flush=True)
time.sleep(60)
"""


def listener(lab: Lab, kind: str, address: str, port: int) -> subprocess.Popen[str]:
    """A socket of the gateway itself, bound to address:port (bounded: 60 s)."""
    argv = ["-c", LISTENER, kind, address, str(port)]
    proc = lab.python_popen(lab.gateway, argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def pcp_map(lab: Lab, port: int, *, prefer_failure: bool) -> Any:
    host = lab.lan[0]
    data = PcpMapData(bytes(12), 6, port, port, pcp.mapped(IPv4Address(0)))
    options = (PcpPreferFailure(),) if prefer_failure else ()
    wire = pcp.encode_request(
        PcpRequest(PcpOpcode.MAP, 600, pcp.mapped(IPv4Address(host.address)), data, options)
    )
    reply = exchange(lab, host, lab.gateway.address, wire)
    assert reply is not None
    return pcp.decode_response(reply)


def test_ports_the_gateway_serves_are_never_mapped(lab: Lab, gateway: Any) -> None:
    router = start_service(lab, lab.gateway, 2222, ROUTER)  # TCP on 0.0.0.0
    vpn = listener(lab, "udp", lab.gateway.external_address, 51820)  # on the external address
    lan_only = listener(lab, "tcp", lab.gateway.address, 2323)
    lan = start_service(lab, lab.lan[0], 2222)
    try:
        gateway()
        # NAT-PMP: the gateway picks another port.
        tcp = request_map(lab, lab.lan[0], Protocol.TCP, 2222, 2222, 600)
        assert tcp.result == 0 and tcp.external_port not in (0, 2222)
        udp = request_map(lab, lab.lan[0], Protocol.UDP, 51820, 51820, 600)
        assert udp.result == 0 and udp.external_port not in (0, 51820)
        # PCP without PREFER_FAILURE: another port; with it: refused.
        moved = pcp_map(lab, 2222, prefer_failure=False)
        assert moved.result is PcpResult.SUCCESS and moved.data.external_port != 2222
        refused = pcp_map(lab, 2222, prefer_failure=True)
        assert refused.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
        # A socket on the LAN address only is not reachable from the WAN: its port is free.
        assert request_map(lab, lab.lan[1], Protocol.TCP, 2323, 2323, 600).external_port == 2323
        # The WAN still reaches the router, and the LAN host through the port it got.
        wan, ext = lab.wan[0], lab.gateway.external_address
        assert ROUTER in connect(lab, wan, ext, 2222)
        assert "hello from the LAN service" in connect(lab, wan, ext, tcp.external_port)
        # A service started while the daemon runs is protected once the reading is renewed.
        late = start_service(lab, lab.gateway, 2424, ROUTER)
        try:
            time.sleep(MAX_AGE + 0.5)
            later = request_map(lab, lab.lan[0], Protocol.TCP, 2424, 2424, 600)
            assert later.result == 0 and later.external_port != 2424
        finally:
            late.kill()
    finally:
        for proc in (router, vpn, lan_only, lan):
            proc.kill()


PUBLIC_LOOKING_WAN = "100.128.7.0/24"  # upnpc gives up on private WAN addresses (lab only)


@pytest.fixture
def upnp_lab() -> Iterator[Lab]:
    with Lab(prefix=f"igdhp{secrets.token_hex(3)}", wan_network=PUBLIC_LOOKING_WAN) as built:
        yield built


@pytest.mark.parametrize(("version", "code"), [(1, "718"), (2, "729")])
def test_upnp_refuses_a_port_the_gateway_serves(upnp_lab: Lab, version: int, code: str) -> None:
    lab = upnp_lab
    router = start_service(lab, lab.gateway, 2222, ROUTER)
    try:
        upnp = {"enabled": True, "http_port": 5000, "igd_version": version}
        lab.start_gateway(lab.write_gateway_config(LAB_POLICY, upnp=upnp))
        wait_for_gateway(lab)
        argv = ["upnpc", "-m", "eth0", "-a", lab.lan[0].address, "2222", "2222", "TCP", "600"]
        out = lab.run(lab.lan[0], argv, check=False, timeout=30)
        assert code in out.stdout + out.stderr, out.stdout + out.stderr
        assert ROUTER in connect(lab, lab.wan[0], lab.gateway.external_address, 2222)
    finally:
        router.kill()


def test_dnat_takes_only_traffic_for_the_gateway_and_follows_its_address(
    lab: Lab, gateway: Any
) -> None:
    extra = "198.51.100.9"
    gateway(network={"address_poll_interval": 0.3, "extra_external_addresses": [extra]})
    service = start_service(lab, lab.lan[0], 8080)
    wan = lab.wan[0]
    gw_wan = lab.gateway.external_address
    for target in (extra, lab.lan_network.with_prefixlen):
        lab.run(wan, ["ip", "route", "add", target, "via", gw_wan])
    try:
        assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, 18080, 600).external_port == 18080
        hello = "hello from the LAN service"
        assert hello in connect(lab, wan, gw_wan, 18080)
        assert hello in connect(lab, wan, extra, 18080)  # network.extra_external_addresses
        # Routed to a LAN host's own address, port 18080 reaches that host's port 18080
        # (nothing listens there), never the mapping.
        with pytest.raises(DemoError):
            connect(lab, wan, lab.lan[1].address, 18080, timeout=1.5)
        # The external address changes (another subnet: deleting a primary address also
        # deletes the secondaries of its subnet): the mapping follows it.
        ext, new = lab.gateway.external_interface, "192.0.2.77"
        lab.run(lab.gateway, ["ip", "addr", "add", f"{new}/24", "dev", ext])
        lab.run(lab.gateway, ["ip", "addr", "del", f"{gw_wan}/24", "dev", ext])
        lab.run(wan, ["ip", "route", "add", f"{new}/32", "dev", wan.interface])
        deadline = time.monotonic() + 10
        while f"DNAT destinations: {new}, {extra}" not in lab.gateway_log():
            assert time.monotonic() < deadline, lab.gateway_log()
            time.sleep(0.1)
        assert hello in connect(lab, wan, new, 18080)
    finally:
        service.kill()
