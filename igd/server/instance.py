"""One igd-server per network namespace and per state directory; start-up checks that run
before the kernel or any socket is touched.

Two `flock` locks, taken before anything else: one on `<run directory>/net-<inode>.lock` keyed
on the network namespace (its nftables tables, UDP 5351 and the UPnP ports are per namespace),
one on `<state directory>/igd-server.lock` (the lease store and the control socket live
there). A second instance, `--dry-run` or not, whatever its state directory or table name,
finds one of them held and refuses to start, naming the holder's pid. The kernel drops a
`flock` when its holder dies, so a crashed daemon leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from igd.server.interfaces import bind_to_device, ipv4_interfaces

RUN_DIRECTORY = Path("/run/igd")
"""Where the namespace lock lives; systemd's RUNTIME_DIRECTORY (RuntimeDirectory=igd) wins."""
STATE_LOCK = "igd-server.lock"
LOCK_TRIES = 5
NETNS = Path("/proc/self/ns/net")


class StartError(RuntimeError):
    """The daemon must not start; the message is one line for the admin."""


class AlreadyRunning(StartError):
    """Another igd-server holds one of the instance locks."""


def run_directory() -> Path:
    """The run directory: $RUNTIME_DIRECTORY (set by systemd) or /run/igd."""
    given = os.environ.get("RUNTIME_DIRECTORY", "")
    # systemd lists several directories separated by ':' when a unit names several.
    first = given.split(":", 1)[0]
    return Path(first) if first else RUN_DIRECTORY


def namespace_key() -> str:
    """The inode of this process's network namespace: what every igd-server in it shares."""
    return str(NETNS.stat().st_ino)


@dataclass(slots=True)
class InstanceLock:
    """The held locks; `release` (or process exit) frees them."""

    fds: list[int]
    paths: list[Path]

    def release(self) -> None:
        """Remove the namespace's lock file, unlock and close; idempotent."""
        if self.fds and self.paths:
            # Still held here, so no one else holds it; whoever opened it meanwhile finds it
            # unlinked after taking it and starts over (`_lock`). The state directory's file
            # stays: it is one per directory, not one per namespace ever used.
            with contextlib.suppress(OSError):
                self.paths[0].unlink()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def acquire(state_directory: Path, *, run_dir: Path | None = None) -> InstanceLock:
    """Take both instance locks or raise AlreadyRunning / StartError, holding none."""
    run_dir = run_directory() if run_dir is None else run_dir
    # The namespace's first: a second instance with a state directory of its own then leaves
    # nothing there either.
    paths = [run_dir / f"net-{namespace_key()}.lock", state_directory / STATE_LOCK]
    held = InstanceLock([], [])
    try:
        for path in paths:
            held.fds.append(_lock(path))
            held.paths.append(path)
    except BaseException:
        held.release()
        raise
    return held


def _lock(path: Path) -> int:
    """flock `path` (created if missing) exclusively without waiting; its fd."""
    for _ in range(LOCK_TRIES):
        fd = _lock_once(path)
        try:
            same = os.fstat(fd).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and our flock
    raise StartError(f"the instance lock {path} keeps being replaced")


def _lock_once(path: Path) -> int:
    try:
        # 0700: the state directory holds who mapped what, and the control socket.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise StartError(f"cannot create {path.parent} for the instance lock: {error}") from None
    try:
        # 0600: flock needs only a readable file, so a lock file others can read is one any
        # local user could hold to keep the daemon from starting.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        writable = True
    except PermissionError:
        # A lock file of another user that this one may read: flock needs no write access.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise StartError(f"cannot open the instance lock {path}: {error}") from None
        writable = False
    except OSError as error:
        raise StartError(f"cannot open the instance lock {path}: {error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(path, fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise AlreadyRunning(
            f"another igd-server is running ({who} holds {path}); stop it first"
        ) from None
    if writable:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)  # a file left by an older version may be readable by others
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_holder(path: Path, fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd`: from /proc/locks, else the file."""
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; blocked waiters have "->".
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                with contextlib.suppress(ValueError):
                    return int(fields[4])
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


# -- interfaces ---------------------------------------------------------------------------


def interface_problems(external: str, internal: Iterable[str], *, need_address: bool) -> list[str]:
    """Missing interfaces, or ones without IPv4 (external: only when `need_address`)."""
    problems = []
    present = {name for _, name in socket.if_nameindex()}
    # With network.external_address the interface only names where DNAT applies (nftables
    # matches the name, so one that appears later, such as ppp0, works): the daemon warns.
    if need_address and external not in present:
        problems.append(f"external interface {external!r} does not exist")
    elif need_address and not ipv4_interfaces(external):
        problems.append(f"external interface {external!r} has no IPv4 address")
    for name in internal:
        if name not in present:
            problems.append(f"internal interface {name!r} does not exist")
        elif not ipv4_interfaces(name):
            problems.append(f"internal interface {name!r} has no IPv4 address")
    return problems


# -- ports --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Port:
    """A socket the daemon will bind: protocol, address, port, device, SO_REUSEADDR."""

    kind: socket.SocketKind
    address: str
    port: int
    device: str
    reuse: bool
    what: str

    def describe(self) -> str:
        """E.g. `UDP 5351 on br-lan (NAT-PMP/PCP)`."""
        name = "UDP" if self.kind == socket.SOCK_DGRAM else "TCP"
        host = f"[{self.address}]" if ":" in self.address else self.address
        where = f"{host}:{self.port}" if self.address not in ("0.0.0.0", "::") else str(self.port)
        return f"{name} {where} on {self.device} ({self.what})"


def check_ports(ports: Iterable[Port]) -> None:
    """Bind each port as the daemon will, then let it go; StartError naming a busy one."""
    for port in ports:
        try:
            six = ":" in port.address
            with socket.socket(socket.AF_INET6 if six else socket.AF_INET, port.kind) as sock:
                if six:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port.reuse:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                bind_to_device(sock, port.device)
                sock.bind((port.address, port.port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise StartError(f"cannot bind {port.describe()}: {error.strerror}") from None
            owners = port_owners(port.kind, port.port)
            who = f" by {', '.join(owners)}" if owners else ""
            raise StartError(f"{port.describe()} is already in use{who}") from None


def port_owners(kind: socket.SocketKind, port: int) -> list[str]:
    """`name (pid N)` of each process of this namespace with a socket on `port`, per /proc."""
    table = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    inodes = set(_socket_inodes(Path(f"/proc/net/{table}"), port))
    if not inodes:
        return []
    found = []
    for pid, inode in _process_sockets():
        if inode in inodes:
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                name = "?"
            label = f"{name} (pid {pid})"
            if label not in found:
                found.append(label)
    return found


def _socket_inodes(table: Path, port: int) -> Iterator[str]:
    with contextlib.suppress(OSError):
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            # "sl local_address rem_address st ... uid timeout inode": local is HEXADDR:HEXPORT.
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                yield fields[9]


def _process_sockets() -> Iterator[tuple[int, str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        yield int(entry.name), target[8:-1]
