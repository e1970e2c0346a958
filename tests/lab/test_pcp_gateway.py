"""PCP end to end: the real daemon in the gateway namespace, the kernel's nftables, raw PCP
requests from LAN hosts and traffic from WAN hosts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from igd.proto import pcp
from igd.proto.pcp import (
    PcpFilter,
    PcpMapData,
    PcpOpcode,
    PcpOption,
    PcpRequest,
    PcpResponse,
    PcpResult,
    PcpThirdParty,
)
from igd.server.backends import KernelEntry
from igd.server.backends.nft_listing import parse_entries
from lab import Host, Lab
from lab.demo import DemoError, connect, start_service
from tests.lab.probe import Session, exchange, listen_for_announcements

REPO = Path(__file__).resolve().parents[2]
NONCE = bytes(range(12))
ZERO = pcp.mapped(IPv4Address(0))


def kernel(lab: Lab) -> set[KernelEntry]:
    out = lab.run(lab.gateway, ["nft", "-j", "list", "table", "ip", "igd"]).stdout
    return parse_entries(json.loads(out), "igd")


def map_wire(
    host: Host,
    port: int,
    external: int,
    lifetime: int,
    *options: PcpOption,
    nonce: bytes = NONCE,
    client: str | None = None,
) -> bytes:
    data = PcpMapData(nonce, 6, port, external, ZERO)
    address = pcp.mapped(IPv4Address(client or host.address))
    return pcp.encode_request(PcpRequest(PcpOpcode.MAP, lifetime, address, data, options))


def ask(lab: Lab, host: Host, wire: bytes) -> PcpResponse:
    reply = exchange(lab, host, lab.gateway.address, wire)
    assert reply is not None, "no PCP answer"
    return pcp.decode_response(reply)


def external_port(response: PcpResponse) -> int:
    assert response.result is PcpResult.SUCCESS, response
    assert isinstance(response.data, PcpMapData)
    return response.data.external_port


def reaches(lab: Lab, wan: Host, port: int) -> bool:
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    try:
        return "hello" in connect(lab, wan, lab.gateway.external_address, port, timeout=1.5)
    except DemoError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_map_forwards_and_delete_closes(lab: Lab, gateway: Any) -> None:
    gateway()
    lan, wan = lab.lan[0], lab.wan[0]
    service = start_service(lab, lan, 8080)
    try:
        granted = ask(lab, lan, map_wire(lan, 8080, 28080, 600))
        assert external_port(granted) == 28080 and granted.lifetime == 600
        assert granted.data.external_address == pcp.mapped(  # type: ignore[union-attr]
            IPv4Address(lab.gateway.external_address)
        )
        assert reaches(lab, wan, 28080)
        assert ask(lab, lan, map_wire(lan, 8080, 0, 0)).result is PcpResult.SUCCESS
        assert kernel(lab) == set()
        assert not reaches(lab, wan, 28080)
    finally:
        service.kill()


def test_filter_admits_only_the_listed_peer(lab: Lab, gateway: Any) -> None:
    gateway()
    lan, first, second = lab.lan[0], lab.wan[0], lab.wan[1]
    service = start_service(lab, lan, 8080)
    try:
        only_first = PcpFilter(128, 0, pcp.mapped(IPv4Address(first.address)))
        granted = ask(lab, lan, map_wire(lan, 8080, 28081, 600, only_first))
        assert external_port(granted) == 28081 and granted.options == (only_first,)
        assert reaches(lab, first, 28081)
        assert not reaches(lab, second, 28081)
        clear = PcpFilter(0, 0, ZERO)
        assert external_port(ask(lab, lan, map_wire(lan, 8080, 28081, 600, clear))) == 28081
        assert reaches(lab, second, 28081)
    finally:
        service.kill()


def test_third_party_refused_by_default_allowed_by_policy(
    lab: Lab, gateway: Any, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    lab_policy = (REPO / "policies" / "lab.toml").read_text()
    admin_rule = (
        '\n[[rules]]\nname = "lan2 may map for others"\naction = "allow"\n'
        f'clients = ["{lab.lan[1].address}/32"]\nallow_third_party = true\n'
        'external_ports = "1024-65535"\n'
    )
    policy.write_text(lab_policy.replace("[[rules]]", admin_rule + "\n[[rules]]", 1))
    gateway(policy)
    lan1, lan2 = lab.lan
    for_lan2 = PcpThirdParty(pcp.mapped(IPv4Address(lan2.address)))
    refused = ask(lab, lan1, map_wire(lan1, 9000, 29000, 600, for_lan2))
    assert refused.result is PcpResult.UNSUPP_OPTION
    for_lan1 = PcpThirdParty(pcp.mapped(IPv4Address(lan1.address)))
    granted = ask(lab, lan2, map_wire(lan2, 9000, 29000, 600, for_lan1))
    assert external_port(granted) == 29000 and granted.options == (for_lan1,)
    assert {(e.external_port, str(e.internal_address)) for e in kernel(lab)} == {
        (29000, lan1.address)
    }


def test_nonce_mismatch_and_address_mismatch(lab: Lab, gateway: Any) -> None:
    gateway()
    lan = lab.lan[0]
    external_port(ask(lab, lan, map_wire(lan, 8080, 28082, 600)))
    stolen = ask(lab, lan, map_wire(lan, 8080, 28082, 600, nonce=b"z" * 12))
    assert stolen.result is PcpResult.NOT_AUTHORIZED and 590 <= stolen.lifetime <= 600
    liar = ask(lab, lan, map_wire(lan, 8081, 28083, 600, client=lab.lan[1].address))
    assert liar.result is PcpResult.ADDRESS_MISMATCH
    assert {e.external_port for e in kernel(lab)} == {28082}


def test_restart_keeps_mappings_and_the_epoch(lab: Lab, gateway: Any) -> None:
    proc = gateway()
    lan = lab.lan[0]
    first = ask(lab, lan, map_wire(lan, 8080, 28084, 600))
    external_port(first)
    proc.kill()
    proc.wait()
    time.sleep(1.0)
    gateway()
    again = ask(lab, lan, map_wire(lan, 8080, 0, 600))
    assert external_port(again) == 28084
    assert again.epoch >= first.epoch + 1  # RFC 6887 §8.5: state kept, epoch continues
    assert {e.external_port for e in kernel(lab)} == {28084}


def test_address_change_sends_announce_and_mapping_update(lab: Lab, gateway: Any) -> None:
    lan = lab.lan[0]
    gateway(network={"address_poll_interval": 0.5})
    session = Session(lab, lan, [map_wire(lan, 8080, 28085, 600)], listen=4.0)
    assert external_port(session.replies[0]) == 28085
    collect = listen_for_announcements(lab, lab.lan[1], 3.0)
    ext = lab.gateway.external_interface
    lab.run(lab.gateway, ["ip", "addr", "add", "198.51.100.78/24", "dev", ext])
    lab.run(lab.gateway, ["ip", "addr", "del", f"{lab.gateway.external_address}/24", "dev", ext])
    updates = session.later()
    assert len(updates) == 3  # RFC 6887 §14.2: three times, 250 ms then 500 ms
    for update in updates:
        assert isinstance(update.data, PcpMapData) and update.data.nonce == NONCE
        assert update.data.external_port == 28085
        assert update.data.external_address == pcp.mapped(IPv4Address("198.51.100.78"))
        assert update.epoch < 5
    announces = [r for _, r in collect() if isinstance(r, PcpResponse)]
    assert announces and all(r.opcode is PcpOpcode.ANNOUNCE for r in announces)


@pytest.mark.parametrize("request_from_wan", ["external", "lan-address"])
def test_pcp_from_the_wan_side_gets_no_answer(
    lab: Lab, gateway: Any, request_from_wan: str
) -> None:
    gateway()
    wan = lab.wan[0]
    lab.run(wan, ["ip", "route", "add", "192.168.77.0/24", "via", lab.gateway.external_address])
    target = lab.gateway.external_address if request_from_wan == "external" else lab.gateway.address
    assert exchange(lab, wan, target, map_wire(wan, 8080, 8080, 600)) is None
    assert kernel(lab) == set()


_UDP_SEEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    data, source = s.recvfrom(100)
    print(f"{source[0]}:{source[1]}", flush=True)
    s.sendto(b"pong", source)
except socket.timeout:
    print("nothing", flush=True)
"""

_UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(3)
s.sendto(b"ping", (sys.argv[2], int(sys.argv[3])))
print(s.recvfrom(100)[0].decode())
"""


def test_peer_gives_outbound_traffic_the_reported_port(lab: Lab, gateway: Any) -> None:
    import subprocess

    gateway()
    lan, wan = lab.lan[0], lab.wan[0]
    data = pcp.PcpPeerData(NONCE, 17, 5000, 40000, ZERO, 3478, pcp.mapped(IPv4Address(wan.address)))
    request = PcpRequest(PcpOpcode.PEER, 600, pcp.mapped(IPv4Address(lan.address)), data)
    granted = ask(lab, lan, pcp.encode_request(request))
    assert granted.result is PcpResult.SUCCESS
    assert isinstance(granted.data, pcp.PcpPeerData) and granted.data.external_port == 40000
    listener = lab.python_popen(
        wan, ["-c", _UDP_SEEN, "3478", "5"], stdout=subprocess.PIPE, text=True
    )
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    reply = lab.python(lan, ["-c", _UDP_SEND, "5000", wan.address, "3478"])
    seen = listener.stdout.readline().strip()
    listener.wait(timeout=10)
    assert seen == f"{lab.gateway.external_address}:40000"  # the port PCP reported
    assert reply.stdout.strip() == "pong"
    assert {(e.external_port, e.peer_port) for e in kernel(lab)} == {(40000, 3478)}
