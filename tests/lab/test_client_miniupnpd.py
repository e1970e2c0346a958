"""The client against a real third-party gateway: Debian's miniupnpd-nftables in the lab's
gateway namespace, speaking UPnP IGD, NAT-PMP and PCP."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab import Lab
from lab.bench_client import CLIENT_OPTIONS, client_python
from lab.demo import DemoError, connect, start_service
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd
from tests.lab.client_run import IGD, igd, renew_script, state_file


@pytest.fixture(scope="module")
def mini() -> Iterator[Miniupnpd]:
    with (
        Lab(
            prefix=f"igdcli2{secrets.token_hex(3)}",
            wan_network=PUBLIC_LOOKING_WAN,
            wan_hosts=1,
            lan_hosts=1,
        ) as built,
        Miniupnpd(built, CLIENT_OPTIONS) as running,
    ):
        start_service(built, "lan1", 8080)
        yield running


@pytest.fixture(scope="module")
def lab(mini: Miniupnpd) -> Lab:
    return mini.lab


def test_probe_finds_all_three_and_a_public_address(lab: Lab) -> None:
    code, report = igd(lab, "probe")
    assert code == 0
    assert report["verdict"] == "public"
    assert report["external_address"] == lab.gateway.external_address
    for mechanism in ("pcp", "natpmp", "upnp"):
        assert report["mechanisms"][mechanism]["available"], report["mechanisms"][mechanism]
    assert "WANIPConnection:2" in report["mechanisms"]["upnp"]["detail"]
    assert report["chosen"] == "pcp"


@pytest.mark.parametrize("via", ["upnp", "natpmp", "pcp"])
def test_map_is_reachable_from_the_wan_and_release_removes_the_rule(
    lab: Lab, mini: Miniupnpd, via: str
) -> None:
    argv = [IGD, "--json", "--state-file", state_file(lab), "map", "8080/tcp", "--via", via]
    proc = lab.popen(
        "lan1",
        [*argv, "--lifetime", "300", "--keep"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    mapping = json.loads(proc.stdout.readline())
    assert mapping["mechanism"] == via
    port = mapping["external_port"]
    assert f"dport {port} dnat ip to {lab.lan[0].address}:8080" in mini.dnat_rules()
    answer = connect(lab, "wan1", lab.gateway.external_address, port)
    assert "hello" in answer
    proc.terminate()  # --keep releases on SIGTERM
    assert proc.wait(15) == 0
    assert mini.dnat_rules() == ""
    with pytest.raises(DemoError):
        connect(lab, "wan1", lab.gateway.external_address, port)


def test_upnp_list_and_unmap(lab: Lab) -> None:
    assert igd(lab, "map", "8080/udp", "--via", "upnp", "--description", "listed")[0] == 0
    code, rows = igd(lab, "list", "--router")
    assert code == 0
    assert [(r["external_port"], r["protocol"], r["description"]) for r in rows] == [
        (8080, "udp", "listed")
    ]
    assert igd(lab, "unmap", "8080/udp", "--via", "upnp")[0] == 0
    assert igd(lab, "list", "--router") == (0, [])
    assert igd(lab, "list") == (0, [])


@pytest.mark.parametrize("via", ["pcp", "natpmp", "upnp"])
def test_map_twice_refreshes_and_unmap_needs_no_nonce(lab: Lab, mini: Miniupnpd, via: str) -> None:
    code, first = igd(lab, "map", "8082/tcp", "--via", via, "--lifetime", "300")
    assert code == 0, first
    port = first["external_port"]
    # Another run, no --via: the state file says how the mapping was made (PCP: its nonce;
    # a new nonce for the same internal port would be refused).
    code, second = igd(lab, "map", "8082/tcp", "--lifetime", "300")
    assert code == 0, second
    assert (second["mechanism"], second["external_port"], second["nonce"]) == (
        via, port, first["nonce"],
    )  # fmt: skip
    assert mini.dnat_rules().count(f"dport {port} dnat") == 1
    code, rows = igd(lab, "list")
    assert code == 0
    assert [(r["mechanism"], r["internal_port"], r["external_port"]) for r in rows] == [
        (via, 8082, port)
    ]
    assert 250 < rows[0]["remaining"] <= 300
    assert igd(lab, "unmap", "8082/tcp")[0] == 0  # no --via, no --nonce
    assert mini.dnat_rules() == ""
    assert igd(lab, "list") == (0, [])


def test_pcp_description_is_stored_despite_miniupnpds_padding_bug(
    lab: Lab, mini: Miniupnpd
) -> None:
    # miniupnpd 2.3.1 answers MALFORMED_OPTION to a 3-octet DESCRIPTION; the client pads it.
    code, mapping = igd(lab, "map", "8081/tcp", "--via", "pcp", "--description", "abc")
    assert code == 0, mapping
    assert igd(lab, "unmap", "8081/tcp", "--via", "pcp", "--nonce", mapping["nonce"])[0] == 0
    assert mini.dnat_rules() == ""


@pytest.mark.parametrize("via", ["upnp", "natpmp", "pcp"])
def test_renews_on_its_own_past_the_first_lifetime(lab: Lab, mini: Miniupnpd, via: str) -> None:
    started = time.monotonic()
    result = client_python(lab, "lan1", renew_script(via, 8))
    kinds = result["kinds"]
    assert isinstance(kinds, list) and kinds.count("renewed") == 4
    if via == "upnp":
        # miniupnpd 2.3.1 sometimes drops a 2 s UPnP lease that AddPortMapping had just
        # extended; the entry check before the next renewal finds it gone and re-adds it.
        assert set(kinds) <= {"renewed", "recreated"}, kinds
    else:
        assert set(kinds) == {"renewed"}, kinds  # no failure, no loss, no re-creation
    assert result["lifetime"] == 2  # miniupnpd's min_lifetime=2 in the lab config
    assert time.monotonic() - started > 4
    assert mini.dnat_rules() == ""  # released on close


def test_upnp_refusal_is_the_typed_error_and_exit_code_4(lab: Lab, mini: Miniupnpd) -> None:
    # The lab's miniupnpd allows internal ports 1024-65535 only. Its AddAnyPortMapping says
    # 728 NoPortMapsAvailable for a denied internal port; the client asks AddPortMapping,
    # which says 606. (Its NAT-PMP and PCP do not answer such a request at all: natpmpc
    # times out too, so there is no refusal to surface over those.)
    exit_code, error = igd(lab, "map", "23/tcp", "--via", "upnp")
    assert exit_code == 4, error
    assert (error["type"], error["advice"], error["mechanism"], error["code"]) == (
        "NotAuthorized", "not-authorized", "upnp", 606,
    )  # fmt: skip
    assert mini.dnat_rules() == ""
