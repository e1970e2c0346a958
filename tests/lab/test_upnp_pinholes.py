"""UPnP WANIPv6FirewallControl:1 end to end: the real daemon with `[ipv6]` and UPnP on, SSDP
and HTTP over IPv6, Debian's `upnpc -6` and raw SOAP from LAN hosts, TCP from WAN hosts."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lab import Host, Lab
from tests.lab.conftest import LAB_POLICY, StartGateway
from tests.lab.test_pinholes_gateway import _SERVICE, GREETING, PORT, reaches

pytestmark = pytest.mark.lab

FC = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"

# POST one action from a chosen source address; prints the HTTP status, then the body.
_SOAP = """
import http.client, sys
host, port, path, source, action, args = sys.argv[1:7]
pairs = [a.split("=", 1) for a in args.split(";") if a]
body = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
        ' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action} xmlns:u="{sys.argv[7]}">'
        + "".join(f"<{k}>{v}</{k}>" for k, v in pairs)
        + f"</u:{action}></s:Body></s:Envelope>")
if len(sys.argv) > 8:
    body = sys.argv[8]
conn = http.client.HTTPConnection(host, int(port), timeout=5, source_address=(source, 0))
conn.request("POST", path, body.encode(), {"Content-Type": 'text/xml; charset="utf-8"',
             "SOAPAction": f'"{sys.argv[7]}#{action}"'})
