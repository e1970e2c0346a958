"""Issue 8 in the namespace lab: the attacks that worked, each now refused where a user sees
it (real upnpc and natpmpc, raw PCP), with nothing entering the kernel and the victim's
mapping still reached from the WAN."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from igd.model import Protocol
from igd.proto import natpmp, pcp
from igd.proto.natpmp import NatPmpMapRequest, NatPmpMapResponse, NatPmpResult
from igd.proto.pcp import (
    PcpMapData,
    PcpOpcode,
    PcpPeerData,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
)
from lab import Host, Lab
from lab.demo import DemoError, connect, natpmp_map, start_service
from tests.lab.test_natpmp_gateway import kernel, listed
from tests.lab.upnp_probe import run_json, search

REPO = Path(__file__).resolve().parents[2]
PORT = 5000
V2 = {"enabled": True, "http_port": PORT, "igd_version": 2}
IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
NONCE = bytes(range(12))
ZERO = pcp.mapped(IPv4Address(0))
# miniupnpc gives up on a gateway whose external address looks private (see
# test_upnp_gateway.py); this range exists only in the lab.
PUBLIC_LOOKING_WAN = "100.128.9.0/24"

# The lab policy plus a rule letting every LAN host map ports for others, without naming
# the targets: the setting `policy check` now warns about, and what the attacker relied on.
THIRD_PARTY_RULE = """
[[rules]]
name = "LAN may map for others"
action = "allow"
clients = ["192.168.77.0/24"]
allow_third_party = true
external_ports = "1024-65535"
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(prefix=f"igdsec{secrets.token_hex(3)}", wan_network=PUBLIC_LOOKING_WAN) as built:
        yield built


def start(gateway: Any, lab: Lab, policy: str | Path | None = None) -> None:
    gateway(policy or REPO / "policies" / "lab.toml", upnp=V2)
    deadline = time.monotonic() + 10
    while "UPnP HTTP listening" not in lab.gateway_log():
        assert time.monotonic() < deadline, f"UPnP did not start:\n{lab.gateway_log()}"
        time.sleep(0.1)


def third_party_policy(tmp_path: Path) -> Path:
    policy = tmp_path / "policy.toml"
    lab_policy = (REPO / "policies" / "lab.toml").read_text()
    policy.write_text(lab_policy.replace("[[rules]]", THIRD_PARTY_RULE + "\n[[rules]]", 1))
    return policy


def upnpc(lab: Lab, host: str, *args: str) -> str:
    proc = lab.run(host, ["upnpc", "-m", "eth0", *args], check=False, timeout=30)
    return proc.stdout + proc.stderr


def pcp_ask(lab: Lab, host: Host, request: PcpRequest) -> PcpResponse:
    from tests.lab.probe import exchange

    reply = exchange(lab, host, lab.gateway.address, pcp.encode_request(request))
    assert reply is not None, "no PCP answer"
    return pcp.decode_response(reply)


def peer(host: Host, remote: str, external: int, remote_port: int = 443) -> PcpRequest:
    data = PcpPeerData(NONCE, 6, 8080, external, ZERO, remote_port, pcp.mapped(IPv4Address(remote)))
    return PcpRequest(PcpOpcode.PEER, 600, pcp.mapped(IPv4Address(host.address)), data)


def greets(lab: Lab, wan: Host, port: int) -> str:
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    try:
        return connect(lab, wan, lab.gateway.external_address, port, timeout=1.5).strip()
    except DemoError:
        return ""


def refused_code(output: str) -> str:
    match = re.search(r"returned error (\d+)|failed with code (\d+)", output)
    assert match is not None, output
    return match.group(1) or match.group(2)


# -- 1: a mapping for one remote peer must not take another client's port ------------------


