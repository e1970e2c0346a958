"""PCP MAP on several external addresses (RFC 6887 §11.1, §11.3, §13.2): the assigned
address is the mapping's own; a suggested one is honoured where the rule allows it,
replaced where it does not, and refused under PREFER_FAILURE."""

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from igd.gateway import Gateway
from igd.policy import Policy
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpPreferFailure, PcpRequest, PcpResult
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import ExternalAddress
from igd.server.pcp import PcpHandler
from igd.server.service import Service
from igd.server.store import LeaseStore

SERVER = IPv4Address("192.168.1.20")
DESKTOP = IPv4Address("192.168.1.30")
DEFAULT = IPv4Address("198.51.100.7")
SECOND = IPv4Address("198.51.100.9")
POLICY = """
[defaults]
action = "deny"
[[rules]]
name = "servers"
action = "allow"
clients = ["192.168.1.20/32"]
external_addresses = ["198.51.100.9", "default"]
[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]
"""


@pytest.fixture
async def handler(tmp_path: Path) -> AsyncIterator[PcpHandler]:
    service = Service(
        Gateway(Policy.parse(POLICY)), MemoryBackend(), LeaseStore(tmp_path / "leases.sqlite")
    )
    external = ExternalAddress("wan0", override=DEFAULT, allow_private=True, further=(SECOND,))
    external.refresh()
    committer = asyncio.create_task(service.run_committer())
    yield PcpHandler(service, external)
    committer.cancel()


async def ask(
    handler: PcpHandler,
    client: IPv4Address,
    suggested: IPv4Address | None = None,
    external_port: int = 8080,
    *,
    prefer_failure: bool = False,
) -> pcp.PcpResponse:
    data = PcpMapData(
        bytes([client.packed[-1]]) * 12, 6, 8080, external_port,
        pcp.mapped(suggested or IPv4Address(0)),
    )  # fmt: skip
    options = (PcpPreferFailure(),) if prefer_failure else ()
    request = PcpRequest(PcpOpcode.MAP, 600, pcp.mapped(client), data, options)
    reply = await handler.handle(pcp.encode_request(request), (str(client), 5350))
    assert reply is not None
    return pcp.decode_response(reply)


def assigned(response: pcp.PcpResponse) -> IPv4Address | None:
    assert response.result is PcpResult.SUCCESS, response
    assert isinstance(response.data, PcpMapData)
    return pcp.unmapped(response.data.external_address)


async def test_the_rules_first_address_is_assigned_and_reported(handler: PcpHandler) -> None:
    assert assigned(await ask(handler, SERVER)) == SECOND
    # The same port on the default address goes to another host.
    assert assigned(await ask(handler, DESKTOP)) == DEFAULT


async def test_a_suggested_address_the_rule_allows_is_honoured(handler: PcpHandler) -> None:
    assert assigned(await ask(handler, SERVER, DEFAULT)) == DEFAULT


async def test_a_suggested_address_the_rule_does_not_allow_is_replaced_or_refused(
    handler: PcpHandler,
) -> None:
    refused = await ask(handler, DESKTOP, SECOND, prefer_failure=True)
    assert refused.result is PcpResult.CANNOT_PROVIDE_EXTERNAL
    assert handler.service.count() == 0
    assert assigned(await ask(handler, DESKTOP, SECOND)) == DEFAULT
    # An address that is not ours at all (a stale suggestion) is no preference.
    assert assigned(await ask(handler, SERVER, IPv4Address("203.0.113.77"))) == SECOND