answer = conn.getresponse()
print(answer.status)
print(answer.read().decode(errors="replace"))
"""


def start(lab: Lab, gateway: StartGateway, policy: Path | None = None, **ipv6: Any) -> str:
    """Start the daemon with UPnP and pinholes; the IGD:2 description URL over IPv6."""
    sections = {"upnp": {"enabled": True}, "ipv6": {"enabled": True, **ipv6}}
    gateway(policy, **sections) if policy is not None else gateway(**sections)
    deadline = time.monotonic() + 10
    while True:
        listed = lab.run(lab.lan[0], ["upnpc", "-6", "-s"], check=False).stdout
        found = re.search(r"desc: (http://\[[0-9a-f:]+\]:\d+/\S+/)igd1/desc.xml", listed)
        if found:
            return found.group(1) + "igd2/desc.xml"
        assert time.monotonic() < deadline, "no SSDP answer over IPv6\n" + lab.gateway_log()


def upnpc(lab: Lab, host: Host | str, url: str, *args: str) -> str:
    return lab.run(host, ["upnpc", "-6", "-u", url, *args], check=False).stdout


def soap(lab: Lab, host: Host, url: str, action: str, source: str = "", body: str = "",
         **args: object) -> tuple[int, str]:  # fmt: skip
    """(HTTP status, body) of one WANIPv6FirewallControl action from `source`."""
    address, port, prefix = re.match(r"http://\[(.+)\]:(\d+)(/.+/)desc.xml", url).groups()  # type: ignore[union-attr]
    argv = ["-c", _SOAP, address, port, prefix + "ctl/WANIPv6FC", source or host.address6,
            action, ";".join(f"{k}={v}" for k, v in args.items()), FC]  # fmt: skip
    if body:
        argv.append(body)
    out = lab.python(host, argv).stdout
    status, _, text = out.partition("\n")
    return int(status), text


def code(answer: tuple[int, str]) -> int | None:
    """The UPnP error code of a fault (None for a success)."""
    found = re.search(r"<errorCode>(\d+)</errorCode>", answer[1])
    return int(found.group(1)) if found else None


def add(lab: Lab, host: Host, url: str, source: str = "", internal: str = "", port: int = PORT,
        **extra: object) -> tuple[int, str]:  # fmt: skip
    args: dict[str, object] = {
        "RemoteHost": "", "RemotePort": 0, "InternalClient": internal or host.address6,
        "InternalPort": port, "Protocol": 6, "LeaseTime": 600,
    }  # fmt: skip
    args.update(extra)
    return soap(lab, host, url, "AddPinhole", source, **args)


@pytest.fixture
def service(lab: Lab) -> subprocess.Popen[str]:
    proc = lab.python_popen("lan1", ["-c", _SERVICE, str(PORT), GREETING],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_upnpc_opens_updates_counts_and_deletes_a_pinhole(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1, lan2 = lab.lan
    url = start(lab, gateway)
    assert not reaches(lab, "wan1", lan1)  # RFC 6092 default deny
    added = upnpc(lab, lan1, url, "-A", "", "0", lan1.address6, str(PORT), "6", "600")
    uid = re.search(r"Pinhole ID = (\d+)", added)
    assert uid, added
    pinhole = uid.group(1)
    # Before any traffic: 709 NoTrafficReceived (a real answer, not miniupnpd's constant).
    assert "709" in upnpc(lab, lan1, url, "-C", pinhole)
    assert reaches(lab, "wan1", lan1)
    packets = re.search(r"PinholePackets = (\d+)", upnpc(lab, lan1, url, "-K", pinhole))
    assert packets and int(packets.group(1)) > 0
    assert "709" not in upnpc(lab, lan1, url, "-C", pinhole)
    # The same 5-tuple again renews the pinhole and returns its UniqueID.
    again = upnpc(lab, lan1, url, "-A", "", "0", lan1.address6, str(PORT), "6", "900")
    assert f"Pinhole ID = {pinhole}" in again, again
    assert "Lease Time: 1200" in upnpc(lab, lan1, url, "-U", pinhole, "1200")
    # Another LAN host can neither update nor delete it, nor read its counters.
    assert code(soap(lab, lan2, url, "UpdatePinhole", UniqueID=pinhole, NewLeaseTime=60)) == 606
    assert "returned : 606" in upnpc(lab, lan2, url, "-D", pinhole)
    assert "code 606" in upnpc(lab, lan2, url, "-K", pinhole)
    assert reaches(lab, "wan1", lan1)
    assert "returned : 0" in upnpc(lab, lan1, url, "-D", pinhole)
    assert not reaches(lab, "wan1", lan1)
    assert "704" in upnpc(lab, lan1, url, "-K", pinhole)  # gone: NoSuchEntry
    assert "Traceback" not in lab.gateway_log()


def test_refusals_and_malformed_requests_get_their_codes_and_change_nothing(
    lab: Lab, gateway: StartGateway, tmp_path: Path
) -> None:
    lan1, lan2 = lab.lan
    policy = tmp_path / "quota.toml"  # the lab policy with a per-client quota of 2
    policy.write_text(LAB_POLICY.read_text().replace("max_mappings_per_client = 16",
                                                     "max_mappings_per_client = 2"))  # fmt: skip
    url = start(lab, gateway, policy)
    expected = {
        708: dict(InternalClient=""),  # WildcardNotPermittedInSrcIP
        706: dict(InternalPort=0),  # InternalPortWildcardingNotAllowed
        707: dict(Protocol=65535),  # ProtocolWildcardingNotAllowed
        705: dict(Protocol=132),  # ProtocolNotSupported (SCTP)
        402: dict(LeaseTime=0),
    }
    for wanted, change in expected.items():
        assert code(add(lab, lan1, url, **change)) == wanted, change
    assert code(add(lab, lan1, url, LeaseTime=86401)) == 402
    assert code(add(lab, lan1, url, RemoteHost="not-an-address")) == 402
    assert code(add(lab, lan1, url, internal=lab.gateway.address6)) == 606  # never the gateway
    assert code(add(lab, lan1, url, internal=lan2.address6)) == 606  # secure mode
    assert code(add(lab, lan1, url, port=22)) == 606  # the lab policy allows 1024-65535
    assert code(soap(lab, lan1, url, "UpdatePinhole", UniqueID=4242, NewLeaseTime=60)) == 704
    # Malformed SOAP: 402 or a plain 4xx, never a traceback.
    for body in ("<not xml", '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',
                 "<s:Envelope xmlns:s='http://schemas.xmlsoap.org/soap/envelope/'/>"):  # fmt: skip
        status, text = soap(lab, lan1, url, "AddPinhole", body=body)
        assert status == 500 and code((status, text)) == 402, text
    status, text = soap(lab, lan1, url, "AddPinhole", InternalPort=PORT)  # arguments missing
    assert code((status, text)) == 402
    listed = lab.run(lab.gateway, ["nft", "list", "set", "ip6", "igd6", "pinholes"]).stdout
    assert "elements" not in listed  # no refusal left a pinhole in the kernel
    # The per-client quota: PinholeSpaceExhausted.
    assert code(add(lab, lan1, url, port=5001)) is None
    assert code(add(lab, lan1, url, port=5002)) is None
    assert code(add(lab, lan1, url, port=5003)) == 701
    status, text = soap(lab, lan1, url, "GetFirewallStatus")
    assert "<FirewallEnabled>1</FirewallEnabled>" in text
    assert "<InboundPinholeAllowed>1</InboundPinholeAllowed>" in text
    assert "Traceback" not in lab.gateway_log()


def test_a_host_speaking_from_another_address_still_owns_its_pinholes(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    """miniupnpd #600/#731: a host whose request leaves from a temporary (or ULA) address."""
    lan1, lan2 = lab.lan
    temporary = lan1.address6.rsplit(":", 1)[0] + ":a:7e3"
    lab.run(lan1, ["ip", "-6", "addr", "add", f"{temporary}/64", "dev", lan1.interface,
                   "nodad"])  # fmt: skip
    url = start(lab, gateway)
    for source in (lan1.address6, temporary):  # the gateway learns both behind one MAC
        lab.run(lan1, ["ping", "-6", "-c1", "-W1", "-I", source, lab.gateway.address6])
    answer = add(lab, lan1, url, source=temporary)
    uid = re.search(r"<UniqueID>(\d+)</UniqueID>", answer[1])
    assert uid, answer
    assert reaches(lab, "wan1", lan1)
    # The same host renews from its main address: the same pinhole, the same UniqueID.
    assert f"<UniqueID>{uid.group(1)}</UniqueID>" in add(lab, lan1, url)[1]
    update = soap(lab, lan1, url, "UpdatePinhole", temporary, UniqueID=uid.group(1),
                  NewLeaseTime=900)  # fmt: skip
    assert code(update) is None, update
    # Another host gets 606, even naming lan1 as InternalClient.
    assert code(soap(lab, lan2, url, "DeletePinhole", UniqueID=uid.group(1))) == 606
    assert code(add(lab, lan2, url, internal=lan1.address6)) == 606
    assert code(soap(lab, lan1, url, "DeletePinhole", temporary, UniqueID=uid.group(1))) is None
    assert not reaches(lab, "wan1", lan1)