def test_lan2_cannot_take_lan1s_ports_for_one_remote_peer(lab: Lab, gateway: Any) -> None:
    start(gateway, lab)
    lan1, lan2 = lab.lan
    wan = lab.wan[0]
    services = [
        start_service(lab, lan1, 8080, "lan1 service"),
        start_service(lab, lan2, 8080, "lan2 service"),
    ]
    try:
        assert natpmp_map(lab, lan1, 30001, 8080).public_port == 30001
        upnpc(lab, "lan1", "-a", lan1.address, "8080", "30002", "TCP", "600")
        upnpc(lab, "lan1", "-a", lan1.address, "8080", "30005", "TCP", "600")
        held = kernel(lab)
        assert {e.external_port for e in held} == {30001, 30002, 30005}
        # lan2 asks for the same ports, but only for traffic from the WAN host.
        for port in ("30001", "30002"):
            out = upnpc(lab, "lan2", "-a", lan2.address, "8080", port, "TCP", "600", wan.address)
            # 718 ConflictInMappingEntry; 729 in IGD v2 when NAT-PMP holds the port.
            assert refused_code(out) == ("729" if port == "30001" else "718"), out
        taken = pcp_ask(lab, lan2, peer(lan2, wan.address, 30005))
        assert taken.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
        assert kernel(lab) == held
        for port in (30001, 30002, 30005):
            assert greets(lab, wan, port).startswith("lan1 service")
        assert {m["client"] for m in listed(lab)} == {lan1.address}
    finally:
        for service in services:
            service.kill()


# -- 7: the companion port stays with its holder across mechanisms -------------------------


def test_companion_port_stays_with_lan1_across_mechanisms(lab: Lab, gateway: Any) -> None:
    start(gateway, lab)
    lan1, lan2 = lab.lan
    assert natpmp_map(lab, lan1, 30001, 8080).public_port == 30001
    out = upnpc(lab, "lan2", "-a", lan2.address, "9000", "30001", "UDP", "600")
    assert refused_code(out) == "729", out  # IGD v1 would answer 718
    # Where the gateway may choose, lan2 simply gets another port.
    other = natpmp_map(lab, lan2, 30001, 9000, protocol="udp")
    assert other.public_port != 30001
    assert (Protocol.UDP, 30001) not in {(e.protocol, e.external_port) for e in kernel(lab)}
    # lan1 itself may have its twin.
    upnpc(lab, "lan1", "-a", lan1.address, "9000", "30001", "UDP", "600")
    assert (Protocol.UDP, 30001) in {(e.protocol, e.external_port) for e in kernel(lab)}


# -- 3: a third-party target must be a LAN host ----------------------------------------------


def test_third_party_targets_outside_the_lan_are_refused(
    lab: Lab, gateway: Any, tmp_path: Path
) -> None:
    start(gateway, lab, third_party_policy(tmp_path))
    lan1, lan2 = lab.lan
    targets = [
        "127.0.0.1",
        "255.255.255.255",
        "224.0.0.1",
        "192.168.77.0",
        "192.168.77.255",
        lab.gateway.address,
        lab.gateway.external_address,
        lab.wan[1].address,
        "9.9.9.9",
    ]
    for port, target in enumerate(targets, start=31000):
        out = upnpc(lab, "lan1", "-a", target, "8080", str(port), "TCP", "600")
        assert refused_code(out) == "606", (target, out)
        option = PcpThirdParty(pcp.mapped(IPv4Address(target)))
        data = PcpMapData(NONCE, 6, 8080, port, ZERO)
        ask = PcpRequest(PcpOpcode.MAP, 600, pcp.mapped(IPv4Address(lan1.address)), data)
        answer = pcp_ask(
            lab, lan1, PcpRequest(ask.opcode, 600, ask.client_address, data, (option,))
        )
        assert answer.result is PcpResult.MALFORMED_OPTION, (target, answer)
    assert kernel(lab) == set()
    assert "invalid-internal-address" in lab.gateway_log()
    # A real LAN host is still a valid target under this policy.
    upnpc(lab, "lan1", "-a", lan2.address, "8080", "31100", "TCP", "600")
    assert {str(e.internal_address) for e in kernel(lab)} == {lan2.address}


def test_wan_host_is_not_relayed_to_another_wan_host(
    lab: Lab, gateway: Any, tmp_path: Path
) -> None:
    start(gateway, lab, third_party_policy(tmp_path))
    wan1, wan2 = lab.wan
    service = start_service(lab, wan2, 8080, "wan2 service")
    try:
        out = upnpc(lab, "lan1", "-a", wan2.address, "8080", "31200", "TCP", "600")
        assert refused_code(out) == "606", out
        assert greets(lab, wan1, 31200) == ""
    finally:
        service.kill()


