"""Namespace plumbing for the lab, the tests and the benchmarks: namespaces, veth links,
bridges and the processes in them.

Two ways in, one implementation: the functions (`add_netns`, `run_in`, `delete_netns`, ...)
that `lab.Lab` builds its topology with, and `Netns`/`create`/`netns`/`netns_group`, a
namespace as an object, for kernel tests that build their own small topology
(tests/netns.py re-exports those for the test suite).

Every veth pair is created directly inside its two namespaces (`ip -n A link add ... peer
... netns B`), so interface names only have to be unique within one namespace: parallel labs
never collide on them, and nothing is ever left behind in the root namespace.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

# Every namespace the lab makes starts with this, so that `./dev.sh lab down --all` finds them.
LAB_PREFIX = "igdlab"
# Suffix of a lab's work directory in the temporary directory: `<prefix>-work`.
WORKDIR_SUFFIX = "-work"
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL when stopping lab processes

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class LabError(RuntimeError):
    """The lab could not be built, used or torn down."""


class LabCommandError(subprocess.CalledProcessError):
    """A command inside a lab namespace exited non-zero; its message carries the output."""

    def __init__(
        self, ns: str, returncode: int, cmd: Sequence[str], output: str, stderr: str
    ) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.ns = ns

    def __str__(self) -> str:
        text = f"in {self.ns}: {' '.join(self.cmd)} exited {self.returncode}"
        for label, stream in (("stdout", self.output), ("stderr", self.stderr)):
            if stream and stream.strip():
                text += f"\n  {label}: {stream.strip()}"
        return text


def check_name(name: str) -> str:
    """`name` if it is safe as a namespace name or file name part; ValueError otherwise."""
    if not _NAME.match(name) or name.startswith("."):
        raise ValueError(f"bad lab name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run `ip [-n ns] args...` and return its stdout; LabError with stderr on failure."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def netns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def list_netns() -> list[str]:
    """Names of all named network namespaces on this machine."""
    # Lines look like "igdlab3f-gw (id: 4)" or just "igdlab3f-gw".
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def add_netns(ns: str) -> None:
    """Create namespace `ns` with its loopback up."""
    ip("netns", "add", check_name(ns))
    ip("link", "set", "lo", "up", ns=ns)


def netns_pids(ns: str) -> list[int]:
    """Processes running inside namespace `ns` (empty if it does not exist)."""
    out = ip("netns", "pids", ns, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def kill_pids(pids: Iterable[int], grace: float = KILL_GRACE) -> None:
    """SIGTERM `pids`, then SIGKILL whatever still runs after `grace` seconds."""
    alive = set(pids) - {os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list(alive):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                alive.discard(pid)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            alive = {pid for pid in alive if _running(pid)}
            if alive:
                time.sleep(0.05)
        if not alive:
            return


def _running(pid: int) -> bool:
    """Whether `pid` is still a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


def delete_netns(ns: str) -> None:
    """Kill every process in `ns`, then delete it. Deleting a missing namespace is fine."""
    if ns not in list_netns():
        return
    # A namespace lives on while any process holds it: `ip netns del` alone would only
    # unmount its name and leave its veths, addresses and nftables tables running.
    kill_pids(netns_pids(ns))
    ip("netns", "del", ns, check=False)
    if ns in list_netns():
        raise LabError(f"could not delete namespace {ns}")


