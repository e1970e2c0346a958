"""The data plane with the real daemon in the lab (issue 11): NAT loopback (hairpin) for TCP
and UDP, per-mapping traffic counters in `igd-server list`."""

from __future__ import annotations

import json
import subprocess
import time
from ipaddress import IPv4Address
from typing import Any

import pytest

from igd.model import Protocol
from igd.proto import pcp
from igd.proto.pcp import PcpFilter, PcpMapData, PcpOpcode, PcpRequest, PcpResult
from lab import Host, Lab
from lab.demo import DemoError, connect, igd_server_argv, start_service
from tests.lab.probe import exchange, request_map

HELLO = "hello from the LAN service"

UDP_ECHO = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(60)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(512)
    s.sendto(f"echo {data.decode()} (you are {peer[0]})".encode(), peer)
"""

UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recvfrom(512)[0].decode())
except TimeoutError:
    print("timeout")
"""


def udp_echo(lab: Lab, host: Host, port: int) -> subprocess.Popen[str]:
    """A UDP service in host answering each datagram with the address it came from."""
    proc = lab.python_popen(host, ["-c", UDP_ECHO, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def udp_ask(lab: Lab, host: Host, address: str, port: int) -> str:
    """One datagram from host to address:port; the answer, or "timeout"."""
    return lab.python(host, ["-c", UDP_ASK, address, str(port)], timeout=15).stdout.strip()


def listing(lab: Lab) -> list[dict[str, Any]]:
    """`igd-server list --json` in the gateway."""
    argv = [*igd_server_argv(), "list", "--json", "--config", str(lab.gateway_config)]
    rows: list[dict[str, Any]] = json.loads(lab.run(lab.gateway, argv, timeout=30).stdout)
    return rows


def row(lab: Lab, protocol: str, port: int) -> dict[str, Any]:
    (found,) = [m for m in listing(lab) if m["protocol"] == protocol and m["external_port"] == port]
    return found


@pytest.fixture
def mapped(lab: Lab, gateway: Any) -> Any:
    """The daemon running, lan1 serving TCP 8080 (as 18080) and UDP 9090 (as 19090)."""
    gateway()
    tcp = start_service(lab, lab.lan[0], 8080, HELLO)
    udp = udp_echo(lab, lab.lan[0], 9090)
    try:
        assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, 18080, 600).external_port == 18080
        assert request_map(lab, lab.lan[0], Protocol.UDP, 9090, 19090, 600).external_port == 19090
        yield lab
    finally:
        tcp.kill()
        udp.kill()


def test_lan_hosts_reach_a_mapping_through_the_external_address(mapped: Lab) -> None:
    lab = mapped
    ext, gw_lan = lab.gateway.external_address, lab.gateway.address
    # The owner and another LAN host: the service sees the gateway's LAN address (hairpin
    # flows are masqueraded so that the replies come back through the gateway).
    for host in lab.lan:
        assert f"{HELLO} (you are {gw_lan})" in connect(lab, host, ext, 18080)
        assert udp_ask(lab, host, ext, 19090) == f"echo ping (you are {gw_lan})"
    # From the WAN the service still sees the real source.
    wan = lab.wan[0]
    assert f"{HELLO} (you are {wan.address})" in connect(lab, wan, ext, 18080)
    assert udp_ask(lab, wan, ext, 19090) == f"echo ping (you are {wan.address})"
    # Hairpin opens nothing new: an unmapped port of the external address still reaches the
    # gateway itself (refused), not a LAN host.
    with pytest.raises(DemoError, match="Refused"):
        connect(lab, lab.lan[1], ext, 8080, timeout=1.5)


def test_hairpin_off_leaves_lan_traffic_to_the_gateway(lab: Lab, gateway: Any) -> None:
    gateway(network={"hairpin": False})
    service = start_service(lab, lab.lan[0], 8080, HELLO)
    try:
        assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, 18080, 600).external_port == 18080
        with pytest.raises(DemoError, match="Refused"):
            connect(lab, lab.lan[1], lab.gateway.external_address, 18080, timeout=1.5)
        assert HELLO in connect(lab, lab.wan[0], lab.gateway.external_address, 18080)
    finally:
        service.kill()


def test_list_shows_packets_and_bytes_per_mapping_and_a_renewal_keeps_them(mapped: Lab) -> None:
    lab = mapped
    ext = lab.gateway.external_address
    assert (row(lab, "tcp", 18080)["packets"], row(lab, "tcp", 18080)["bytes"]) == (0, 0)
    for _ in range(3):
        assert HELLO in connect(lab, lab.wan[0], ext, 18080)
    assert "echo ping" in udp_ask(lab, lab.wan[1], ext, 19090)
    tcp, udp = row(lab, "tcp", 18080), row(lab, "udp", 19090)
    # Three TCP connections: at least handshake, data and teardown in both directions.
    assert tcp["packets"] >= 3 * 6 and tcp["bytes"] > 3 * len(HELLO)
    # One datagram each way: exactly two packets, 28 octets of headers each.
    assert udp["packets"] == 2 and udp["bytes"] == 2 * 28 + len("ping") + len(
        f"echo ping (you are {lab.wan[1].address})"
    )
    # A renewal rewrites the kernel's DNAT element but not the counts.
    assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, 18080, 900).external_port == 18080
    assert row(lab, "tcp", 18080)["packets"] == tcp["packets"]
    # Text output has the columns too.
    argv = [*igd_server_argv(), "list", "--config", str(lab.gateway_config)]
    text = lab.run(lab.gateway, argv, timeout=30).stdout
    assert "PACKETS" in text and str(tcp["bytes"]) in text


