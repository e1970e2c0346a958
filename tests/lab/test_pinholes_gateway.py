"""IPv6 pinholes end to end: the real daemon with `[ipv6] enabled`, the kernel's ip6 table,
raw PCP requests over IPv6 from LAN hosts and TCP connections from WAN hosts."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from ipaddress import IPv6Address
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
from lab import Host, Lab
from lab.bench_pinholes import run
from tests.lab.conftest import StartGateway

pytestmark = pytest.mark.lab

NONCE = bytes(range(12))
PORT = 8080
GREETING = "hello over IPv6"

_SERVICE = """
import socket, sys
server = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6)
print("ready", flush=True)
while True:
    conn, peer = server.accept()
    with conn:
        conn.sendall(f"{sys.argv[2]} (you are {peer[0]})\\n".encode())
"""

_CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5) as s:
        print(s.recv(4096).decode(errors="replace"), end="")
except OSError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
"""

_EXCHANGE = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(float(sys.argv[4]))
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[2], 5351))
try:
    print(s.recv(2048).hex())
except TimeoutError:
    print("none")
"""


_LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 5350))
s.settimeout(float(sys.argv[1]))
print("ready", flush=True)
try:
    data, peer = s.recvfrom(2048)
    print(data.hex(), peer[0])
except TimeoutError:
    print("none")
"""


def reaches(lab: Lab, source: str, target: Host) -> bool:
    """Whether a TCP connection from `source` to target's IPv6 service gets the greeting."""
    result = lab.python(source, ["-c", _CONNECT, target.address6, str(PORT)], check=False)
    return GREETING in result.stdout


def exchange(lab: Lab, host: Host, target: str, wire: bytes, timeout: float = 1.0) -> bytes | None:
    argv = ["-c", _EXCHANGE, host.address6, target, wire.hex(), str(timeout)]
    out = lab.python(host, argv).stdout.strip()
    return None if out == "none" else bytes.fromhex(out)


def map_wire(host: Host, lifetime: int, *options: PcpOption, nonce: bytes = NONCE,
             client: str | None = None, port: int = PORT) -> bytes:  # fmt: skip
    data = PcpMapData(nonce, 6, port, 0, IPv6Address(0))
    address = IPv6Address(client or host.address6)
    return pcp.encode_request(PcpRequest(PcpOpcode.MAP, lifetime, address, data, options))


def ask(lab: Lab, host: Host, wire: bytes) -> PcpResponse:
    reply = exchange(lab, host, lab.gateway.address6, wire)
    assert reply is not None, "no PCP answer over IPv6\n" + lab.gateway_log()[-2000:]
    return pcp.decode_response(reply)


def kernel(lab: Lab) -> Any:
    out = lab.run(lab.gateway, ["nft", "-j", "list", "set", "ip6", "igd6", "pinholes"]).stdout
    items = [i["set"] for i in json.loads(out)["nftables"] if "set" in i]
    return [e["elem"]["val"]["concat"] for e in items[0].get("elem", [])]


def start(lab: Lab, gateway: StartGateway, **ipv6: Any) -> subprocess.Popen[bytes]:
    proc = gateway(ipv6={"enabled": True, **ipv6})
    announce = pcp.encode_request(
        PcpRequest(PcpOpcode.ANNOUNCE, 0, IPv6Address(lab.lan[0].address6))
    )
    deadline = time.monotonic() + 10
    while exchange(lab, lab.lan[0], lab.gateway.address6, announce, 0.3) is None:
        assert time.monotonic() < deadline, "PCP over IPv6 never answered\n" + lab.gateway_log()
    return proc


