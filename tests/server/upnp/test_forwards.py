"""Static forwards seen over UPnP: listed read-only, never deleted, their ports never taken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from igd.model import MappingKey, Protocol
from igd.policy import Policy
from tests.server.upnp.rig import Rig, add_args
from tests.server.upnp.test_actions import LIST_ALL, code, out

POLICY = """
[defaults]
action = "allow"
secure_mode = false
min_lease = 2

[[forwards]]
name = "portal"
protocols = ["tcp"]
external_ports = "4443"
internal_address = "127.0.0.9"
internal_port = 8443
"""
KEY = {"NewRemoteHost": "", "NewExternalPort": 4443, "NewProtocol": "TCP"}


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


async def test_a_forward_is_listed_with_its_name_and_a_permanent_lease(rig: Rig) -> None:
    entry = out(await rig.call("GetGenericPortMappingEntry", NewPortMappingIndex=0))
    assert entry["NewExternalPort"] == "4443"
    assert (entry["NewInternalClient"], entry["NewInternalPort"]) == ("127.0.0.9", "8443")
    assert entry["NewPortMappingDescription"] == "portal"
    assert entry["NewLeaseDuration"] == "0"
    listing = out(await rig.call("GetListOfPortMappings", **LIST_ALL, NewNumberOfPorts=0))
    assert "<p:NewDescription>portal</p:NewDescription>" in listing["NewPortListing"]


async def test_no_control_point_deletes_a_forward(rig: Rig) -> None:
    # Even a client the policy lets manage every mapping (secure_mode = false).
    assert code(await rig.call("DeletePortMapping", **KEY)) == 606
    assert code(await rig.call("DeletePortMapping", 1, **KEY)) == 714
    assert code(await rig.call("DeletePortMappingRange", **LIST_ALL)) == 730
    assert rig.service.holder(MappingKey(Protocol.TCP, 4443)) is not None
    assert await rig.service.delete(MappingKey(Protocol.TCP, 4443)) is None
    await rig.service.flush()
    assert rig.service.count() == 1


async def test_a_forwards_port_is_never_granted_to_a_control_point(rig: Rig) -> None:
    assert code(await rig.call("AddPortMapping", **add_args(4443))) == 718
    assert code(await rig.call("AddPortMapping", 1, **add_args(4443))) == 718
    moved = out(await rig.call("AddAnyPortMapping", **add_args(4443)))
    assert moved["NewReservedPort"] != "4443"
