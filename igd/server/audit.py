"""The audit log: one JSON object per line for every grant, renewal, refusal and removal, of
mappings and of IPv6 pinholes ("event": "pinhole-open", "pinhole-renewal", ...).

It is a subscriber of the service's event feed (igd/server/feed.py), so writing never slows a
request: events queue (at most AUDIT_QUEUE_BOUND) and are written in batches off the event
loop's thread. If the writer falls behind, the oldest events are lost and a line of its own
says how many. The file is created mode 0600; it is reopened on SIGHUP (logrotate's rename,
then signal) and, optionally, rotated by size (`audit_max_bytes`, keeping `audit_keep` old
files as FILE.1 ... FILE.N).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from igd.events import (
    PINHOLE_EVENTS,
    Event,
    MappingGranted,
    MappingRemoved,
    MappingRenewed,
    PinholeOpened,
    PinholeRefused,
    PinholeRemoved,
    PinholeRenewed,
    RequestRefused,
)
from igd.model import Mapping, MapRequest
from igd.pinhole import Pinhole, PinholeRequest
from igd.server.feed import Subscriber
from igd.server.ratelog import RateLimitedLog

log = logging.getLogger("igd.audit")

AUDIT_QUEUE_BOUND = 4096
"""Events waiting to be written before the oldest are dropped (and counted in a "lost" line)."""
AUDITED = (MappingGranted, MappingRenewed, RequestRefused, MappingRemoved, *PINHOLE_EVENTS)
FILE_MODE = 0o600


def timestamp(wall: float) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2026-12-05T01:52:59.123Z."""
    moment = datetime.fromtimestamp(wall, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _request(request: MapRequest) -> dict[str, Any]:
    return {
        "protocol": str(request.protocol),
        "internal_address": str(request.internal_address),
        "internal_port": request.internal_port,
        "external_port": request.external_port,
        "exact_port": request.exact_port,
        "remote_host": str(request.remote_host) if request.remote_host else None,
        "lifetime": request.lifetime,
        "description": request.description,
    }


def _mapping(mapping: Mapping, now: float) -> dict[str, Any]:
    return {
        "protocol": str(mapping.protocol),
        "external_port": mapping.external_port,
        "remote_host": str(mapping.key.remote_host) if mapping.key.remote_host else None,
        "external_address": str(mapping.external_address) if mapping.external_address else None,
        "internal_address": str(mapping.internal_address),
        "internal_port": mapping.internal_port,
        "lease_remaining": mapping.remaining(now),
        "description": mapping.description,
    }


def _pinhole_request(request: PinholeRequest) -> dict[str, Any]:
    key = request.key
    return {
        "protocol": str(key.protocol),
        "internal_address": str(key.internal_address),
        "internal_port": key.internal_port,
        "remote_host": str(key.remote.network) if key.remote else None,
        "lifetime": request.lifetime,
        "description": request.description,
    }


def _pinhole(hole: Pinhole, now: float) -> dict[str, Any]:
    key = hole.key
    return {
        "protocol": str(key.protocol),
        "internal_address": str(key.internal_address),
        "internal_port": key.internal_port,
        "remote_host": str(key.remote.network) if key.remote else None,
        "filters": [str(f.network) + (f" port {f.port}" if f.port else "") for f in hole.filters],
        "lease_remaining": hole.remaining(now),
        "description": hole.description,
    }


def _pinhole_entry(
    kind: str, hole: Pinhole, decision: str | None, rule: str | None, cause: str | None, now: float
) -> dict[str, Any]:
    request = PinholeRequest(hole.key, hole.owner, hole.remaining(now), hole.description)
    return {
        "event": kind,
        "client": str(hole.owner.client),
        "mechanism": str(hole.owner.mechanism),
        "request": _pinhole_request(request) if decision else None,
        "decision": decision,
        "rule": rule,
        "cause": cause,
        "pinhole": _pinhole(hole, now),
    }


def record(event: Event, *, wall: float, now: float) -> dict[str, Any] | None:
    """The audit line for an event (None for kinds the audit log does not record)."""
    line: dict[str, Any] = {"time": timestamp(wall)}
    match event:
        case MappingGranted(mapping, request, rule, restrictions):
            line |= _entry("grant", request, "allow", rule, None)
            line["mapping"] = _mapping(mapping, now)
            if restrictions:
                line["restrictions"] = list(restrictions)
        case MappingRenewed(mapping, _, request, rule):
            line |= _entry("renewal", request, "allow", rule, None)
            line["mapping"] = _mapping(mapping, now)
        case RequestRefused(request, reason, rule, detail):
            line |= _entry("refusal", request, "deny", rule, str(reason))
            if detail:
                line["detail"] = detail
        case MappingRemoved(mapping, cause):
            owner = mapping.owner
            line |= {
                "event": "removal",
                "client": str(owner.client),
                "mechanism": str(owner.mechanism),
                "request": None,
                "decision": None,
                "rule": None,
                "cause": str(cause),
                "mapping": _mapping(mapping, now),
            }
        case PinholeOpened(hole, rule, restrictions):
            line |= _pinhole_entry("pinhole-open", hole, "allow", rule, None, now)
            if restrictions:
                line["restrictions"] = list(restrictions)
        case PinholeRenewed(hole, _, rule):
            line |= _pinhole_entry("pinhole-renewal", hole, "allow", rule, None, now)
        case PinholeRefused(request, refusal, rule, detail):
            line |= {
                "event": "pinhole-refusal",
                "client": str(request.owner.client),
                "mechanism": str(request.owner.mechanism),
                "request": _pinhole_request(request),
                "decision": "deny",
                "rule": rule,
                "cause": refusal.name.lower().replace("_", "-"),
            }
            if detail:
                line["detail"] = detail
        case PinholeRemoved(hole, cause):
            line |= _pinhole_entry("pinhole-removal", hole, None, None, str(cause), now)
        case _:
            return None
    return line


def _entry(
    kind: str, request: MapRequest, decision: str, rule: str, cause: str | None
) -> dict[str, Any]:
    return {
        "event": kind,
        "client": str(request.client),
        "mechanism": str(request.mechanism),
        "request": _request(request),
        "decision": decision,
        "rule": rule,
        "cause": cause,
    }


class AuditLog:
    """Writes the feed's grants, renewals, refusals and removals to a JSON-lines file."""

    def __init__(self, path: Path, *, max_bytes: int = 0, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("keep at least one rotated audit file")
        self.path = path
        self.max_bytes = max_bytes
        """Rotate once the file reaches this size (0: never; logrotate and SIGHUP instead)."""
        self.keep = keep
        self.written = 0
        """Lines written since start."""
        self._fd: int | None = None
        self._lock = asyncio.Lock()
        self._failures = RateLimitedLog(log, logging.ERROR)

    def open(self) -> None:
        """Open (creating, mode 0600) the file for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # an existing file keeps no looser mode
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def reopen(self) -> None:
        """Close and open the path again (after logrotate renamed the file away)."""
        async with self._lock:
            self.close()
            try:
                self.open()
            except OSError as error:
                self._failures.note(time.monotonic(), "cannot reopen audit log: %s", error)

    async def follow(self, subscriber: Subscriber) -> None:
        """Write every event the subscriber receives, until cancelled."""
        try:
            while True:
                events, lost = await subscriber.next()
                await self.write(events, lost)
        finally:
            subscriber.close()
            self.close()

    async def write(self, events: list[Event], lost: int = 0) -> None:
        """Append the lines for these events (and one for `lost` events before them)."""
        wall, now = time.time(), time.monotonic()
        lines = []
        if lost:
            lines.append({"time": timestamp(wall), "event": "lost", "count": lost})
        lines += [r for event in events if (r := record(event, wall=wall, now=now)) is not None]
        if not lines:
            return
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        async with self._lock:
            try:
                # Off the loop's thread: a slow disk delays the audit log, never a request.
                await asyncio.to_thread(self._append, data)
            except OSError as error:
                self._failures.note(
                    now, "audit log %s: %d lines not written: %s", self.path, len(lines), error
                )
                return
            self.written += len(lines)

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self.open()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.max_bytes and os.fstat(self._fd).st_size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self.close()
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self.open()
