"""GENA follows the service's event feed: an external address change published by the
service (what the daemon's address watcher does) reaches subscribers, and so does a change
to the mapping table made over another protocol."""

from __future__ import annotations

from ipaddress import IPv4Address

from igd.model import MapRequest, Mechanism, Protocol
from tests.server.upnp.rig import Rig
from tests.server.upnp.test_events import Subscriber, subscribe
from tests.server.upnp.test_events import subscriber as subscriber


async def test_address_changes_and_other_protocols_changes_are_notified(
    rig: Rig, subscriber: Subscriber
) -> None:
    callback = f"<http://127.0.0.1:{subscriber.port}/cb>"
    assert (await subscribe(rig, NT="upnp:event", CALLBACK=callback))[0] == 200
    _, initial = await subscriber.next()
    assert initial["PortMappingNumberOfEntries"] == "0"
    rig.service.address_changed(None, IPv4Address("198.51.100.7"))
    _, moved = await subscriber.next()
    assert moved["ExternalIPAddress"] == "198.51.100.7" and "ConnectionStatus" in moved
    host = IPv4Address("127.0.0.5")
    await rig.service.map(MapRequest(Mechanism.NATPMP, host, Protocol.UDP, host, 5000, 5000, 600))
    _, mapped = await subscriber.next()
    assert mapped["PortMappingNumberOfEntries"] == "1"
