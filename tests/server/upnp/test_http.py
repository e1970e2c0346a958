"""The HTTP side's hardening: Host, methods, content type, sizes, XML bombs, connection caps
and fair admission (slowloris), malformed requests without tracebacks, and the v1
description for v1-only clients."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import aiohttp
import pytest

from igd.proto import soap
from igd.proto.description import ServiceKind
from igd.server.interfaces import InternalInterface6
from igd.server.pxp import RateLimiter
from igd.server.upnp import http
from igd.server.upnp.http import (
    MAX_BODY,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    MAX_HEADERS,
    MAX_LINE,
)
from tests.server.upnp.rig import OTHER, Rig

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


MALFORMED = [
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)),  # a TLS hello
    b"G\xffT / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_LINE + 10) + b"\r\n\r\n",
    b"GET /" + b"a" * (MAX_LINE + 10) + b" HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 5) + b"\r\n",
]


async def send_raw(rig: Rig, data: bytes, source: str = "127.0.0.3") -> bytes:
    """Send bytes on a fresh connection; what comes back before the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port, local_addr=(source, 0))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 3)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_malformed_requests_get_400_and_no_traceback(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        for data in MALFORMED:
            answer = await send_raw(rig, data)
            assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", answer), (data, answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info
    ]
    lines = [r for r in caplog.records if "bad HTTP request" in r.getMessage()]
    assert len(lines) == 1  # one line per interval, with a count of the rest
    assert isinstance(await rig.call("GetExternalIPAddress"), soap.SoapResponse)


