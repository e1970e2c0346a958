"""UPnP WANIPv6FirewallControl:1 end to end: the real daemon with `[ipv6]` and UPnP on, SSDP
and HTTP over IPv6, Debian's `upnpc -6` and raw SOAP from LAN hosts, TCP from WAN hosts."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from typing import Any

import pytest

from lab import Host, Lab
from tests.lab.conftest import StartGateway
from tests.lab.test_pinholes_gateway import GREETING, PORT, _SERVICE, reaches

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


def start(lab: Lab, gateway: StartGateway, **ipv6: Any) -> str:
    """Start the daemon with UPnP and pinholes; the IGD:2 description URL over IPv6."""
    gateway(upnp={"enabled": True}, ipv6={"enabled": True, **ipv6})
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
    args: dict[str, object] = dict(RemoteHost="", RemotePort=0, InternalClient=internal or
                                   host.address6, InternalPort=port, Protocol=6, LeaseTime=600)  # fmt: skip
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
