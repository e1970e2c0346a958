"""The control socket: `igd-server list` asks the running daemon over a Unix socket.

One JSON request line in, one JSON reply line out. Only root (or whoever can reach the
socket file, mode 0600) can ask.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("igd.control")

MAX_REQUEST = 4096
Command = Callable[[], Any]


class ControlServer:
    """Serves named read-only commands on a Unix socket."""

    def __init__(self, path: Path, commands: dict[str, Command]) -> None:
        self.path = path
        self.commands = commands
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            reply = self._reply(line[:MAX_REQUEST])
            if inspect.isawaitable(reply.get("result")):
                # A command that reads the kernel (`list` with counters) is a coroutine.
                reply = {"result": await reply["result"]}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError) as error:
            log.debug("control client gone: %s", error)
        finally:
            writer.close()

    def _reply(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            command = self.commands[request["command"]]
        except (ValueError, KeyError, TypeError):
            return {"error": f"unknown request; commands: {', '.join(sorted(self.commands))}"}
        return {"result": command()}


class NotRunning(RuntimeError):
    """No daemon answers on the control socket."""


def ask(path: Path, command: str, *, timeout: float = 5.0) -> Any:
    """Send one command to the running daemon and return its result."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"igd-server is not running (nothing answers on {path})") from None
    reply = json.loads(b"".join(chunks))
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["result"]