async def test_a_trickling_request_head_is_cut_off(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.upnp.http.close()
    monkeypatch.setattr(http, "HEADER_TIMEOUT", 0.5)
    await rig.upnp.http.start(rig.upnp.interfaces)
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    closed = asyncio.create_task(reader.read())
    sent = 0
    for byte in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
        if closed.done():
            break
        writer.write(bytes([byte]))
        sent += 1
        await asyncio.sleep(0.05)
    assert closed.done() and closed.result() == b""
    assert sent < 40  # cut off after about HEADER_TIMEOUT, not when the head was done
    writer.close()


async def test_an_unread_body_is_not_waited_for(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    path = rig.upnp.urls[2].description
    host = f"Host: 127.0.0.1:{rig.port}"
    writer.write(f"GET {path} HTTP/1.1\r\n{host}\r\nContent-Length: 99999\r\n\r\n".encode())
    # The answer, then the connection closes (aiohttp would linger 10 s reading the body).
    answer = await asyncio.wait_for(reader.read(), 3)
    assert answer.startswith(b"HTTP/1.1 200") and b"InternetGatewayDevice" in answer
    writer.close()


ATTACKERS = 32  # LAN addresses, each holding its MAX_CONNECTIONS_PER_CLIENT ...
ROUNDS = 40  # ... while another client asks this many times


async def slowloris(address: str, port: int, prefix: bytes) -> None:
    """One connection slot of the attack: half a request, again as soon as it is closed."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address, 0)
            )
        except OSError:
            await asyncio.sleep(0.05)
            continue
        try:
            writer.write(prefix)
            await reader.read()
        except OSError:
            pass
        finally:
            writer.close()
        await asyncio.sleep(0.05)  # bounds the attack's own reconnection rate


@pytest.mark.parametrize("half", ["head", "body"])
async def test_slowloris_from_many_lan_addresses_does_not_lock_out_another_client(
    rig: Rig, caplog: pytest.LogCaptureFixture, half: str
) -> None:
    assert ATTACKERS * MAX_CONNECTIONS_PER_CLIENT >= MAX_CONNECTIONS  # the pool is full
    if half == "head":
        prefix = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    else:  # a complete control request whose body never comes (BODY_TIMEOUT each time)
        control = rig.url(2, "control").removeprefix(rig.base)
        prefix = (
            f"POST {control} HTTP/1.1\r\nHost: 127.0.0.1:{rig.port}\r\n"
            "Content-Type: text/xml\r\nContent-Length: 16000\r\n"
            f"SOAPACTION: {SOAP_HEADERS['SOAPACTION']}\r\n\r\n<?xml"
        ).encode()
    attack = [
        asyncio.create_task(slowloris(f"127.0.1.{host}", rig.port, prefix))
        for host in range(1, ATTACKERS + 1)
        for _ in range(MAX_CONNECTIONS_PER_CLIENT)
    ]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while rig.upnp.http.connections < MAX_CONNECTIONS and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert rig.upnp.http.connections == MAX_CONNECTIONS
        served = 0
        for _ in range(ROUNDS):
            try:
                answer = await asyncio.wait_for(
                    rig.call("GetExternalIPAddress", source="127.0.2.1"), 3
                )
            except (aiohttp.ClientError, TimeoutError):
                continue
            served += isinstance(answer, soap.SoapResponse)
        assert served >= ROUNDS - 2, f"served {served} of {ROUNDS}"
    finally:
        for task in attack:
            task.cancel()
        await asyncio.gather(*attack, return_exceptions=True)
    gc.collect()  # asyncio reports a failed task nobody awaited when it is collected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_actions_beyond_the_clients_rate_get_503_with_retry_after(tmp_path: Path) -> None:
    # The daemon passes the [limits] bucket NAT-PMP and PCP use; here 20/s with a burst of 3.
    rig = Rig.make(tmp_path, limiter=RateLimiter(20.0, 3))
    await rig.upnp.http.start([rig.upnp.interfaces[0]])
    try:
        statuses = []
        for _ in range(5):
            async with rig.session.post(
                rig.url(2, "control"), data=b"<not parsed when refused/>", headers=SOAP_HEADERS
            ) as reply:
                statuses.append((reply.status, reply.headers.get("Retry-After")))
        # The first three are read and answered (a fault: the body is no SOAP envelope).
        assert [s for s, _ in statuses[:3]] == [500, 500, 500]
        assert statuses[3:] == [(503, "1"), (503, "1")]
        assert rig.upnp.http.limited.count == 2
        # Another client has its own bucket; the first is served again once a token is back.
        answer = await rig.call("GetExternalIPAddress", source=str(OTHER))
        assert isinstance(answer, soap.SoapResponse)
        await asyncio.sleep(0.1)
        answer = await rig.call("GetExternalIPAddress")
        assert isinstance(answer, soap.SoapResponse)
    finally:
        await rig.session.close()
        await rig.upnp.events.close()
        await rig.upnp.http.close()


async def test_ipv6_listeners_follow_a_renumbering_and_retry_an_unbindable_address(
    rig: Rig,
) -> None:
    loopback = InternalInterface6("lo", IPv6Address("::1"), (IPv6Network("::1/128"),))
    description = f"http://[::1]:{rig.port}{rig.upnp.urls[2].description}"
    http = rig.upnp.http
    assert await http.rebind6([loopback])
    async with rig.session.get(description, headers={"Host": f"[::1]:{rig.port}"}) as reply:
        assert reply.status == 200
    # The LAN moved to an address this host does not have (yet: RFC 4862 §5.4 tentative):
    # the old listener closes, the new one is reported missing each time until it binds.
    gone = InternalInterface6(
        "lo", IPv6Address("2001:db8:0:78::1"), (IPv6Network("2001:db8:0:78::/64"),)
    )
    assert not await http.rebind6([gone])
    assert not await http.rebind6([gone])
    assert http.unbound.count == 2
    with pytest.raises(ConnectionRefusedError):  # a new connection: nobody listens there
        await asyncio.open_connection("::1", rig.port)
    assert await http.rebind6([])


async def raw6(port: int, request: bytes) -> bytes:
    """One request over IPv6 loopback; what comes back until the server closes."""
    reader, writer = await asyncio.open_connection("::1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_ipv6_hosts_methods_and_foreign_peers_get_answers_never_a_traceback(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    http = rig.upnp.http
    lan = InternalInterface6("lo", IPv6Address("::1"), (IPv6Network("::1/128"),))
    assert await http.rebind6([lan])
    description, event = rig.upnp.urls[2].description, rig.url(2, "event").removeprefix(rig.base)

    async def status(method: str, path: str, host: str, extra: str = "") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n"
        return (await raw6(rig.port, head.encode()))[:12]

    assert await status("GET", description, f"[::1]:{rig.port}") == b"HTTP/1.1 200"
    # A Host that is not our bracketed literal and port (UDA 1.1 §2.1; RFC 3986 §3.2.2).
    for host in ("[::1]", f"[::2]:{rig.port}", f"[::1:{rig.port}", f"[zz]:{rig.port}",
                 f"[::1]x{rig.port}", f"[]:{rig.port}", "[", f"localhost:{rig.port}"):  # fmt: skip
        assert await status("GET", description, host) == b"HTTP/1.1 403", host
    # GENA callbacks are IPv4 URLs: an IPv6 subscriber is told so, not served half-way.
    callback = f"NT: upnp:event\r\nCALLBACK: <http://[::1]:{rig.port}/>\r\n"
    assert await status("SUBSCRIBE", event, f"[::1]:{rig.port}", callback) == b"HTTP/1.1 412"
    assert await status("NOTIFY", event, f"[::1]:{rig.port}") == b"HTTP/1.1 405"
    # The LAN's prefix moved away from the peer: its connections are closed unanswered.
    elsewhere = InternalInterface6("lo", IPv6Address("::1"), (IPv6Network("2001:db8::/64"),))
    assert await http.rebind6([elsewhere])
    assert await status("GET", description, f"[::1]:{rig.port}") == b""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert await http.rebind6([])
