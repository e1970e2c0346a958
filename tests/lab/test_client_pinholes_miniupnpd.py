"""The client's IPv6 pinholes against Debian's miniupnpd-nftables with IPv6 on: UPnP
WANIPv6FirewallControl found by SSDP on ff02::c and spoken to over IPv6, and PCP over IPv6.
miniupnpd only adds accept rules to the forward chain; the lab's firewall drops new inbound
IPv6 flows to the LAN after them, as a router's default-deny firewall does (RFC 6092)."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from lab import Lab
from lab.bench_client import CLIENT_OPTIONS, client_python
from lab.miniupnpd import FAMILY, PUBLIC_LOOKING_WAN, TABLE, Miniupnpd
from tests.lab.client_run import IGD, igd, state_file
from tests.lab.test_pinholes_gateway import _SERVICE, GREETING, PORT, reaches

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def mini() -> Iterator[Miniupnpd]:
    options = replace(CLIENT_OPTIONS, ipv6=True)
    with (
        Lab(prefix=f"igdcli6{secrets.token_hex(3)}", wan_network=PUBLIC_LOOKING_WAN) as built,
        Miniupnpd(built, options) as running,
    ):
        gw = built.gateway
        assert built.lan_network6 is not None
        drop = (
            f"add rule {FAMILY} {TABLE} forward iifname {gw.external_interface} "
            f"ip6 daddr {built.lan_network6} ct state new drop\n"
        )
        built.run(gw, ["nft", "-f", "-"], input=drop)
        yield running


@pytest.fixture(scope="module")
def lab(mini: Miniupnpd) -> Lab:
    return mini.lab


@pytest.fixture(scope="module")
def service(lab: Lab) -> Iterator[subprocess.Popen[str]]:
    """lan1's IPv6 TCP service, for the whole module."""
    proc = lab.python_popen("lan1", ["-c", _SERVICE, str(PORT), GREETING],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()


def pinhole_rules(mini: Miniupnpd) -> list[str]:
    argv = ["nft", "list", "chain", FAMILY, TABLE, "miniupnpd"]
    out = mini.lab.run(mini.lab.gateway, argv).stdout
    return [line.strip() for line in out.splitlines() if "accept" in line]


def test_probe_reports_pcp_over_ipv6_and_upnp_pinholes(lab: Lab) -> None:
    code, report = igd(lab, "probe")
    assert code == 0, report
    six = report["ipv6"]
    assert six["local_address"] == lab.lan[0].address6
    assert six["pcp"]["available"], six
    upnp = six["upnp"]
    assert upnp["available"], six
    assert (upnp["firewall_enabled"], upnp["inbound_pinhole_allowed"]) == (True, True)
    assert upnp["location"].startswith(f"http://[{lab.gateway.address6}]:")


@pytest.mark.parametrize("via", ["upnp", "pcp"])
def test_a_pinhole_lets_the_wan_in_until_it_is_released(
    lab: Lab, mini: Miniupnpd, service: subprocess.Popen[str], via: str
) -> None:
    lan1 = lab.lan[0]
    assert not reaches(lab, "wan1", lan1)  # the default deny
    argv = [IGD, "--json", "--state-file", state_file(lab), "map", f"{PORT}/tcp", "--ipv6"]
    proc = lab.popen(
        "lan1", [*argv, "--via", via, "--lifetime", "300", "--keep"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    pinhole = json.loads(proc.stdout.readline())
    assert (pinhole.get("mechanism"), pinhole.get("family")) == (via, 6), pinhole
    assert (pinhole["external_address"], pinhole["external_port"]) == (lan1.address6, PORT)
    if via == "upnp":
        assert isinstance(pinhole["unique_id"], int)
    [rule] = pinhole_rules(mini)
    assert f"th dport {PORT}" in rule
    assert reaches(lab, "wan1", lan1)
    proc.terminate()  # --keep releases on SIGTERM
    assert proc.wait(15) == 0
    assert pinhole_rules(mini) == [] and not reaches(lab, "wan1", lan1)


def test_igd_map_ipv6_twice_keeps_the_unique_id_and_unmap_deletes_it(
    lab: Lab, mini: Miniupnpd
) -> None:
    code, first = igd(lab, "map", "8082/tcp", "--ipv6", "--via", "upnp", "--lifetime", "300")
    assert code == 0, first
    # Another run: UpdatePinhole with the UniqueID the state file kept, not a second pinhole.
    code, again = igd(lab, "map", "8082/tcp", "--ipv6", "--lifetime", "300")
    assert code == 0, again
    assert (again["mechanism"], again["unique_id"]) == ("upnp", first["unique_id"])
    assert len(pinhole_rules(mini)) == 1
    assert igd(lab, "unmap", "8082/tcp", "--ipv6")[0] == 0
    assert pinhole_rules(mini) == []
    assert igd(lab, "list") == (0, [])


_RENEW6 = """
import asyncio, json
from igd.client import EventKind, PortMapper
async def main():
    async with PortMapper() as pm:
        p = await pm.pinhole(9000, "udp", lifetime=2, via="upnp")
        kinds = []
        try:
            async with asyncio.timeout(12):
                async for event in p.events():
                    kinds.append(event.kind.value + (f": {event.error}" if event.error else ""))
                    if kinds.count("renewed") >= 3:
                        break
        except TimeoutError:
            pass
        print(json.dumps({"kinds": kinds, "lifetime": p.lifetime, "id": p.unique_id}))
asyncio.run(main())
"""


def test_a_upnp_pinhole_is_renewed_with_update_pinhole(lab: Lab, mini: Miniupnpd) -> None:
    result = client_python(lab, "lan1", _RENEW6)
    kinds = result["kinds"]
    assert isinstance(kinds, list) and kinds.count("renewed") == 3, kinds
    assert "failed" not in kinds and result["lifetime"] == 2
    assert pinhole_rules(mini) == []  # released on close
