"""A loopback UPnP gateway per test (needs root for SO_BINDTODEVICE, like the lab)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.server.upnp.rig import Rig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig.make(tmp_path)
    await made.upnp.http.start([made.upnp.interfaces[0]])
    committer = asyncio.create_task(made.service.run_committer())
    follower = asyncio.create_task(made.upnp.follow())
    try:
        yield made
    finally:
        committer.cancel()
        follower.cancel()
        await made.session.close()
        await made.upnp.events.close()
        await made.upnp.http.close()
