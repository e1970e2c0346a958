"""A rule's remote_hosts over PCP: FILTERs intersected with the rule's sources, the applied
FILTERs reported back (RFC 6887 §13.3), NOT_AUTHORIZED when nothing is left."""

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from igd.gateway import Gateway
from igd.model import RemoteFilter
from igd.policy import Policy
from igd.proto import pcp
from igd.proto.pcp import PcpResult
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import ExternalAddress
from igd.server.pcp import PcpHandler
from igd.server.pcp_options import Limits
from igd.server.service import Service
from igd.server.store import LeaseStore
from tests.server.test_pcp import EXTERNAL, SOURCE, filter_of, map_request

POLICY = """
[[rules]]
name = "partners"
action = "allow"
clients = ["192.168.1.0/24"]
remote_hosts = ["198.51.100.0/24", "203.0.113.7"]
"""


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.backend = MemoryBackend()
        self.service = Service(
            Gateway(Policy.parse(POLICY)), self.backend, LeaseStore(tmp / "leases.sqlite")
        )
        external = ExternalAddress("wan0", override=EXTERNAL, allow_private=True)
        external.refresh()
        self.handler = PcpHandler(self.service, external, Limits(max_filters=4))

    async def ask(self, request: pcp.PcpRequest) -> pcp.PcpResponse:
        reply = await self.handler.handle(pcp.encode_request(request), SOURCE)
        assert reply is not None
        return pcp.decode_response(reply)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(tmp_path)
    committer = asyncio.create_task(made.service.run_committer())
    yield made
    committer.cancel()


async def test_without_filter_the_rules_sources_apply_and_no_filter_is_echoed(rig: Rig) -> None:
    answer = await rig.ask(map_request(8080, 8080, 600))
    assert answer.result is PcpResult.SUCCESS
    assert answer.options == ()  # §13.3: FILTER only in answer to a FILTER
    (entry,) = await rig.backend.entries()
    assert entry.filters == (
        RemoteFilter(IPv4Network("198.51.100.0/24")),
        RemoteFilter(IPv4Network("203.0.113.7/32")),
    )


async def test_filters_are_narrowed_and_the_applied_ones_reported(rig: Rig) -> None:
    wide = filter_of("198.51.0.0", 16, 443)
    inside = filter_of("203.0.113.7")
    outside = filter_of("192.0.2.1")
    answer = await rig.ask(map_request(8080, 8080, 600, wide, inside, outside))
    assert answer.result is PcpResult.SUCCESS
    assert set(answer.options) == {filter_of("198.51.100.0", 24, 443), inside}
    (entry,) = await rig.backend.entries()
    assert set(entry.filters) == {
        RemoteFilter(IPv4Network("198.51.100.0/24"), 443),
        RemoteFilter(IPv4Network("203.0.113.7/32")),
    }


async def test_filters_admitting_no_allowed_source_are_not_authorized(rig: Rig) -> None:
    answer = await rig.ask(map_request(8080, 8080, 600, filter_of("192.0.2.0", 24)))
    assert answer.result is PcpResult.NOT_AUTHORIZED
    assert not await rig.backend.entries()