def wait_restored(lab: Lab, count: int) -> str:
    """Wait until the gateway logged its `count`th restore; that log line."""
    deadline = time.monotonic() + 10
    while True:
        lines = [ln for ln in lab.gateway_log().splitlines() if "table restored" in ln]
        if len(lines) >= count:
            return lines[count - 1]
        assert time.monotonic() < deadline, lab.gateway_log()
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("what", "command"),
    [
        ("a flushed ruleset", ["nft", "flush", "ruleset"]),
        ("a deleted table", ["nft", "delete", "table", "ip", "igd"]),
        (
            "a deleted element",
            ["nft", "delete", "element", "ip", "igd", "portmap", "{ tcp . 18080 }"],
        ),
        ("a flushed map", ["nft", "flush", "map", "ip", "igd", "portmap"]),
    ],
)
def test_the_table_is_restored_after_another_program_removes_it(
    mapped: Lab, what: str, command: list[str]
) -> None:
    lab = mapped
    wan, ext = lab.wan[0], lab.gateway.external_address
    lab.run(lab.gateway, command)
    line = wait_restored(lab, 1)
    assert "nft" in lab.gateway_log(), what  # the log names who did it
    assert "2 mappings" in line
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    assert HELLO in connect(lab, wan, ext, 18080)
    assert "echo ping" in udp_ask(lab, wan, ext, 19090)
    assert HELLO in connect(lab, lab.lan[1], ext, 18080)  # hairpin rules are back too
    # The daemon's own changes (a renewal, a new mapping, a deletion) are no loss.
    assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, 18080, 900).external_port == 18080
    assert request_map(lab, lab.lan[0], Protocol.TCP, 8081, 18081, 600).external_port == 18081
    assert request_map(lab, lab.lan[0], Protocol.TCP, 8081, 0, 0).result == 0
    time.sleep(0.3)
    assert len([ln for ln in lab.gateway_log().splitlines() if "table restored" in ln]) == 1
    status = json.loads(
        lab.run(
            lab.gateway,
            [*igd_server_argv(), "list", "--json", "--config", str(lab.gateway_config)],
            timeout=30,
        ).stdout
    )
    assert len(status) == 2


FW4 = """
table inet fw4 {
    chain input {
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
        iifname "{lan}" accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {dnat_rule}
        iifname "{lan}" oifname "{wan}" accept
    }
    chain srcnat {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" masquerade
    }
}
"""
"""The shape of OpenWrt's fw4 (drop policies, LAN to WAN allowed, masquerade), with the one
rule docs/nftables.md asks admins to add in place of {dnat_rule}."""


def load_fw4(lab: Lab, *, with_dnat_rule: bool) -> None:
    gw = lab.gateway
    text = (
        FW4.replace("{lan}", gw.interface)
        .replace("{wan}", gw.external_interface)
        .replace("{dnat_rule}", "ct status dnat accept" if with_dnat_rule else "")
    )
    path = lab.workdir / "fw4.nft"
    path.write_text(text)
    lab.run(gw, ["nft", "-f", str(path)])


def reaches(lab: Lab, host: Host, port: int) -> bool:
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    try:
        return HELLO in connect(lab, host, lab.gateway.external_address, port, timeout=1.5)
    except DemoError:
        return False


@pytest.mark.parametrize("with_dnat_rule", [True, False])
def test_beside_an_fw4_like_firewall(lab: Lab, gateway: Any, with_dnat_rule: bool) -> None:
    load_fw4(lab, with_dnat_rule=with_dnat_rule)
    gateway()
    service = start_service(lab, lab.lan[0], 8080, HELLO)
    first, second = lab.wan
    try:
        assert request_map(lab, lab.lan[0], Protocol.TCP, 8080, 18080, 600).external_port == 18080
        # A FILTER (RFC 6887 §13.3): only the first WAN host may use 28080.
        only_first = PcpFilter(128, 0, pcp.mapped(IPv4Address(first.address)))
        data = PcpMapData(bytes(12), 6, 8080, 28080, pcp.mapped(IPv4Address(0)))
        client = pcp.mapped(IPv4Address(lab.lan[0].address))
        wire = pcp.encode_request(PcpRequest(PcpOpcode.MAP, 600, client, data, (only_first,)))
        reply = exchange(lab, lab.lan[0], lab.gateway.address, wire)
        assert reply is not None and pcp.decode_response(reply).result is PcpResult.SUCCESS
        if not with_dnat_rule:
            # fw4's forward policy drop wins over anything in our table: nothing gets in.
            assert not reaches(lab, first, 18080)
            assert not reaches(lab, lab.lan[1], 18080)
            return
        assert reaches(lab, first, 18080) and reaches(lab, second, 18080)
        assert reaches(lab, lab.lan[1], 18080)  # hairpin
        assert reaches(lab, first, 28080) and not reaches(lab, second, 28080)
        assert reaches(lab, lab.lan[1], 18080)
        # fw4 reloads: its table is replaced, ours stays.
        load_fw4(lab, with_dnat_rule=True)
        assert reaches(lab, second, 18080)
    finally:
        service.kill()
