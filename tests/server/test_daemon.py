"""The daemon in-process on loopback with --dry-run: it serves NAT-PMP, lists, reloads and
stops without touching nftables or any lease file."""

import asyncio
import json
import socket
from pathlib import Path

from igd.model import Protocol
from igd.proto import natpmp
from igd.proto.natpmp import NatPmpMapRequest, NatPmpMapResponse, NatPmpResult
from igd.server.config import Config
from igd.server.control import ask
from igd.server.daemon import Daemon

POLICY = '[defaults]\naction = "allow"\nmin_lease = 1\n'


async def exchange(request: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Not 127.0.0.1: that is the gateway's own address on its internal interface `lo`.
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        await loop.sock_sendto(sock, request, ("127.0.0.1", 5351))
        return await asyncio.wait_for(loop.sock_recv(sock, 2048), 2)


async def test_dry_run_serves_and_lists(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(POLICY)
    config = tmp_path / "config.toml"
    config.write_text(
        '[network]\nexternal_interface = "igd-none0"\ninternal_interfaces = ["lo"]\n'
        'external_address = "192.0.2.44"\nallow_private_external = true\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n[policy]\nfile = "policy.toml"\n'
        '[nftables]\ntable = "igddryrun"\n[upnp]\nenabled = false\n'
    )
    daemon = Daemon(Config.load(config), dry_run=True)
    task = asyncio.create_task(daemon.run())
    try:
        for _ in range(50):
            if (tmp_path / "state" / "control.sock").exists():
                break
            await asyncio.sleep(0.05)
        wire = natpmp.encode_request(NatPmpMapRequest(Protocol.UDP, 4000, 4000, 60))
        response = natpmp.decode_response(await exchange(wire))
        assert isinstance(response, NatPmpMapResponse)
        assert (response.result, response.external_port) == (NatPmpResult.SUCCESS, 4000)
        address = natpmp.decode_response(await exchange(bytes(2)))
        assert str(address.address) == "192.0.2.44"
        listed = await asyncio.to_thread(ask, tmp_path / "state" / "control.sock", "list")
        assert [(m["protocol"], m["external_port"]) for m in listed] == [("udp", 4000)]
        status = await asyncio.to_thread(ask, tmp_path / "state" / "control.sock", "status")
        assert status["mappings"] == 1 and status["external_address"] == "192.0.2.44"
    finally:
        daemon.shutdown()
        await asyncio.wait_for(task, 5)
    tables = await asyncio.create_subprocess_exec(
        "nft", "-j", "list", "tables", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await tables.communicate()
    names = [t["table"]["name"] for t in json.loads(out)["nftables"] if "table" in t]
    assert "igddryrun" not in names
    assert not (tmp_path / "state" / "leases.sqlite").exists()
