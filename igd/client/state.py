"""The client's own mappings, remembered across runs in a small per-user file: which
mechanism made each one, on which gateway, its PCP nonce and when it expires, so that
`igd map` twice refreshes the same mapping and `igd unmap` / `igd list` work later.

One JSON file (`$XDG_STATE_HOME/igd/mappings.json`, mode 0600), replaced atomically (write a
temporary file in the same directory, fsync, rename) under an exclusive `flock` on a lock
file beside it, so concurrent `igd` runs never lose each other's records."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from igd.client.mapping import EventKind, Mapping, MappingEvent
from igd.client.mechanisms import Grant, MapSpec
from igd.model import Mechanism, Protocol

log = logging.getLogger("igd.client")

MAX_RECORDS = 1024  # per file: a user's own mappings; the oldest-expiring go first beyond it
FILE_NAME = "mappings.json"
VERSION = 1

Key = tuple[str, str, str, int]
"""(gateway, protocol, internal address, internal port): one mapping per internal port (and
one pinhole: its gateway and internal address are IPv6)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One mapping (or IPv6 pinhole) this user made, as remembered between runs."""

    gateway: str
    mechanism: Mechanism
    protocol: Protocol
    internal_address: str
    internal_port: int
    external_address: str
    external_port: int
    lifetime: int
    expires_at: float | None
    """Wall clock (Unix seconds) when the lease ends; None for a permanent UPnP lease."""
    nonce: str | None = None
    """PCP mapping nonce, hex: a PCP server deletes or renews a mapping only with it."""
    description: str = ""
    unique_id: int | None = None
    """UPnP pinholes: the UniqueID that updates and deletes it."""

    @property
    def family(self) -> int:
        """4 for a port mapping, 6 for a pinhole."""
        return ip_address(self.internal_address).version

    @property
    def key(self) -> Key:
        return (self.gateway, self.protocol.value, self.internal_address, self.internal_port)

    def live(self, now: float) -> bool:
        """Whether the lease has not run out at `now` (wall clock)."""
        return self.expires_at is None or self.expires_at > now

    def remaining(self, now: float) -> float | None:
        """Seconds left at `now`; None if permanent."""
        return None if self.expires_at is None else max(0.0, self.expires_at - now)

    @classmethod
    def of(cls, gateway: str, mapping: Mapping[Any], *, now: float) -> Record:
        """The record of `mapping` on `gateway`, as granted at `now` (wall clock)."""
        nonce = mapping.grant.nonce
        return cls(
            gateway, mapping.mechanism, mapping.protocol, str(mapping.internal_address),
            mapping.internal_port, str(mapping.external_address), mapping.external_port,
            mapping.lifetime, now + mapping.lifetime if mapping.lifetime else None,
            nonce.hex() if nonce else None, mapping.spec.description, mapping.grant.unique_id,
        )  # fmt: skip

    def grant(self) -> Grant:
        """The grant to renew or delete (same mechanism, port and nonce)."""
        return Grant(
            self.mechanism, ip_address(self.external_address), self.external_port,
            self.lifetime, nonce=bytes.fromhex(self.nonce) if self.nonce else None,
            unique_id=self.unique_id,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mechanism"], data["protocol"] = self.mechanism.value, self.protocol.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """A record read back; ValueError, KeyError or TypeError if it does not fit."""
        expires = data["expires_at"]
        return cls(
            gateway=str(data["gateway"]),
            mechanism=Mechanism(data["mechanism"]),
            protocol=Protocol(data["protocol"]),
            internal_address=str(data["internal_address"]),
            internal_port=int(data["internal_port"]),
            external_address=str(data["external_address"]),
            external_port=int(data["external_port"]),
            lifetime=int(data["lifetime"]),
            expires_at=None if expires is None else float(expires),
            nonce=None if data.get("nonce") is None else str(data["nonce"]),
            description=str(data.get("description", "")),
            unique_id=None if data.get("unique_id") is None else int(data["unique_id"]),
        )


def default_path() -> Path:
    """`$XDG_STATE_HOME/igd/mappings.json`, `~/.local/state/igd/mappings.json` without it."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    # XDG Base Directory spec: a relative path in the variable is invalid and ignored.
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "igd" / FILE_NAME


