"""Load for tests/lab/test_crash.py, run in a LAN host: raw NAT-PMP and PCP datagrams and
UPnP AddPortMapping calls (async-upnp-client), several in flight, some mappings deleted again.

Every success answer is printed as one JSON line the moment it arrives, so whatever was
printed before the daemon died was acknowledged; a deletion is announced before it is sent,
since the daemon may carry it out and die before answering. Bounded: each worker makes at most
--count mappings, and the program stops by itself after --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any, TypeVar

from igd.client.upnp import UpnpIgdClient
from igd.model import Protocol
from igd.proto import natpmp, pcp
from igd.proto.natpmp import NatPmpMapRequest, NatPmpMapResponse, NatPmpResult
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpRequest, PcpResult

T = TypeVar("T")
LIFETIME = 600
WAIT = 0.3  # seconds before a retransmission
SENDS = 3  # transmissions of one request before giving up on it
DELETE_SHARE = 0.25  # of acknowledged mappings are deleted again


def report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class Channel(asyncio.DatagramProtocol):
    """One UDP socket to the gateway's port 5351, one request at a time."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait(data)

    async def ask(
        self, transport: asyncio.DatagramTransport, wire: bytes, match: Callable[[bytes], T | None]
    ) -> T | None:
        """Send `wire` (retransmitted) until a reply `match` accepts; None if none came."""
        for _ in range(SENDS):
            transport.sendto(wire)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while (left := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(self.replies.get(), left)
                except TimeoutError:
                    break
                found = match(data)
                if found is not None:
                    return found
        return None


async def open_channel(gateway: str) -> tuple[asyncio.DatagramTransport, Channel]:
    loop = asyncio.get_running_loop()
    transport, channel = await loop.create_datagram_endpoint(
        Channel, remote_addr=(gateway, natpmp.SERVER_PORT)
    )
    return transport, channel


def natpmp_reply(protocol: Protocol, port: int) -> Callable[[bytes], NatPmpMapResponse | None]:
    def match(data: bytes) -> NatPmpMapResponse | None:
        try:
            response = natpmp.decode_response(data)
        except ValueError:
            return None
        if isinstance(response, NatPmpMapResponse) and response.protocol is protocol:
            return response if response.internal_port == port else None
        return None

    return match


async def natpmp_worker(gateway: str, ports: range, rng: random.Random) -> None:
    transport, channel = await open_channel(gateway)
    for port in ports:
        protocol = rng.choice([Protocol.TCP, Protocol.UDP])
        wire = natpmp.encode_request(NatPmpMapRequest(protocol, port, port, LIFETIME))
        got = await channel.ask(transport, wire, natpmp_reply(protocol, port))
        if got is None or got.result != NatPmpResult.SUCCESS or got.lifetime == 0:
            continue
        key = {"mech": "natpmp", "protocol": str(protocol), "internal": port}
        report(op="map", external=got.external_port, **key)
        if rng.random() < DELETE_SHARE:
            report(op="deleting", **key)  # from here on, either outcome is right
            wire = natpmp.encode_request(NatPmpMapRequest(protocol, port, 0, 0))
            got = await channel.ask(transport, wire, natpmp_reply(protocol, port))
            if got is not None and got.result == NatPmpResult.SUCCESS and got.lifetime == 0:
                report(op="delete", **key)


def pcp_map(me: IPv4Address, nonce: bytes, protocol: Protocol, port: int, lifetime: int) -> bytes:
    data = PcpMapData(nonce, protocol.number, port, port, pcp.mapped(IPv4Address(0)))
    return pcp.encode_request(PcpRequest(PcpOpcode.MAP, lifetime, pcp.mapped(me), data))


def pcp_reply(nonce: bytes) -> Callable[[bytes], pcp.PcpResponse | None]:
    def match(data: bytes) -> pcp.PcpResponse | None:
        try:
            response = pcp.decode_response(data)
        except ValueError:
            return None
        body = response.data
        return response if isinstance(body, PcpMapData) and body.nonce == nonce else None

    return match


async def pcp_worker(gateway: str, me: IPv4Address, ports: range, rng: random.Random) -> None:
    transport, channel = await open_channel(gateway)
    for port in ports:
        protocol = rng.choice([Protocol.TCP, Protocol.UDP])
        nonce = secrets.token_bytes(pcp.NONCE_SIZE)
        wire = pcp_map(me, nonce, protocol, port, LIFETIME)
        got = await channel.ask(transport, wire, pcp_reply(nonce))
        if got is None or got.result is not PcpResult.SUCCESS or got.lifetime == 0:
            continue
        assert isinstance(got.data, PcpMapData)
        key = {"mech": "pcp", "protocol": str(protocol), "internal": port}
        report(op="map", external=got.data.external_port, nonce=nonce.hex(), **key)
        if rng.random() < DELETE_SHARE:
            report(op="deleting", **key)  # from here on, either outcome is right
            wire = pcp_map(me, nonce, protocol, port, 0)
            got = await channel.ask(transport, wire, pcp_reply(nonce))
            if got is not None and got.result is PcpResult.SUCCESS and got.lifetime == 0:
                report(op="delete", **key)


async def upnp_worker(
    client: UpnpIgdClient, me: IPv4Address, ports: range, rng: random.Random
) -> None:
    for port in ports:
        protocol = rng.choice([Protocol.TCP, Protocol.UDP])
        key = {"mech": "upnp", "protocol": str(protocol), "internal": port}
        try:
            await client.add_port_mapping(port, protocol, port, me, lease=LIFETIME)
        except Exception:  # a refusal or a dead gateway: not acknowledged
            await asyncio.sleep(0.05)
            continue
        report(op="map", external=port, **key)
        if rng.random() < DELETE_SHARE:
            report(op="deleting", **key)  # from here on, either outcome is right
            with contextlib.suppress(Exception):
                await client.delete_port_mapping(port, protocol)
                report(op="delete", **key)


async def upnp_workers(args: argparse.Namespace, me: IPv4Address, rng: random.Random) -> None:
    try:
        client = await UpnpIgdClient.connect(args.upnp, http_timeout=1.0)
    except Exception as error:  # the daemon died before we got there
        report(op="upnp unreachable", error=str(error))
        return
    workers = []
    for i in range(args.workers):
        start = args.base + 2000 + i * args.count
        ports = range(start, start + args.count)
        workers.append(upnp_worker(client, me, ports, random.Random(rng.random())))
    await asyncio.gather(*workers)


async def load(args: argparse.Namespace) -> None:
    """NAT-PMP from base, PCP from base + 1000, UPnP from base + 2000: `count` ports each
    worker, `workers` workers each mechanism, all at once."""
    me = IPv4Address(args.me)
    rng = random.Random(args.seed)
    async with asyncio.timeout(args.seconds), asyncio.TaskGroup() as group:
        for i in range(args.workers):
            start = args.base + i * args.count
            ports = range(start, start + args.count)
            group.create_task(natpmp_worker(args.gateway, ports, random.Random(rng.random())))
            ports = range(start + 1000, start + 1000 + args.count)
            group.create_task(pcp_worker(args.gateway, me, ports, random.Random(rng.random())))
        if args.upnp:
            group.create_task(upnp_workers(args, me, random.Random(rng.random())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--me", required=True)
    parser.add_argument("--upnp", default="", help="the IGD description URL")
    parser.add_argument("--base", type=int, required=True, help="first internal port")
    parser.add_argument("--count", type=int, default=100, help="mappings per worker")
    parser.add_argument("--workers", type=int, default=3, help="per mechanism")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with contextlib.suppress(TimeoutError):
        asyncio.run(load(args))


if __name__ == "__main__":
    main()
