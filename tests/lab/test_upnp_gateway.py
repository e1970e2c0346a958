"""UPnP IGD end to end: the real daemon in the gateway namespace, the kernel's nftables,
Debian's upnpc and async-upnp-client on LAN hosts, raw probes from the WAN host."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab import Lab
from lab.demo import DemoError, connect, start_service
from tests.lab.test_natpmp_gateway import kernel, listed
from tests.lab.upnp_probe import ASYNC_UPNP_CLIENT, http, run_json, search

PORT = 5000
V2 = {"enabled": True, "http_port": PORT, "igd_version": 2}
IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"


# miniupnpc treats a gateway whose external address is private or reserved (documentation
# ranges included) as "not connected" and gives up; the lab's WAN gets a public-looking
# range, as for the reference gateway in test_lab.py. It exists only in the lab.
PUBLIC_LOOKING_WAN = "100.128.7.0/24"


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab of our own prefix, so parallel runs of other suites never collide with it."""
    with Lab(prefix=f"igdupnp{secrets.token_hex(3)}", wan_network=PUBLIC_LOOKING_WAN) as built:
        yield built


def upnpc(lab: Lab, host: str, *args: str, check: bool = True) -> str:
    """Run Debian's upnpc in a LAN host (discovery included); its output."""
    proc = lab.run(host, ["upnpc", "-m", "eth0", *args], check=False, timeout=30)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"upnpc {' '.join(args)} exited {proc.returncode}:\n{output}")
    return output


def start(gateway: Any, lab: Lab, **upnp: object) -> None:
    gateway(upnp={**V2, **upnp})
    deadline = time.monotonic() + 10
    while "UPnP HTTP listening" not in lab.gateway_log():
        if time.monotonic() > deadline:
            raise AssertionError(f"UPnP did not start:\n{lab.gateway_log()}")
        time.sleep(0.1)


def test_upnpc_discovers_maps_lists_and_deletes(lab: Lab, gateway: Any) -> None:
    start(gateway, lab)
    lan = lab.lan[0].address
    status = upnpc(lab, "lan1", "-s")
    assert f"ExternalIPAddress = {lab.gateway.external_address}" in status
    assert "InternetGatewayDevice:2" in status or "IGD" in status
    service = start_service(lab, lab.lan[0], 8080)
    try:
        # upnpc does not escape what it sends: a description with "<" would be malformed XML
        # (answered 402); escaping on our side is in tests/server/upnp.
        upnpc(lab, "lan1", "-e", "web server", "-a", lan, "8080", "18080", "TCP", "600")
        answer = connect(lab, lab.wan[0], lab.gateway.external_address, 18080)
        assert "hello from the LAN service" in answer
        listing = upnpc(lab, "lan1", "-l")
        assert re.search(rf"TCP\s+18080->{lan}:8080", listing), listing
        full = upnpc(lab, "lan1", "-L")
        assert "18080" in full and "8080" in full, full
        anyport = upnpc(lab, "lan1", "-n", lan, "9000", "9000", "UDP", "600")
        assert "external" in anyport.lower() or "9000" in anyport
        mechanisms = {m["external_port"]: m["mechanism"] for m in listed(lab)}
        assert mechanisms[18080] == "upnp"
        assert [m["description"] for m in listed(lab) if m["external_port"] == 18080] == [
            "web server"
        ]
        upnpc(lab, "lan1", "-d", "18080", "TCP")
        with pytest.raises(DemoError):
            connect(lab, lab.wan[0], lab.gateway.external_address, 18080)
        assert {e.external_port for e in kernel(lab)} == {9000}
    finally:
        service.kill()


def test_another_lan_host_can_neither_list_nor_delete(lab: Lab, gateway: Any) -> None:
    start(gateway, lab)
    upnpc(lab, "lan1", "-a", lab.lan[0].address, "8080", "18080", "TCP", "600")
    others = upnpc(lab, "lan2", "-l")
    assert "18080" not in others
    refused = upnpc(lab, "lan2", "-d", "18080", "TCP", check=False)
    assert "606" in refused, refused
    third_party = upnpc(lab, "lan2", "-a", lab.lan[0].address, "8081", "18081", "TCP", check=False)
    assert "606" in third_party, third_party
    assert {e.external_port for e in kernel(lab)} == {18080}
    assert "18080" in upnpc(lab, "lan1", "-l")