class StateFile:
    """The per-user record of the client's mappings; every change is one locked,
    atomic read-modify-write."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()

    def __repr__(self) -> str:
        return f"<StateFile {self.path}>"

    def records(self, *, now: float) -> list[Record]:
        """The live records (expired ones are left out)."""
        with self._locked():
            return [r for r in self._read() if r.live(now)]

    def find(self, key: Key, *, now: float) -> Record | None:
        """The live record for `key`, if any."""
        return next((r for r in self.records(now=now) if r.key == key), None)

    def put(self, record: Record, *, now: float) -> None:
        """Store `record`, replacing the one with the same key."""
        self._update(lambda rs: [r for r in rs if r.key != record.key] + [record], now)

    def remove(self, key: Key, *, now: float) -> None:
        """Forget the record for `key` (nothing if there is none)."""
        self._update(lambda rs: [r for r in rs if r.key != key], now)

    def _update(self, change: Callable[[list[Record]], list[Record]], now: float) -> None:
        with self._locked():
            records = change([r for r in self._read() if r.live(now)])
            if len(records) > MAX_RECORDS:
                records.sort(key=lambda r: float("inf") if r.expires_at is None else r.expires_at)
                records = records[-MAX_RECORDS:]
            self._write(records)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for one read-modify-write: milliseconds
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _read(self) -> list[Record]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable state file %s: %s", self.path, exc)
            return []
        records = []
        items = data.get("mappings", []) if isinstance(data, dict) else []
        for item in items if isinstance(items, list) else []:
            try:
                records.append(Record.from_dict(item))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring a bad record in %s: %s", self.path, exc)
        return records

    def _write(self, records: list[Record]) -> None:
        text = json.dumps({"version": VERSION, "mappings": [r.to_dict() for r in records]})
        fd, name = tempfile.mkstemp(prefix=".mappings.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                os.fchmod(out.fileno(), 0o600)  # nonces let whoever reads them delete
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise


class Memory:
    """What a `PortMapper` remembers in its state file (nothing without one); a file that
    cannot be read or written is logged, never fatal to the mapping itself."""

    def __init__(self, state: StateFile | None, wall_clock: Callable[[], float]) -> None:
        self.state = state
        self.wall_clock = wall_clock

    def find(self, gateway: str, spec: MapSpec) -> Record | None:
        """The live record of `spec`'s internal port on `gateway`, if any."""
        if self.state is None:
            return None
        key = (gateway, spec.protocol.value, str(spec.internal_address), spec.internal_port)
        try:
            return self.state.find(key, now=self.wall_clock())
        except OSError as exc:
            log.warning("cannot read the state file %s: %s", self.state.path, exc)
            return None

    def remember(self, gateway: str, mapping: Mapping[Any], event: MappingEvent[Any]) -> None:
        """Keep the file in step with `mapping` after `event`."""
        if self.state is None or event.kind in (EventKind.FAILED, EventKind.LOST):
            return
        now = self.wall_clock()
        record = Record.of(gateway, mapping, now=now)
        try:
            if event.kind is EventKind.RELEASED:
                self.state.remove(record.key, now=now)
            else:
                self.state.put(record, now=now)
        except OSError as exc:
            log.warning("cannot update the state file %s: %s", self.state.path, exc)

    def forget(self, key: Key) -> None:
        """Drop the record for `key` (an unreadable file: nothing to drop)."""
        if self.state is not None:
            with contextlib.suppress(OSError):
                self.state.remove(key, now=self.wall_clock())

    def records(self, gateways: Collection[str]) -> list[Record]:
        """The live records made on any of `gateways`."""
        if self.state is None:
            return []
        return [r for r in self.state.records(now=self.wall_clock()) if r.gateway in gateways]
