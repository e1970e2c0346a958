"""Several external addresses (issue 11 §4): the real daemon with a second address on its WAN
interface, nftables keyed by destination address, a WAN host reaching a different LAN host on
the same port of each address, PCP clients asking for the second address, a restart and a
flushed ruleset keeping both."""

from __future__ import annotations

import json
import secrets
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpPreferFailure, PcpRequest, PcpResult
from lab import Host, Lab
from lab.demo import DemoError, connect, start_service
from tests.lab.conftest import LAB_POLICY
from tests.lab.test_dataplane import wait_restored
from tests.lab.test_natpmp_gateway import listed
from tests.lab.test_pcp_gateway import ask

pytestmark = pytest.mark.lab

PORT = 8443


@pytest.fixture
def lab() -> Any:
    with Lab(prefix=f"igdaddr{secrets.token_hex(3)}") as built:
        # The second public address: on the gateway's WAN interface, in the WAN hosts' own
        # subnet, so they reach it as they reach the first.
        second = str(built.wan_network[-2])
        bits = built.wan_network.prefixlen
        interface = built.gateway.external_interface
        built.run(built.gateway, ["ip", "addr", "add", f"{second}/{bits}", "dev", interface])
        yield built


def second(lab: Lab) -> str:
    return str(lab.wan_network[-2])


def reaches(lab: Lab, host: str, address: str, port: int) -> str:
    try:
        return connect(lab, host, address, port, timeout=2)
    except DemoError:
        return ""


def start(gateway: Any, lab: Lab, policy: Path) -> None:
    gateway(policy, network={"external_addresses": [second(lab)]})


def test_two_forwards_on_one_port_reach_two_hosts_and_survive_a_flush(
    lab: Lab, gateway: Any, tmp_path: Path
) -> None:
    first_host, second_host = lab.lan[0].address, lab.lan[1].address
    policy = tmp_path / "policy.toml"
    policy.write_text(
        LAB_POLICY.read_text()
        + f'\n[[forwards]]\nname = "first"\nprotocols = ["tcp"]\nexternal_ports = "{PORT}"\n'
        f'internal_address = "{first_host}"\ninternal_port = 8080\n'
        f'\n[[forwards]]\nname = "second"\nprotocols = ["tcp"]\nexternal_ports = "{PORT}"\n'
        f'internal_address = "{second_host}"\ninternal_port = 8080\n'
        f'external_address = "{second(lab)}"\n'
    )
    start(gateway, lab, policy)
    start_service(lab, lab.lan[0], 8080, "first host")
    start_service(lab, lab.lan[1], 8080, "second host")
    default = lab.gateway.external_address
    assert "first host" in reaches(lab, "wan1", default, PORT)
    assert "second host" in reaches(lab, "wan1", second(lab), PORT)
    # NAT loopback on the second address too: lan1 reaches lan2's service through it.
    assert "second host" in reaches(lab, "lan1", second(lab), PORT)
    rows = {(r["external_address"], r["external_port"]): r for r in listed(lab)}
    assert rows[None, PORT]["internal_address"] == first_host
    assert rows[second(lab), PORT]["internal_address"] == second_host
    assert int(rows[second(lab), PORT]["packets"]) > 0  # type: ignore[call-overload]
    argv = [str(Path(sys.executable).parent / "igd-server"), "forwards", "export"]
    argv += ["--config", str(lab.gateway_config), "--all", "--format", "json"]
    exported = json.loads(lab.run(lab.gateway, argv).stdout)
    assert [(r["name"], r["public_address"]) for r in exported] == [
        ("first", default),
        ("second", second(lab)),
    ]
    lab.run(lab.gateway, ["nft", "flush", "ruleset"])
    wait_restored(lab, 1)
    assert "first host" in reaches(lab, "wan1", default, PORT)
    assert "second host" in reaches(lab, "wan1", second(lab), PORT)


def pcp_map(
    lab: Lab, host: Host, suggested: str, *, prefer_failure: bool = False
) -> pcp.PcpResponse:
    data = PcpMapData(
        bytes([int(host.address.split(".")[-1])]) * 12, 6, 8080, PORT,
        pcp.mapped(IPv4Address(suggested)),
    )  # fmt: skip
    options = (PcpPreferFailure(),) if prefer_failure else ()
    address = pcp.mapped(IPv4Address(host.address))
    return ask(
        lab, host, pcp.encode_request(PcpRequest(PcpOpcode.MAP, 600, address, data, options))
    )


def assigned(response: pcp.PcpResponse) -> tuple[str, int]:
    assert response.result is PcpResult.SUCCESS, response
    assert isinstance(response.data, PcpMapData)
    return str(pcp.unmapped(response.data.external_address)), response.data.external_port


def test_pcp_gets_the_second_address_where_allowed_and_keeps_it_across_a_restart(
    lab: Lab, gateway: Any, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    # lan1 may use the second address; every other LAN host only the default one.
    policy.write_text(
        LAB_POLICY.read_text().replace(
            "[[rules]]\n# Any lab LAN host",
            f'[[rules]]\nname = "lan1 on the second address"\naction = "allow"\n'
            f'clients = ["{lab.lan[0].address}/32"]\n'
            f'external_addresses = ["{second(lab)}", "default"]\n\n'
            "[[rules]]\n# Any lab LAN host",
        )
    )
    start(gateway, lab, policy)
    start_service(lab, lab.lan[0], 8080, "first host")
    start_service(lab, lab.lan[1], 8080, "second host")
    default = lab.gateway.external_address
    assert assigned(pcp_map(lab, lab.lan[0], second(lab))) == (second(lab), PORT)
    refused = pcp_map(lab, lab.lan[1], second(lab), prefer_failure=True)
    assert refused.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
    # Without PREFER_FAILURE the suggestion is only a hint: the default address, same port.
    assert assigned(pcp_map(lab, lab.lan[1], second(lab))) == (default, PORT)
    assert "first host" in reaches(lab, "wan1", second(lab), PORT)
    assert "second host" in reaches(lab, "wan1", default, PORT)
    lab.stop_gateway()
    start(gateway, lab, policy)
    assert {(r["external_address"], r["internal_address"]) for r in listed(lab)} == {
        (second(lab), lab.lan[0].address),
        (None, lab.lan[1].address),
    }
    assert "first host" in reaches(lab, "wan1", second(lab), PORT)
    assert "second host" in reaches(lab, "wan1", default, PORT)


def test_an_external_address_that_is_not_the_gateways_stops_the_start(
    lab: Lab, gateway: Any
) -> None:
    stray = str(lab.wan_network[-3])
    proc = gateway(LAB_POLICY, network={"external_addresses": [stray]}, wait=False)
    assert proc.wait(timeout=60) != 0
    assert f"{stray} is no address of this host" in lab.gateway_log()