def add_veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """A veth pair from `ns_a`/`name_a` to `ns_b`/`name_b`, both ends up."""
    for name in (name_a, name_b):
        if len(name) > 15:  # IFNAMSIZ - 1
            raise ValueError(f"interface name {name!r} is longer than 15 characters")
    ip("link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b, ns=ns_a)
    ip("link", "set", name_a, "up", ns=ns_a)
    ip("link", "set", name_b, "up", ns=ns_b)


def add_bridge(ns: str, name: str) -> None:
    """A bridge in `ns` that floods multicast to every port, up."""
    # No STP (ports forward at once), and no multicast snooping: without an IGMP querier on
    # the segment, snooping would forward a group only to ports whose reports it happened
    # to see, and SSDP and NAT-PMP announcements would reach some hosts and not others.
    ip(
        "link", "add", name, "type", "bridge",
        "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0",
        ns=ns,
    )  # fmt: skip
    ip("link", "set", name, "up", ns=ns)


def enslave(ns: str, port: str, bridge: str) -> None:
    """Make interface `port` a port of `bridge` in namespace `ns`."""
    ip("link", "set", port, "master", bridge, ns=ns)


def sysctl(ns: str, key: str, value: str) -> None:
    """Set sysctl `key` inside namespace `ns`."""
    # /proc/sys/net of the calling process follows its network namespace, so write it from
    # inside; `ip netns exec` also remounts /sys for the namespace.
    path = "/proc/sys/" + key.replace(".", "/")
    code = f"open({path!r}, 'w').write({value!r})"
    run_in(ns, [sys.executable, "-c", code], timeout=10)


def run_in(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30.0,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside namespace `ns`, capturing text output."""
    try:
        proc = subprocess.run(
            netns_exec(ns, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"in {ns}: {' '.join(argv)} timed out after {timeout} s") from exc
    if check and proc.returncode != 0:
        raise LabCommandError(ns, proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def workdir_path(prefix: str) -> Path:
    """Where the lab named `prefix` keeps its files (configs, logs, daemon state)."""
    return Path(tempfile.gettempdir()) / f"{check_name(prefix)}{WORKDIR_SUFFIX}"


def cleanup_stale(prefix: str) -> list[str]:
    """Delete every namespace and lab work directory whose name starts with `prefix`.

    Returns the names removed. Processes inside those namespaces are killed first.
    """
    check_name(prefix)
    removed: list[str] = []
    for ns in list_netns():
        if ns.startswith(prefix):
            delete_netns(ns)
            removed.append(ns)
    tmp = Path(tempfile.gettempdir())
    for path in tmp.iterdir():
        if (
            path.name.startswith(prefix)
            and path.name.endswith(WORKDIR_SUFFIX)
            and path.is_dir()
            and not path.is_symlink()
        ):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


# -- a namespace as an object ------------------------------------------------------------


def unique_name(prefix: str) -> str:
    """A fresh namespace name: prefix plus random hex, so parallel runs never collide."""
    return f"{prefix}{secrets.token_hex(4)}"


class Netns:
    """One network namespace under /run/netns, created by `ip netns add`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(
        self, *argv: str, check: bool = True, timeout: float = 10, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and capture its output.

        With `check`, a non-zero exit raises LabCommandError (a CalledProcessError that
        carries the output); a timeout raises LabError.
        """
        return run_in(self.name, argv, check=check, timeout=timeout, input=input)

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start a long-running command inside the namespace (caller stops it)."""
        return subprocess.Popen(
            netns_exec(self.name, argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def delete(self) -> None:
        """Stop what still runs inside, then delete the namespace (fine if already gone)."""
        delete_netns(self.name)

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def create(prefix: str) -> Netns:
    """Create a namespace named prefix + random hex, with loopback up."""
    ns = Netns(unique_name(prefix))
    try:
        add_netns(ns.name)
    except BaseException:
        ns.delete()
        raise
    return ns


@contextmanager
def netns(prefix: str) -> Iterator[Netns]:
    """A namespace for the duration of the block, deleted even when the block fails."""
    ns = create(prefix)
    try:
        yield ns
    finally:
        ns.delete()


@contextmanager
def netns_group(prefix: str, count: int) -> Iterator[list[Netns]]:
    """Several namespaces sharing one random prefix, all deleted at the end."""
    base = unique_name(prefix)
    with ExitStack() as stack:
        group: list[Netns] = []
        for i in range(count):
            ns = Netns(f"{base}-{i}")
            stack.callback(ns.delete)
            add_netns(ns.name)
            group.append(ns)
        yield group
