"""The HTTP side's hardening: Host, methods, content type, sizes, XML bombs, connection caps,
and the v1 description for v1-only clients."""

from __future__ import annotations

import asyncio

from igd.proto import soap
from igd.proto.description import ServiceKind
from igd.server.upnp.http import MAX_BODY, MAX_CONNECTIONS_PER_CLIENT
from tests.server.upnp.rig import Rig

SOAP_HEADERS = {
    "SOAPACTION": '"urn:schemas-upnp-org:service:WANIPConnection:2#GetExternalIPAddress"',
    "Content-Type": 'text/xml; charset="utf-8"',
}
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:GetExternalIPAddress xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">&lol3;
</u:GetExternalIPAddress></s:Body></s:Envelope>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:GetExternalIPAddress xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">&e;
</u:GetExternalIPAddress></s:Body></s:Envelope>"""


async def post(rig: Rig, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with rig.session.post(
        rig.url(2, "control"), data=body, headers=headers or SOAP_HEADERS
    ) as reply:
        return reply.status, await reply.read()


async def test_dns_rebinding_host_is_refused(rig: Rig) -> None:
    description = rig.base + rig.upnp.urls[2].description
    async with rig.session.get(description, headers={"Host": "router.evil.example:5000"}) as r:
        assert r.status == 403
    async with rig.session.get(description, headers={"Host": f"127.0.0.1:{rig.port + 1}"}) as r:
        assert r.status == 403
    async with rig.session.get(description) as r:
        assert r.status == 200 and b"InternetGatewayDevice:2" in await r.read()


async def test_control_needs_post_soapaction_and_xml(rig: Rig) -> None:
    body = soap.encode_request(
        soap.SoapRequest("urn:schemas-upnp-org:service:WANIPConnection:2", "GetExternalIPAddress")
    )
    async with rig.session.get(rig.url(2, "control")) as r:
        assert r.status == 405
    assert (await post(rig, body, {"Content-Type": "text/xml"}))[0] == 400
    assert (await post(rig, body, {**SOAP_HEADERS, "Content-Type": "text/plain"}))[0] == 415
    assert (await post(rig, b"x" * (MAX_BODY + 1)))[0] == 413
    async with rig.session.post(rig.base + "/ctl/IPConn", data=body, headers=SOAP_HEADERS) as r:
        assert r.status == 404  # guessable miniupnpd-style URLs do not exist here
    status, answer = await post(rig, body)
    assert status == 200 and b"198.51.100.7" in answer
    wrong = {
        **SOAP_HEADERS,
        "SOAPACTION": '"urn:schemas-upnp-org:service:Layer3Forwarding:1#GetExternalIPAddress"',
    }
    assert soap.decode_response((await post(rig, body, wrong))[1]) == soap.SoapFault(
        401, "Invalid Action: urn:schemas-upnp-org:service:Layer3Forwarding:1 is not served here"
    )


async def test_xml_bombs_and_external_entities_are_refused_unexpanded(rig: Rig) -> None:
    for document in (BILLION_LAUGHS, EXTERNAL_ENTITY, b"<not xml", b"<a/>"):
        status, answer = await post(rig, document)
        fault = soap.decode_response(answer)
        assert status == 500 and isinstance(fault, soap.SoapFault) and fault.code == 402
        assert b"root:" not in answer and b"lollol" not in answer


async def test_connections_per_client_are_capped(rig: Rig) -> None:
    streams = []
    for _ in range(MAX_CONNECTIONS_PER_CLIENT):
        streams.append(await asyncio.open_connection("127.0.0.1", rig.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed at once
    writer.close()
    for _, held in streams:
        held.close()
    await asyncio.sleep(0.1)
    async with rig.session.get(rig.base + rig.upnp.urls[2].description) as r:
        assert r.status == 200


async def test_v1_only_user_agents_get_the_v1_description(rig: Rig) -> None:
    description = rig.base + rig.upnp.urls[2].description
    agent = {"User-Agent": "Microsoft-Windows/10.0 UPnP/1.0"}
    async with rig.session.get(description, headers=agent) as r:
        body = await r.read()
    assert b"InternetGatewayDevice:1" in body and b"InternetGatewayDevice:2" not in body
    assert rig.upnp.urls[1].control(ServiceKind.WAN_IP_CONNECTION).encode() in body
    async with rig.session.get(rig.url(1, "scpd")) as r:
        scpd = await r.read()
    assert b"AddPortMapping" in scpd and b"AddAnyPortMapping" not in scpd