def test_a_restart_keeps_pinholes_and_their_unique_ids(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    lan1 = lab.lan[0]
    url = start(lab, gateway)
    ids = {}
    for port in (PORT, 9001, 9002):
        answer = add(lab, lan1, url, port=port)
        ids[port] = re.search(r"<UniqueID>(\d+)</UniqueID>", answer[1]).group(1)  # type: ignore[union-attr]
    assert len(set(ids.values())) == 3
    lab.stop_gateway(signal.SIGKILL)
    url = start(lab, gateway)
    assert reaches(lab, "wan1", lan1)
    for port, uid in ids.items():
        assert f"<UniqueID>{uid}</UniqueID>" in add(lab, lan1, url, port=port)[1]
    assert code(soap(lab, lan1, url, "DeletePinhole", UniqueID=ids[PORT])) is None
    assert not reaches(lab, "wan1", lan1)


def test_nothing_upnp_answers_the_wan_over_ipv6(lab: Lab, gateway: StartGateway) -> None:
    url = start(lab, gateway)
    address, port = re.match(r"http://\[(.+)\]:(\d+)/", url).groups()  # type: ignore[union-attr]
    probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])),"
             " timeout=1.5)\n print('open')\nexcept OSError:\n print('closed')")  # fmt: skip
    assert lab.python("wan1", ["-c", probe, address, port]).stdout.strip() == "closed"
    assert lab.python("lan1", ["-c", probe, address, port]).stdout.strip() == "open"
    # DNS rebinding over IPv6 too: only the literal bracketed address is a valid Host.
    for host, status in ((f"[{address}]:{port}", "200"), (f"rebind.example:{port}", "403"),
                         (f"[{address}]:1", "403"), (f"[{address}", "403")):  # fmt: skip
        got = lab.run("lan1", ["curl", "-s6", "-o", "/dev/null", "-w", "%{http_code}",
                               "-H", f"Host: {host}", url]).stdout  # fmt: skip
        assert got == status, (host, got)