def test_async_upnp_client_profile_and_eventing(lab: Lab, gateway: Any) -> None:
    start(gateway, lab)
    out = run_json(lab, "lan1", ASYNC_UPNP_CLIENT, lab.lan[0].address, lab.gateway.address)
    assert out["device_type"] == IGD2
    assert out["external"] == lab.gateway.external_address
    assert out["status"] == "Connected" and out["link"] == "Up"
    assert out["bytes_received"] > 0
    assert out["default_service"].endswith("urn:upnp-org:serviceId:WANIPConn1")
    assert out["entry"] == [9090, lab.lan[0].address, "aioupnp", 600.0]
    assert out["generic"] == [19090, "TCP"]
    # The initial event, then the notification that a mapping was added.
    seen = [e.get("PortMappingNumberOfEntries") for e in out["events"]]
    assert "0" in seen or 0 in seen, out["events"]
    assert any(str(value) == "1" for value in seen), out["events"]
    assert kernel(lab) == set()


def test_ssdp_answers_versions_and_v1_only_agents(lab: Lab, gateway: Any) -> None:
    start(gateway, lab, igd_version="auto")
    group = "239.255.255.250"
    answers = search(lab, "lan1", group, IGD2)
    assert len(answers) == 1
    source, headers = answers[0]
    assert source == lab.gateway.address and headers["ST"] == IGD2
    assert headers["LOCATION"].startswith(f"http://{lab.gateway.address}:{PORT}/")
    assert headers["LOCATION"].endswith("/igd2/desc.xml")
    assert headers["BOOTID.UPNP.ORG"] and headers["CONFIGID.UPNP.ORG"]
    # A search for version 1 is answered with version 1 and the v1 description (auto mode).
    [(_, v1)] = search(lab, "lan1", group, IGD1)
    assert v1["ST"] == IGD1 and v1["LOCATION"].endswith("/igd1/desc.xml")
    [(_, windows)] = search(
        lab, "lan1", group, "upnp:rootdevice", agent="Microsoft-Windows/10.0 UPnP/1.0"
    )
    assert windows["LOCATION"].endswith("/igd1/desc.xml")
    everything = search(lab, "lan1", group, "ssdp:all")
    assert len(everything) == 3 + 2 * 2 + 3  # root 3, two embedded devices 2 each, 3 services
    assert search(lab, "lan1", group, "urn:schemas-upnp-org:device:InternetGatewayDevice:3") == []
    # upnpc discovers the v1 description in auto mode and works with it.
    assert "ExternalIPAddress" in upnpc(lab, "lan1", "-s")


def test_v1_mode_speaks_v1(lab: Lab, gateway: Any) -> None:
    start(gateway, lab, igd_version=1)
    [(_, headers)] = search(lab, "lan1", "239.255.255.250", IGD1)
    assert headers["LOCATION"].endswith("/igd1/desc.xml")
    assert search(lab, "lan1", "239.255.255.250", IGD2) == []
    refused = upnpc(lab, "lan1", "-a", lab.lan[0].address, "23", "2323", "TCP", check=False)
    assert "718" in refused, refused  # a policy refusal is 718 in IGD v1
    upnpc(lab, "lan1", "-a", lab.lan[0].address, "8080", "18080", "TCP", "0")
    [mapping] = listed(lab)
    assert 3500 < mapping["lease_remaining"] <= 3600  # v1 lease 0: the policy's max_lease


def test_wan_host_gets_no_answer(lab: Lab, gateway: Any) -> None:
    start(gateway, lab)
    wan = lab.wan[0]
    lab.run(wan, ["ip", "route", "add", "192.168.77.0/24", "via", lab.gateway.external_address])
    for target in (lab.gateway.address, lab.gateway.external_address):
        assert search(lab, wan, target, "ssdp:all", wait=1.5) == []
        request = f"GET / HTTP/1.1\r\nHost: {target}:{PORT}\r\n\r\n".encode()
        assert "error" in http(lab, wan, target, PORT, request, wait=2)
    # From the LAN the same server answers (but only with our own address in Host).
    close = "Connection: close\r\n\r\n"
    lan_request = f"GET / HTTP/1.1\r\nHost: {lab.gateway.address}:{PORT}\r\n{close}".encode()
    assert http(lab, "lan1", lab.gateway.address, PORT, lan_request)["status"] == 404
    rebinding = b"GET / HTTP/1.1\r\nHost: router.attacker.example:5000\r\nConnection: close\r\n\r\n"
    assert http(lab, "lan1", lab.gateway.address, PORT, rebinding)["status"] == 403
    direct = lab.run(
        wan, ["upnpc", "-u", f"http://{lab.gateway.address}:{PORT}/", "-s"], check=False
    )
    assert direct.returncode != 0 and "ExternalIPAddress =" not in direct.stdout
