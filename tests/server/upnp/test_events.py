"""GENA: subscribe, initial event, events on mapping changes and address changes, renewal,
unsubscribe, and the CallStranger refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from igd.proto import gena
from igd.server.upnp.events import MAX_SUBSCRIPTIONS, MAX_SUBSCRIPTIONS_PER_CLIENT
from tests.server.upnp.rig import Rig, add_args


class Subscriber:
    """An HTTP server on loopback collecting the NOTIFYs it receives."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[dict[str, str], dict[str, str]]] = asyncio.Queue()
        self.port = 0

    async def handle(self, request: web.BaseRequest) -> web.Response:
        values = gena.decode_propertyset(await request.read())
        await self.received.put((dict(request.headers), values))
        return web.Response()

    async def next(self) -> tuple[dict[str, str], dict[str, str]]:
        return await asyncio.wait_for(self.received.get(), 3)


@pytest.fixture
async def subscriber() -> AsyncIterator[Subscriber]:
    made = Subscriber()
    server = await asyncio.get_running_loop().create_server(web.Server(made.handle), "127.0.0.1", 0)
    made.port = server.sockets[0].getsockname()[1]
    yield made
    server.close()


async def subscribe(rig: Rig, **headers: str) -> tuple[int, dict[str, str]]:
    async with rig.session.request("SUBSCRIBE", rig.url(2, "event"), headers=headers) as r:
        return r.status, dict(r.headers)


async def subscribe_from(rig: Rig, host: str) -> int:
    """SUBSCRIBE from a loopback address with a callback to that address: the HTTP status."""
    connector = aiohttp.TCPConnector(local_addr=(host, 0))
    headers = {"NT": "upnp:event", "CALLBACK": f"<http://{host}:9/>"}  # discard: quiet failures
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request("SUBSCRIBE", rig.url(2, "event"), headers=headers) as r,
    ):
        return r.status


async def test_initial_event_then_changes(rig: Rig, subscriber: Subscriber) -> None:
    status, headers = await subscribe(
        rig,
        NT="upnp:event",
        CALLBACK=f"<http://127.0.0.1:{subscriber.port}/cb>",
        TIMEOUT="Second-60",
    )
    assert status == 200 and headers["SID"].startswith("uuid:")
    assert headers["TIMEOUT"] == "Second-1800"  # UDA 1.1: at least 1800 s
    first, initial = await subscriber.next()
    assert first["SEQ"] == "0" and first["NT"] == "upnp:event" and first["SID"] == headers["SID"]
    assert initial["PortMappingNumberOfEntries"] == "0"
    assert initial["ExternalIPAddress"] == "198.51.100.7"
    assert initial["ConnectionStatus"] == "Connected" and "SystemUpdateID" in initial
    await rig.call("AddPortMapping", **add_args(8080))
    second, change = await subscriber.next()
    assert second["SEQ"] == "1" and change["PortMappingNumberOfEntries"] == "1"
    assert "ExternalIPAddress" not in change
    rig.upnp.address_changed()
    _, moved = await subscriber.next()
    assert moved["ExternalIPAddress"] == "198.51.100.7"
    status, renewed = await subscribe(rig, SID=headers["SID"], TIMEOUT="Second-3600")
    assert status == 200 and renewed["TIMEOUT"] == "Second-3600"
    async with rig.session.request(
        "UNSUBSCRIBE", rig.url(2, "event"), headers={"SID": headers["SID"]}
    ) as r:
        assert r.status == 200
    assert rig.upnp.events.subscriptions == {}


async def test_callstranger_callbacks_are_refused(rig: Rig, subscriber: Subscriber) -> None:
    for callback in (
        "<http://198.51.100.9:80/steal>",  # another host (the WAN, or a victim)
        f"<http://localhost:{subscriber.port}/>",  # a name, not our literal address
        f"<https://127.0.0.1:{subscriber.port}/>",
        "not a url",
        "",
    ):
        assert (await subscribe(rig, NT="upnp:event", CALLBACK=callback))[0] == 412, callback
    assert (await subscribe(rig, NT="upnp:propchange", CALLBACK="<http://127.0.0.1/>"))[0] == 412
    assert (await subscribe(rig, SID="uuid:nope", NT="upnp:event"))[0] == 400
    assert (await subscribe(rig, SID="uuid:nope"))[0] == 412
    # Several URLs: the first that is the subscriber's own is used.
    good = f"<http://203.0.113.5/><http://127.0.0.1:{subscriber.port}/cb>"
    assert (await subscribe(rig, NT="upnp:event", CALLBACK=good))[0] == 200
    headers, _ = await subscriber.next()
    assert headers["Host"] == f"127.0.0.1:{subscriber.port}"
    assert rig.upnp.events.subscriptions and not [
        s for s in rig.upnp.events.subscriptions.values() if str(s.target.host) != "127.0.0.1"
    ]


async def test_subscriptions_per_client_are_capped(rig: Rig) -> None:
    callback = "<http://127.0.0.1:9/>"  # discard port: deliveries fail, quietly
    for _ in range(MAX_SUBSCRIPTIONS_PER_CLIENT):
        assert (await subscribe(rig, NT="upnp:event", CALLBACK=callback))[0] == 200
    assert (await subscribe(rig, NT="upnp:event", CALLBACK=callback))[0] == 503


async def test_a_few_hosts_cannot_take_the_whole_subscription_pool(rig: Rig) -> None:
    # 17 hosts with 16 each: more than the pool holds.
    hogs = [f"127.0.1.{i}" for i in range(1, MAX_SUBSCRIPTIONS // MAX_SUBSCRIPTIONS_PER_CLIENT + 2)]
    each = range(MAX_SUBSCRIPTIONS_PER_CLIENT)
    statuses = [await subscribe_from(rig, host) for host in hogs for _ in each]
    assert statuses.count(200) >= MAX_SUBSCRIPTIONS
    assert len(rig.upnp.events.subscriptions) == MAX_SUBSCRIPTIONS  # the pool is full
    for newcomer in ("127.0.2.1", "127.0.2.2", "127.0.2.3"):
        assert await subscribe_from(rig, newcomer) == 200, newcomer
        assert await subscribe_from(rig, newcomer) == 200, newcomer  # fewer than the hogs
    assert len(rig.upnp.events.subscriptions) == MAX_SUBSCRIPTIONS
    held = [s.client for s in rig.upnp.events.subscriptions.values()]
    assert max(held.count(c) for c in set(held)) <= MAX_SUBSCRIPTIONS_PER_CLIENT
    assert await subscribe_from(rig, hogs[0]) == 503  # a hog at its share gets no more