ASYNC_PINHOLES = r"""
import asyncio, json, sys
from datetime import timedelta
from ipaddress import IPv6Address
from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.profiles.igd import IgdDevice

async def main():
    device = await UpnpFactory(AiohttpRequester()).async_create_device(sys.argv[1])
    igd = IgdDevice(device, None)
    out = {}
    status = await igd.async_get_firewall_status()
    out["status"] = [status.firewall_enabled, status.inbound_pinhole_allowed]
    uid = await igd.async_add_pinhole(IPv6Address("::"), 0, IPv6Address(sys.argv[2]),
                                      int(sys.argv[3]), 6, timedelta(seconds=600))
    out["uid"] = uid
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    out["packets"] = await igd.async_get_pinhole_packets(uid)
    await igd.async_update_pinhole(uid, 1200)
    await igd.async_delete_pinhole(uid)
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def test_async_upnp_client_pinhole_methods(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str]
) -> None:
    import json

    lan1 = lab.lan[0]
    url = start(lab, gateway)
    proc = lab.python_popen("lan1", ["-c", ASYNC_PINHOLES, url, lan1.address6, str(PORT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    first = json.loads(proc.stdout.readline())
    assert first["status"] == [True, True] and first["uid"] > 0
    assert reaches(lab, "wan1", lan1)
    proc.stdin.write("\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=20)
    assert json.loads(out)["packets"] > 0
    assert not reaches(lab, "wan1", lan1)


def test_upnpc_finds_the_service_by_plain_discovery() -> None:
    """No `-u`: miniupnpc searches for IGD:1 over ff02::c and uses the description it gets.
    (The other tests pass `-u`, because miniupnpc calls an IGD behind a reserved IPv4 external
    address, like the default lab's TEST-NET one, not valid and stops there.)"""
    from lab.miniupnpd import PUBLIC_LOOKING_WAN
    from tests.lab.conftest import LAB_POLICY

    with Lab(wan_network=PUBLIC_LOOKING_WAN) as lab:
        config = lab.write_gateway_config(LAB_POLICY, upnp={"enabled": True},
                                          ipv6={"enabled": True})  # fmt: skip
        lab.start_gateway(config)
        lan1 = lab.lan[0]
        deadline = time.monotonic() + 10
        while True:
            out = lab.run(lan1, ["upnpc", "-6", "-A", "", "0", lan1.address6, str(PORT), "6",
                                 "600"], check=False).stdout  # fmt: skip
            if "Pinhole ID = " in out or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "Pinhole ID = " in out, out + lab.gateway_log()
        assert re.search(r"desc: http://\[[0-9a-f:]+\]:\d+/", out)


def test_after_a_lan_renumbering_upnpc_finds_and_uses_the_new_address(
    lab: Lab, gateway: StartGateway, service: subprocess.Popen[str], tmp_path: Path
) -> None:
    lan1, gw = lab.lan[0], lab.gateway
    # A policy naming the ISP's whole delegation (a /60) still admits the LAN after it moves
    # to another /64 of it; one naming the /64 would refuse (the admin's choice).
    policy = tmp_path / "delegation.toml"
    policy.write_text(
        LAB_POLICY.read_text().replace('"2001:db8:0:77::/64"', '"2001:db8:0:70::/60"')
    )
    old_url = start(lab, gateway, policy)
    assert f"[{gw.address6}]" in old_url
    # The ISP delegates another prefix: the gateway's LAN address and lan1's move to it.
    new_gw, new_lan1 = "2001:db8:0:78::1", lan1.address6.replace(":77:", ":78:")
    assert new_lan1 != lan1.address6
    lab.run(gw, ["ip", "-6", "addr", "add", f"{new_gw}/64", "dev", gw.interface, "nodad"])
    lab.run(gw, ["ip", "-6", "addr", "del", f"{gw.address6}/64", "dev", gw.interface])
    lab.run(lan1, ["ip", "-6", "addr", "add", f"{new_lan1}/64", "dev", lan1.interface, "nodad"])
    lab.run(lan1, ["ip", "-6", "addr", "del", f"{lan1.address6}/64", "dev", lan1.interface])
    lab.run(lan1, ["ip", "-6", "route", "replace", "default", "via", new_gw])
    lab.run("wan1", ["ip", "-6", "route", "add", "2001:db8:0:78::/64", "via",
                     gw.external_address6])  # fmt: skip
    # SSDP over IPv6 now gives a LOCATION on the new address (the watcher polls every 2 s).
    deadline = time.monotonic() + 15
    while True:
        listed = lab.run(lan1, ["upnpc", "-6", "-s"], check=False).stdout
        found = re.search(r"desc: (http://\[[0-9a-f:]+\]:\d+/\S+/)igd1/desc.xml", listed)
        if found and f"[{new_gw}]" in found.group(1):
            break
        assert time.monotonic() < deadline, listed + lab.gateway_log()[-3000:]
    url = found.group(1) + "igd2/desc.xml"
    assert url == old_url.replace(f"[{gw.address6}]", f"[{new_gw}]")
    # ... where HTTP listens: upnpc opens a pinhole for lan1's new address through it.
    added = upnpc(lab, lan1, url, "-A", "", "0", new_lan1, str(PORT), "6", "600")
    assert re.search(r"Pinhole ID = \d+", added), added + lab.gateway_log()[-3000:]
    moved = replace(lan1, address6=new_lan1)
    assert reaches(lab, "wan1", moved)
    assert "UPnP over IPv6 now at 2001:db8:0:78::1" in lab.gateway_log()
    assert "Traceback" not in lab.gateway_log()
