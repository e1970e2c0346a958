"""The control socket: `igd-server list`, `status`, `delete`, `flush` and `reload` ask the running
daemon over a Unix socket.

One JSON request line in (`{"command": "delete", "args": {...}}`), one JSON reply line out
(`{"result": ...}` or `{"error": "..."}`). Only root may ask: the socket file is mode 0600, and
each peer's credentials (SO_PEERCRED) are checked as well, so loosening the mode lets nobody
else in. Whatever arrives gets an answer, never a traceback; at most MAX_CLIENTS connections
are served at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from igd.server.ratelog import RateLimitedLog

log = logging.getLogger("igd.control")

MAX_REQUEST = 4096
"""Longest request line, in bytes (commands are short; arguments a few addresses)."""
MAX_CLIENTS = 16
"""Connections served at once; more are answered "busy" and closed."""
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
ROOT = 0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)

Command = Callable[[dict[str, Any]], Awaitable[Any]]
"""A command: its arguments in, its JSON-ready result out; CommandError for a refusal."""


class CommandError(Exception):
    """A command refused with a message for the admin (bad argument, no such mapping)."""


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None if unknown)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _, uid, _ = _UCRED.unpack(raw)
    return int(uid)


class ControlServer:
    """Serves named commands on a Unix socket, to root only."""

    def __init__(self, path: Path, commands: dict[str, Command]) -> None:
        self.path = path
        self.commands = commands
        self.allowed_uids = frozenset({ROOT, os.geteuid()})
        """Peers that may ask: root, and the daemon's own user."""
        self.active = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        # Any local user can connect at will: say so at most once a minute.
        self._refusals = RateLimitedLog(log, logging.WARNING)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        # Created 0600 from the start: no moment in which another user could connect.
        umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self.active += 1
        try:
            reply = await self._answer(reader, writer)
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError) as error:
            log.debug("control client gone: %s", error)
        finally:
            self.active -= 1
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        uid = peer_uid(writer.get_extra_info("socket"))
        if uid not in self.allowed_uids:
            self._refusals.note(
                time.monotonic(), "control socket: refused a peer with uid %s (root only)", uid
            )
            return {"error": f"permission denied: the control socket serves root only (uid {uid})"}
        if self.active > MAX_CLIENTS:
            return {"error": f"busy: {MAX_CLIENTS} control requests are being served; try again"}
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return {"error": f"request longer than {MAX_REQUEST} bytes"}
        except asyncio.IncompleteReadError as partial:
            line = partial.partial  # a request without its newline: the peer shut down writing
        except TimeoutError:
            return {"error": f"no complete request line within {READ_TIMEOUT:.0f} s"}
        return await self.reply(line)

    async def reply(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than ~1000
            return {"error": 'malformed request: want a JSON object line, e.g. {"command": "list"}'}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"error": 'malformed request: want a JSON object with a "command" string'}
        name = request["command"]
        args = request.get("args", {})
        command = self.commands.get(name)
        if command is None:
            shown = name if len(name) <= 40 else name[:40] + "..."
            known = ", ".join(sorted(self.commands))
            return {"error": f"unknown command {shown!r}; commands: {known}"}
        if not isinstance(args, dict):
            return {"error": 'malformed request: "args" must be a JSON object'}
        try:
            return {"result": await command(args)}
        except CommandError as error:
            return {"error": str(error)}
        except Exception as error:  # the daemon answers and keeps serving
            log.error("control command %s failed: %s: %s", name, type(error).__name__, error)
            return {"error": f"{name} failed: {type(error).__name__}: {error}"}


class NotRunning(RuntimeError):
    """No daemon answers on the control socket."""


class Refused(RuntimeError):
    """The daemon (or the socket's permissions) refused the request; the message says why."""


def ask(
    path: Path, command: str, args: dict[str, Any] | None = None, *, timeout: float = 5.0
) -> Any:
    """Send one command to the running daemon and return its result."""
    request: dict[str, Any] = {"command": command}
    if args:
        request["args"] = args
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except BrokenPipeError:
                pass  # answered (refused, busy) before reading: the answer is still there
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"igd-server is not running (nothing answers on {path})") from None
    except PermissionError:
        raise Refused(f"permission denied: {path} is for root only") from None
    except TimeoutError:
        raise Refused(f"no answer from the daemon within {timeout:.0f} s") from None
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise Refused("the daemon closed the connection without an answer") from None
    if "error" in reply:
        raise Refused(reply["error"])
    return reply["result"]
