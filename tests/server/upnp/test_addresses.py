"""UPnP beside mappings on a further external address: it reports and manages the default
address only (GetExternalIPAddress, GetSpecificPortMappingEntry, AddPortMapping), while its
listings show every mapping; NewRemoteHost keeps its meaning (the remote peer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from igd.model import MappingKey, Protocol
from igd.policy import Policy
from tests.server.upnp.rig import Rig, add_args
from tests.server.upnp.test_actions import code, out

SECOND = IPv4Address("198.51.100.9")
POLICY = """
[defaults]
action = "allow"
secure_mode = false
min_lease = 2

[[forwards]]
name = "on the second address"
protocols = ["tcp"]
external_ports = "5443"
internal_address = "127.0.0.9"
external_address = "198.51.100.9"
"""
KEY = {"NewRemoteHost": "", "NewExternalPort": 5443, "NewProtocol": "TCP"}


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig.make(tmp_path, POLICY)
    await made.upnp.http.start([made.upnp.interfaces[0]])
    committer = asyncio.create_task(made.service.run_committer())
    await made.service.reload(Policy.parse(POLICY))
    try:
        yield made
    finally:
        committer.cancel()
        await made.session.close()
        await made.upnp.events.close()
        await made.upnp.http.close()


async def test_upnp_sees_the_default_address_and_lists_every_mapping(rig: Rig) -> None:
    address = out(await rig.call("GetExternalIPAddress"))["NewExternalIPAddress"]
    assert address == "198.51.100.7"
    # Port 5443 is held on the second address only: free on the default one.
    assert code(await rig.call("GetSpecificPortMappingEntry", **KEY)) == 714
    assert out(await rig.call("AddPortMapping", **add_args(5443))) == {}
    entry = out(await rig.call("GetSpecificPortMappingEntry", **KEY))
    assert entry["NewInternalClient"] == "127.0.0.1"
    described = {
        out(await rig.call("GetGenericPortMappingEntry", NewPortMappingIndex=i))[
            "NewPortMappingDescription"
        ]
        for i in range(2)
    }
    assert "on the second address" in described
    # Deleting 5443 over UPnP removes the default address's mapping, not the forward.
    assert out(await rig.call("DeletePortMapping", **KEY)) == {}
    assert rig.service.holder(MappingKey(Protocol.TCP, 5443, None, SECOND)) is not None
    assert rig.service.holder(MappingKey(Protocol.TCP, 5443)) is None
