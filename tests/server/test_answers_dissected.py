"""Every answer on UDP 5351 is a whole, well-formed message: Wireshark's dissector (tshark)
reads each one without complaint and sees the fields the gateway meant.

Requests, good and bad (RFC 6886 §3.5, RFC 6887 §7.4, §8.2, §9: other versions, unknown
opcodes, truncated, oversize, R bit, broken options) and hypothesis-made ones go through the
server's one entry point for datagrams (`PxpServer.answer`), with the real handlers, service,
commit pipeline and lease store over the memory backend. tests/lab/test_wire_conformance.py
sends the same corpus to the daemon in the namespace lab.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igd.gateway import Gateway
from igd.policy import Policy
from igd.proto.pcp import PcpDescription, PcpFilter
from igd.server.backends.memory import MemoryBackend
from igd.server.interfaces import ExternalAddress
from igd.server.natpmp import NatPmpHandler
from igd.server.pcp import PcpHandler
from igd.server.pxp import PxpServer, RateLimiter
from igd.server.service import Service
from igd.server.store import LeaseStore
from tests.answers import PEER, check_answers, corpus, mutated_requests, pcp_map, pcp_peer

CLIENT = IPv4Address("192.168.1.10")
SOURCE = (str(CLIENT), 40000)
EXTERNAL = IPv4Address("198.51.100.7")
POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 120
max_mappings_per_client = 8
[[rules]]
name = "no telnet"
action = "deny"
internal_ports = "23"
[[rules]]
name = "lan"
action = "allow"
clients = ["192.168.1.0/24"]
external_ports = "1024-65535"
"""


def build(
    state: Path, *, online: bool = True, natpmp_on: bool = True, pcp_on: bool = True
) -> tuple[PxpServer, Service]:
    """The NAT-PMP/PCP server as the daemon assembles it, over the memory backend;
    without an external address unless `online`, each protocol on or off as configured."""
    service = Service(Gateway(Policy.parse(POLICY)), MemoryBackend(), LeaseStore(state))
    external = ExternalAddress("wan0", override=EXTERNAL, allow_private=True)
    external.refresh()
    if not online:
        external.current = None
    server = PxpServer(
        [],
        NatPmpHandler(service, external) if natpmp_on else None,
        PcpHandler(service, external) if pcp_on else None,
        RateLimiter(1000.0, 1000),
        service,
    )
    return server, service


async def exchange(requests: Sequence[bytes], state: Path, **how: bool) -> list[bytes | None]:
    """Each request through a fresh server, in order; the answer to each (None: silence)."""
    server, service = build(state, **how)
    committer = asyncio.create_task(service.run_committer())
    try:
        return [await server.answer(request, SOURCE) for request in requests]
    finally:
        committer.cancel()


def run(requests: Sequence[bytes], **how: bool) -> list[bytes | None]:
    with tempfile.TemporaryDirectory(prefix="igd-answers-") as tmp:
        return asyncio.run(exchange(requests, Path(tmp) / "leases.sqlite", **how))


SERVED = {
    "both": {},
    "no external address": {"online": False},
    "NAT-PMP off": {"natpmp_on": False},
    "PCP off": {"pcp_on": False},
}


@pytest.mark.parametrize("how", SERVED.values(), ids=SERVED.keys())
def test_every_answer_to_the_corpus_is_well_formed(how: dict[str, bool]) -> None:
    requests = corpus(CLIENT)
    answers = run(requests, **how)
    served = {k: v for k, v in how.items() if k != "online"}
    answered = check_answers(requests, answers, **served)
    # The corpus holds silent cases (R bit, truncated) and answered ones of every kind.
    assert 40 < answered < len(requests)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.one_of(mutated_requests(CLIENT), st.binary(max_size=1200)), max_size=25))
def test_every_answer_to_arbitrary_requests_is_well_formed(requests: list[bytes]) -> None:
    check_answers(requests, run(requests))


async def test_announcements_and_mapping_updates_are_well_formed(tmp_path: Path) -> None:
    server, service = build(tmp_path / "leases.sqlite")
    committer = asyncio.create_task(service.run_committer())
    try:
        for wire in (
            pcp_map(CLIENT, 8082, 600, PcpDescription("printer")),
            pcp_map(CLIENT, 8085, 600, PcpFilter(128, 443, PEER), PcpFilter(120, 0, PEER)),
            pcp_peer(CLIENT, 9000),
        ):
            answer = await server.answer(wire, SOURCE)
            assert answer is not None and answer[3] == 0
    finally:
        committer.cancel()
    assert server.natpmp is not None and server.pcp is not None
    # Each beside the header of the request it answers unasked.
    unsolicited = [
        (bytes(2), server.natpmp.announcement()),  # RFC 6886 §3.2.1
        (bytes([2, 0]) + bytes(22), server.pcp.announcement()),  # RFC 6887 §14.1.3
        # RFC 6887 §14.2: one Mapping Update per PCP mapping, MAP or PEER.
        *((bytes([2, m[1] & 0x7F]) + bytes(22), m) for m, _ in server.pcp.mapping_updates()),
    ]
    assert len(unsolicited) == 5
    check_answers([r for r, _ in unsolicited], [a for _, a in unsolicited])