@pytest.fixture
def service(lab: Lab) -> subprocess.Popen[str]:
    proc = lab.python_popen("lan1", ["-c", _SERVICE, str(PORT), GREETING],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_the_wan_reaches_a_lan_host_only_through_its_pinhole(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1, lan2 = lab.lan
    assert reaches(lab, "wan1", lan1)  # the lab alone forwards IPv6 unfiltered
    start(lab, gateway)
    assert not reaches(lab, "wan1", lan1)  # RFC 6092: default deny once the daemon runs
    assert reaches(lab, "lan2", lan1)  # the LAN itself is not filtered

    answer = ask(lab, lan1, map_wire(lan1, 600))
    assert answer.result is PcpResult.SUCCESS and 0 < answer.lifetime <= 600
    # RFC 6887 §11.3 on a firewall: the "external" endpoint is the internal one.
    assert isinstance(answer.data, PcpMapData)
    assert (answer.data.external_address, answer.data.external_port) == (
        IPv6Address(lan1.address6),
        PORT,
    )
    assert [lan1.address6, "tcp", PORT] in kernel(lab)
    assert reaches(lab, "wan1", lan1) and reaches(lab, "wan2", lan1)

    # Another LAN host cannot close it: secure mode refuses naming lan1, and lan1's own
    # address with another nonce is refused by the nonce check.
    third = ask(lab, lan2, map_wire(lan2, 0, PcpThirdParty(IPv6Address(lan1.address6))))
    assert third.result is PcpResult.NOT_AUTHORIZED
    wrong_nonce = ask(lab, lan1, map_wire(lan1, 0, nonce=b"x" * 12))
    assert wrong_nonce.result is PcpResult.NOT_AUTHORIZED
    assert reaches(lab, "wan1", lan1)

    closed = ask(lab, lan1, map_wire(lan1, 0))
    assert closed.result is PcpResult.SUCCESS and closed.lifetime == 0
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)


def test_an_expired_pinhole_closes(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway, min_lifetime=2)
    assert ask(lab, lan1, map_wire(lan1, 2)).lifetime == 2
    assert reaches(lab, "wan1", lan1)
    time.sleep(3)
    assert not reaches(lab, "wan1", lan1)
    assert "pinhole expired" in lab.gateway_log()


def test_a_filter_admits_only_the_named_remote_host(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1, wan2 = lab.lan[0], lab.wan[1]
    start(lab, gateway)
    only_wan2 = PcpFilter(128, 0, IPv6Address(wan2.address6))
    answer = ask(lab, lan1, map_wire(lan1, 600, only_wan2))
    assert answer.result is PcpResult.SUCCESS and only_wan2 in answer.options
    assert reaches(lab, "wan2", lan1) and not reaches(lab, "wan1", lan1)


def test_a_pinhole_survives_kill_9_and_its_nonce_still_renews_it(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway)
    first = ask(lab, lan1, map_wire(lan1, 600))
    assert first.result is PcpResult.SUCCESS
    lab.stop_gateway(signal.SIGKILL)
    lab.run(lab.gateway, ["nft", "delete", "table", "ip6", "igd6"])  # kernel state lost too
    start(lab, gateway)
    assert reaches(lab, "wan1", lan1)
    listed = json.loads(
        lab.python(lab.gateway, ["-m", "igd.server", "list", "--pinholes", "--json",
                                 "--config", str(lab.gateway_config)]).stdout
    )  # fmt: skip
    assert [(p["internal_address"], p["internal_port"], p["client"]) for p in listed] == [
        (lan1.address6, PORT, lan1.address6)
    ]
    again = ask(lab, lan1, map_wire(lan1, 600))
    assert again.result is PcpResult.SUCCESS
    assert again.epoch >= first.epoch  # RFC 6887 §8.5: state kept, epoch continues
    assert ask(lab, lan1, map_wire(lan1, 600, nonce=b"y" * 12)).result is (PcpResult.NOT_AUTHORIZED)


def test_only_lan_sources_get_answers_and_the_client_field_must_be_the_source(
    lab: Lab, gateway: StartGateway
) -> None:
    lan1, wan1 = lab.lan[0], lab.wan[0]
    start(lab, gateway)
    # From the WAN: to the gateway's WAN and LAN addresses alike, silence (RFC 6092 REC-50).
    for target in (lab.gateway.external_address6, lab.gateway.address6):
        assert exchange(lab, wan1, target, map_wire(wan1, 600)) is None
    mismatch = ask(lab, lan1, map_wire(lan1, 600, client=lab.lan[1].address6))
    assert mismatch.result is PcpResult.ADDRESS_MISMATCH  # RFC 6887 §8.2
    low = ask(lab, lan1, map_wire(lan1, 600, port=22))
    assert low.result is PcpResult.NOT_AUTHORIZED  # [ipv6] min_port 1024 by default
    assert kernel(lab) == []


def test_a_start_announces_the_epoch_to_all_nodes_on_the_lan(
    lab: Lab, gateway: StartGateway
) -> None:
    listener = lab.python_popen("lan2", ["-c", _LISTEN, "15"], stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    start(lab, gateway)
    out, _ = listener.communicate(timeout=30)
    data, source = out.split()
    # RFC 6887 §14.1.3: an unsolicited ANNOUNCE to [ff02::1]:5350 from the gateway's LAN link.
    announcement = pcp.decode_response(bytes.fromhex(data))
    assert announcement.opcode is PcpOpcode.ANNOUNCE and announcement.result is PcpResult.SUCCESS
    assert IPv6Address(source.split("%")[0]).is_link_local


def test_the_pinhole_benchmark_runs_small_and_restores_every_seeded_pinhole() -> None:
    line = run(300, requests=5, connects=5, upnp=5)
    assert line.split()[:4] == ["300", "pinholes", "(restored", "300):"], line
    assert "UPnP AddPinhole median" in line
