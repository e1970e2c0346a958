"""IPv6 pinholes end to end: the real daemon with `[ipv6] enabled`, the kernel's ip6 table,
raw PCP requests over IPv6 from LAN hosts and TCP connections from WAN hosts."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import time
from ipaddress import IPv6Address
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
from lab import Host, Lab
from lab.bench_pinholes import parser, run
from tests.lab.conftest import StartGateway
from tests.lab.test_admin import admin

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
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 5350))
first_wait, then = float(sys.argv[1]), float(sys.argv[2])
s.settimeout(first_wait)
print("ready", flush=True)
end = None
while end is None or time.monotonic() < end:
    try:
        data, peer = s.recvfrom(2048)
    except TimeoutError:
        break
    now = time.monotonic()
    if end is None:
        end = now + then
    s.settimeout(max(0.01, end - now))
    print(data.hex(), peer[0], now, flush=True)
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


def start(
    lab: Lab,
    gateway: StartGateway,
    policy: Path | None = None,
    *,
    limits: dict[str, Any] | None = None,
    admin: dict[str, Any] | None = None,
    **ipv6: Any,
) -> subprocess.Popen[bytes]:
    sections = {"ipv6": {"enabled": True, **ipv6}}
    if admin is not None:
        sections["admin"] = admin
    if limits is not None:
        sections["limits"] = limits
    proc = gateway(policy, **sections) if policy is not None else gateway(**sections)
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
    start(lab, gateway)  # the lab policy's min_lease is 2 s
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


def test_after_nft_flush_ruleset_the_pinhole_admits_again_and_the_default_deny_is_back(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1, lan2 = lab.lan
    other = lab.python_popen("lan2", ["-c", _SERVICE, str(PORT), GREETING],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert other.stdout is not None and other.stdout.readline().strip() == "ready"
    assert reaches(lab, "wan1", lan2)  # the lab alone forwards IPv6 unfiltered
    start(lab, gateway, admin={"enabled": True})
    assert ask(lab, lan1, map_wire(lan1, 600)).result is PcpResult.SUCCESS
    assert reaches(lab, "wan1", lan1) and not reaches(lab, "wan1", lan2)
    lab.run(lab.gateway, ["nft", "flush", "ruleset"])  # a firewall reload
    deadline = time.monotonic() + 2
    while "IPv6 pinhole table restored" not in lab.gateway_log():
        assert time.monotonic() < deadline, "not restored\n" + lab.gateway_log()[-2000:]
        time.sleep(0.05)
    assert [lan1.address6, "tcp", PORT] in kernel(lab)
    assert reaches(lab, "wan1", lan1)  # the pinhole admits again
    assert not reaches(lab, "wan1", lan2)  # RFC 6092 default deny is back
    assert "Traceback" not in lab.gateway_log()
    url = "http://127.0.0.1:9351/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    text = lab.python(lab.gateway, ["-c", code]).stdout
    assert 'igd_kernel_restores_total{table="ip6 igd6"} 1.0' in text, text[-3000:]


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
    assert low.result is PcpResult.NOT_AUTHORIZED  # the lab policy allows 1024-65535
    assert kernel(lab) == []


_PREFIX_POLICY = """
[defaults]
action = "deny"
min_lease = 2
max_lease = 3600

[[rules]]
name = "not lan2"
action = "deny"
clients = ["{lan2}/128"]

