"""Memory per mirrored mapping of the double-NAT mirror (igd/server/upstream.py), measured in
one process: the mirror with igd.client's real PortMapper against a minimal PCP answerer on
loopback (every MAP granted). Root: it runs in a network namespace of its own (unshare -n).

`.venv/bin/python -m lab.mem_upstream [--mirrors 2000]`: bytes per mirror (tracemalloc, after
every mirror is held upstream) and the largest allocation sites. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import subprocess
import sys
import tracemalloc
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.proto import pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpResponse, PcpResult
from igd.server.config import UpstreamSettings
from igd.server.interfaces import ExternalAddress
from igd.server.upstream import Upstream

LOOPBACK = IPv4Address("127.0.0.1")
PUBLIC = IPv4Address("203.0.113.1")
FIRST_PORT = 20000
BATCH = 100


class Answerer(asyncio.DatagramProtocol):
    """A PCP server that grants every MAP as asked (RFC 6887 §11) and answers ANNOUNCE."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.started = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        transport = self.transport
        try:
            request = pcp.decode_request(data)
        except pcp.PcpDecodeError:
            return
        epoch = int(asyncio.get_running_loop().time() - self.started) + 1000
        if request.opcode is PcpOpcode.MAP and isinstance(request.data, PcpMapData):
            port = request.data.external_port or request.data.internal_port
            answer = PcpResponse(
                PcpOpcode.MAP, PcpResult.SUCCESS, request.lifetime, epoch,
                PcpMapData(request.data.nonce, request.data.protocol, request.data.internal_port,
                           port, pcp.mapped(PUBLIC)),
            )  # fmt: skip
        else:
            answer = PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, epoch)
        transport.sendto(pcp.encode_response(answer), addr)


class View:
    """The little of the service the mirror reads."""

    def is_local(self, address: IPv4Address) -> bool:
        return False

    def is_own(self, address: IPv4Address) -> bool:
        return False


def local(port: int) -> Mapping:
    owner = Owner(Mechanism.NATPMP, IPv4Address("192.168.77.10"))
    key = MappingKey(Protocol.TCP, port)
    return Mapping(key, IPv4Address("192.168.77.10"), port, owner, 0.0, 3600.0)


async def finished(mirror: Any) -> None:
    """Until the mirror's request upstream has ended."""
    asking = mirror.asking
    if asking is not None:
        await asking.wait()


async def measure(count: int, top: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Answerer, local_addr=(str(LOOPBACK), 5351))
    external = ExternalAddress("lo", override=IPv4Address("192.168.1.2"), allow_private=True)
    external.refresh()
    settings = UpstreamSettings(mode="pcp", address=LOOPBACK, reply_wait=5.0)
    mirror = Upstream(settings, external)
    mirror._service = View()  # type: ignore[assignment]
    await mirror.start()
    # One mirror first, so what every process has once (sockets, the announce listener,
    # caches) is not counted per mirror.
    warm = mirror.ensure(local(FIRST_PORT - 1))
    assert warm is not None
    await finished(warm)
    gc.collect()
    tracemalloc.start(8)
    before = tracemalloc.take_snapshot()
    for start in range(0, count, BATCH):
        # In batches, as a gateway's clients come: a burst of thousands would overflow the
        # loopback socket buffers, which is not what is measured here.
        ports = range(FIRST_PORT + start, FIRST_PORT + min(count, start + BATCH))
        batch = [mirror.ensure(local(port)) for port in ports]
        for held in batch:
            assert held is not None
            await finished(held)
    await asyncio.sleep(0.5)  # the last answers' tasks finish
    gc.collect()
    after = tracemalloc.take_snapshot()
    mirrored, failing = mirror.counts()
    if mirrored != count + 1:
        raise SystemExit(f"only {mirrored} of {count + 1} mirrored ({failing} failing)")
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{count} mirrors: {total / count:.0f} bytes per mirror (tracemalloc, Python heap)")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        name = Path(frame.filename).name
        print(f"  {stat.size_diff / count:7.0f} B  {name}:{frame.lineno}")
    tracemalloc.stop()
    # No close(): releasing thousands at once is not what is measured; the namespace goes.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrors", type=int, default=2000)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    if os.environ.get("IGD_MEM_INSIDE") != "1":
        # Alone in a network namespace: port 5351 on loopback is ours, nothing else is asked.
        env = {**os.environ, "IGD_MEM_INSIDE": "1"}
        script = 'ip link set lo up && exec "$0" -m lab.mem_upstream "$@"'
        command = ["unshare", "-n", "sh", "-c", script, sys.executable, *(argv or sys.argv[1:])]
        return subprocess.run(command, env=env, check=False).returncode
    socket.setdefaulttimeout(5)
    asyncio.run(measure(args.mirrors, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