# -- 4: the gateway's own address is not a client ------------------------------------------

_BOUND_NATPMP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
s.bind((sys.argv[2], 0))
s.settimeout(2)
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[2], 5351))
print(s.recvfrom(2048)[0].hex())
"""

# A control point on the router itself: fetch the description, then AddPortMapping, from
# the router's LAN address on its LAN interface.
_BOUND_UPNP = r"""
import json, re, socket, sys
device, gateway, location, internal, port = sys.argv[1:6]

def request(raw):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    s.bind((gateway, 0))
    s.settimeout(3)
    s.connect((gateway, 5000))
    s.sendall(raw)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data.decode(errors="replace")

path = location.split("5000", 1)[1]
desc = request(f"GET {path} HTTP/1.1\r\nHost: {gateway}:5000\r\nConnection: close\r\n\r\n".encode())
st = "urn:schemas-upnp-org:service:WANIPConnection:2"
control = re.search(st + r".*?<controlURL>([^<]+)</controlURL>", desc, re.S).group(1)
body = (
    '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
    f'<u:AddPortMapping xmlns:u="{st}"><NewRemoteHost></NewRemoteHost>'
    f"<NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>"
    f"<NewInternalPort>8080</NewInternalPort><NewInternalClient>{internal}</NewInternalClient>"
    "<NewEnabled>1</NewEnabled><NewPortMappingDescription>router</NewPortMappingDescription>"
    "<NewLeaseDuration>600</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>"
).encode()
head = (
    f"POST {control} HTTP/1.1\r\nHost: {gateway}:5000\r\nContent-Type: text/xml\r\n"
    f'SOAPAction: "{st}#AddPortMapping"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n'
).encode()
answer = request(head + body)
code = re.search(r"<errorCode>(\d+)</errorCode>", answer)
print(json.dumps({"status": int(answer.split()[1]), "code": code and code.group(1)}))
"""


def test_gateway_address_as_client_is_refused(lab: Lab, gateway: Any, tmp_path: Path) -> None:
    start(gateway, lab, third_party_policy(tmp_path))
    gw, lan2 = lab.gateway, lab.lan[1]
    router_service = start_service(lab, gw, 8080, "router-only service")
    try:
        wire = natpmp.encode_request(NatPmpMapRequest(Protocol.TCP, 8080, 31300, 600))
        out = lab.python(gw, ["-c", _BOUND_NATPMP, gw.interface, gw.address, wire.hex()])
        answer = natpmp.decode_response(bytes.fromhex(out.stdout.strip()))
        assert isinstance(answer, NatPmpMapResponse)
        assert answer.result is NatPmpResult.NOT_AUTHORIZED
        [(_, headers)] = search(lab, "lan1", "239.255.255.250", IGD2)
        location = headers["LOCATION"]
        for internal, port in ((gw.address, "31301"), (lan2.address, "31302")):
            argv = [gw.interface, gw.address, location, internal, port]
            result = run_json(lab, gw, _BOUND_UPNP, *argv)
            assert result == {"status": 500, "code": "606"}, (internal, result)
        assert kernel(lab) == set()
        assert greets(lab, lab.wan[0], 31300) == ""
        log = lab.gateway_log()
        assert f"refused natpmp {gw.address}" in log
        assert "gateway-client" in log and "is the gateway's own address" in log
    finally:
        router_service.kill()


# -- 6: PEER towards a LAN host or the gateway --------------------------------------------


def test_peer_towards_the_lan_or_the_gateway_is_malformed(lab: Lab, gateway: Any) -> None:
    start(gateway, lab)
    lan1, lan2 = lab.lan
    for remote in (lan2.address, lab.gateway.address, lab.gateway.external_address):
        answer = pcp_ask(lab, lan1, peer(lan1, remote, 0))
        assert answer.result is PcpResult.MALFORMED_REQUEST, (remote, answer)
    assert kernel(lab) == set()
    # A WAN peer is still fine.
    assert pcp_ask(lab, lan1, peer(lan1, lab.wan[0].address, 0)).result is PcpResult.SUCCESS