[[rules]]
name = "LAN pinholes"
action = "allow"
clients = ["{prefix}"]
internal_ports = "1024-65535"
max_lease = 600
"""


def test_metrics_count_the_pinholes_the_daemon_holds(lab: Lab, gateway: StartGateway) -> None:
    """The daemon's own wiring: the admin listener's /metrics sees pinholes opened over PCP."""
    start(lab, gateway, admin={"enabled": True})
    assert ask(lab, lab.lan[0], map_wire(lab.lan[0], 600)).result is PcpResult.SUCCESS
    url = "http://127.0.0.1:9351/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    text = lab.python(lab.gateway, ["-c", code]).stdout
    assert 'igd_pinholes{mechanism="pcp",protocol="tcp"} 1.0' in text, text[-3000:]
    assert re.search(r'igd_pinholes_opened_total\{mechanism="pcp",rule="[^"]+"\} 1.0', text), text


def test_the_admin_closes_a_pinhole_and_status_counts_them(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    start(lab, gateway)
    assert ask(lab, lan1, map_wire(lan1, 600)).result is PcpResult.SUCCESS
    assert reaches(lab, "wan1", lan1)
    assert json.loads(admin(lab, "status", "--json").stdout)["pinholes"] == 1
    out = admin(lab, "delete-pinhole", "tcp", lan1.address6, str(PORT)).stdout
    assert out.startswith(f"closed 1 pinhole\n  tcp [{lan1.address6}]:{PORT} (pcp"), out
    assert kernel(lab) == [] and not reaches(lab, "wan1", lan1)
    assert "pinholes:         0" in admin(lab, "status").stdout
    missing = admin(lab, "delete-pinhole", "tcp", lan1.address6, str(PORT), check=False)
    assert missing.returncode == 1 and "no pinhole tcp" in missing.stderr
    assert "pinhole removed (deleted-by-admin)" in lab.gateway_log()


def test_a_policy_rule_for_an_ipv6_prefix_decides_pcp_maps_over_ipv6(
    lab: Lab, gateway: StartGateway, tmp_path: Path
) -> None:
    lan1, lan2 = lab.lan[0], lab.lan[1]
    policy = tmp_path / "six.toml"
    policy.write_text(_PREFIX_POLICY.format(lan2=lan2.address6, prefix="2001:db8:0:77::/64"))
    start(lab, gateway, policy)
    refused = ask(lab, lan2, map_wire(lan2, 600))
    assert refused.result is PcpResult.NOT_AUTHORIZED  # RFC 6887 §7.4: policy says no
    assert kernel(lab) == []
    granted = ask(lab, lan1, map_wire(lan1, 3000))
    assert granted.result is PcpResult.SUCCESS and granted.lifetime == 600  # the rule's max_lease
    assert len(kernel(lab)) == 1
    log = lab.gateway_log()
    assert "rule 'not lan2'" in log and "rule 'LAN pinholes'" in log


def test_a_start_announces_the_epoch_to_all_nodes_on_the_lan_again_and_again(
    lab: Lab, gateway: StartGateway
) -> None:
    # Listen 15 s for the first copy, then 2 s more: copies 1-4 (gaps 0.25, 0.5, 1 s).
    argv = ["-c", _LISTEN, "15", "2"]
    listener = lab.python_popen("lan2", argv, stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    start(lab, gateway)
    out, _ = listener.communicate(timeout=30)
    copies = [line.split() for line in out.splitlines()]
    assert len(copies) >= 3, out
    epochs, times = [], []
    for data, source, when in copies:
        # RFC 6887 §14.1.3: an unsolicited ANNOUNCE to [ff02::1]:5350 from the LAN link.
        announcement = pcp.decode_response(bytes.fromhex(data))
        assert announcement.opcode is PcpOpcode.ANNOUNCE
        assert announcement.result is PcpResult.SUCCESS
        assert IPv6Address(source.split("%")[0]).is_link_local
        epochs.append(announcement.epoch)
        times.append(float(when))
    # Sent again with the epoch of each sending, at least 250 ms apart, the gaps doubling.
    assert epochs == sorted(epochs)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.2, gaps
    assert all(later >= 1.6 * earlier for earlier, later in itertools.pairwise(gaps)), gaps


def test_the_pinhole_benchmark_runs_small_and_restores_every_seeded_pinhole() -> None:
    small = "--requests 5 --connects 5 --upnp 20 --pcp 20 --clients 2 --flood-seconds 0.05"
    size = run(300, parser().parse_args([*small.split(), "--flood-repeats", "1"]))
    assert size.restored == 300
    # Every request was answered with a pinhole (the clients assert it) and timed.
    assert size.upnp is not None and size.upnp.count == 20 and size.upnp.rate > 0
    assert size.pcp is not None and size.pcp.count == 20 and size.pcp.rate > 0
    # The flood's datagrams reached lan1 through the UDP pinhole.
    assert len(size.flows) == 1 and size.flows[0] > 0


def lan_set(lab: Lab) -> list[str]:
    out = lab.run(lab.gateway, ["nft", "-j", "list", "set", "ip6", "igd6", "lan"]).stdout
    items = [i["set"] for i in json.loads(out)["nftables"] if "set" in i]
    found = []
    for element in items[0].get("elem", []):
        prefix = element["prefix"] if isinstance(element, dict) else None
        found.append(f"{prefix['addr']}/{prefix['len']}" if prefix else str(element))
    return found


def test_a_lan_renumbering_removes_pinholes_off_the_new_prefix_and_moves_the_default_deny(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1, gw = lab.lan[0], lab.gateway
    start(lab, gateway)
    assert ask(lab, lan1, map_wire(lan1, 600)).result is PcpResult.SUCCESS
    assert reaches(lab, "wan1", lan1) and lan_set(lab) == ["2001:db8:0:77::/64"]
    # The ISP hands the LAN another prefix: the gateway's LAN address moves to it.
    lab.run(gw, ["ip", "-6", "addr", "add", "2001:db8:0:78::1/64", "dev", gw.interface,
                 "nodad"])  # fmt: skip
    lab.run(gw, ["ip", "-6", "addr", "del", f"{gw.address6}/64", "dev", gw.interface])
    deadline = time.monotonic() + 10  # the address watcher polls every 2 s
    while kernel(lab) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernel(lab) == [], lab.gateway_log()[-2000:]
    assert lan_set(lab) == ["2001:db8:0:78::/64"]
    log = lab.gateway_log()
    assert "IPv6 LAN prefixes now 2001:db8:0:78::/64" in log
    assert "pinhole removed (address change)" in log


_FLOOD6 = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(int(sys.argv[3])):
    s.sendto(bytes(24), (sys.argv[2], 5351))
"""


def guard_drops6(lab: Lab) -> dict[str, int]:
    """Packets the counted rules of the ip6 table's input chain dropped (UDP 5351)."""
    out = lab.run(lab.gateway, ["nft", "-j", "list", "chain", "ip6", "igd6", "input"]).stdout
    found = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        text = json.dumps(rule["expr"])
        counters = [e["counter"]["packets"] for e in rule["expr"] if "counter" in e]
        if counters and "5351" in text:
            found["source" if "_over" in text else "total"] = counters[0]
    return found


def test_the_kernel_drops_one_sources_pcp_flood_over_ipv6_and_answers_another(
    lab: Lab, gateway: StartGateway
) -> None:
    lan1, lan2 = lab.lan[0], lab.lan[1]
    start(lab, gateway, limits={"requests_per_second_per_client": 5, "burst_per_client": 5})
    before = guard_drops6(lab)
    assert before["source"] == 0 and before["total"] == 0
    # 500 datagrams at once from one source: far over a burst of 5, however fast they go.
    lab.python(lan1, ["-c", _FLOOD6, lan1.address6, lab.gateway.address6, "500"])
    assert guard_drops6(lab)["source"] >= 450
    # Another LAN host is answered: its requests never meet the flooder's limit.
    assert ask(lab, lan2, map_wire(lan2, 600)).result is PcpResult.SUCCESS
    assert "Traceback" not in lab.gateway_log()
