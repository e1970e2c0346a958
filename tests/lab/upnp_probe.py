"""Scripts run inside lab hosts: async-upnp-client's IGD profile, raw SSDP, raw HTTP.

Each prints one JSON document, so the test reads what happened on the LAN host."""

from __future__ import annotations

import json
from typing import Any

from lab import Host, Lab

ASYNC_UPNP_CLIENT = r"""
import asyncio, json, sys
from datetime import timedelta
from ipaddress import IPv4Address
from async_upnp_client.aiohttp import AiohttpNotifyServer, AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.search import async_search

ME, GATEWAY = sys.argv[1], sys.argv[2]
ST = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"

async def main():
    out = {"locations": []}
    async def found(headers):
        out["locations"].append(headers.get("location"))
    await async_search(found, timeout=2, search_target=ST, source=(ME, 0))
    requester = AiohttpRequester()
    device = await UpnpFactory(requester).async_create_device(out["locations"][0])
    server = AiohttpNotifyServer(requester, (ME, 0))
    await server.async_start_server()
    igd = IgdDevice(device, server.event_handler)
    events = []
    changed = asyncio.Event()
    def on_event(service, variables):
        events.append({v.name: v.value for v in variables})
        if any(v.name == "PortMappingNumberOfEntries" and v.value for v in variables):
            changed.set()
    igd.on_event = on_event
    await igd.async_subscribe_services()
    await asyncio.sleep(0.5)  # the initial events
    out["device_type"] = device.device_type
    out["external"] = await igd.async_get_external_ip_address()
    out["status"] = (await igd.async_get_status_info()).connection_status
    link = await igd.async_get_common_link_properties()
    out["link"] = link.physical_link_status
    out["bytes_received"] = await igd.async_get_total_bytes_received()
    out["default_service"] = await igd.async_get_default_connection_service()
    await igd.async_add_port_mapping(
        IPv4Address("0.0.0.0"), 19090, "TCP", 9090, IPv4Address(ME), True, "aioupnp",
        timedelta(seconds=600))
    await asyncio.wait_for(changed.wait(), 5)
    entry = await igd.async_get_specific_port_mapping_entry(None, 19090, "TCP")
    out["entry"] = [entry.internal_port, str(entry.internal_client), entry.description,
                    entry.lease_duration.total_seconds()]
    generic = await igd.async_get_generic_port_mapping_entry(0)
    out["generic"] = [generic.external_port, generic.protocol]
    await igd.async_delete_port_mapping(IPv4Address("0.0.0.0"), 19090, "TCP")
    out["events"] = events
    await igd.async_unsubscribe_services()
    await server.async_stop_server()
    await requester.async_close() if hasattr(requester, "async_close") else None
    print(json.dumps(out))

asyncio.run(main())
"""

SSDP_SEARCH = r"""
import json, socket, sys, time
target, st, agent, wait = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
msg = ("M-SEARCH * HTTP/1.1\r\nHOST:239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\n"
       f"MX: 1\r\nST: {st}\r\n" + (f"USER-AGENT: {agent}\r\n" if agent else "") + "\r\n")
s.sendto(msg.encode(), (target, 1900))
end = time.monotonic() + wait
answers = []
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, peer = s.recvfrom(4096)
    except socket.timeout:
        break
    headers = {}
    for line in data.decode().split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().upper()] = v.strip()
    answers.append([peer[0], headers])
print(json.dumps(answers))
"""

HTTP = r"""
import json, socket, sys
host, port, raw = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
wait = float(sys.argv[4])
try:
    s = socket.create_connection((host, port), timeout=wait)
    s.sendall(raw)
    s.settimeout(wait)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and len(data) > 20000:
            break
except (OSError, socket.timeout) as exc:
    print(json.dumps({"error": type(exc).__name__}))
else:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    print(json.dumps({"status": status, "body": body.decode(errors="replace")}))
"""


def run_json(lab: Lab, host: Host | str, script: str, *args: str, timeout: float = 30) -> Any:
    """Run one of the scripts above in a lab host and parse what it printed."""
    proc = lab.python(host, ["-c", script, *args], timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def http(lab: Lab, host: Host | str, address: str, port: int, raw: bytes, wait: float = 3) -> Any:
    """Send raw bytes over TCP from a lab host; the status and body, or the error."""
    return run_json(lab, host, HTTP, address, str(port), raw.hex(), str(wait))


def search(
    lab: Lab, host: Host | str, target: str, st: str, agent: str = "", wait: float = 2
) -> Any:
    """One M-SEARCH from a lab host: [source, headers] of every answer within `wait`."""
    return run_json(lab, host, SSDP_SEARCH, target, st, agent, str(wait))
