"""Throwaway network namespaces for kernel tests: create, run commands inside, always delete."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest


def require_root() -> None:
    """Fail (never skip) the calling test when not root: lab tests must run in CI."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, nftables); run it as root")


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
        """Run a command inside the namespace and capture its output."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start a long-running command inside the namespace (caller stops it)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def delete(self) -> None:
        """Kill what still runs inside (only our own processes live here), then delete."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def create(prefix: str) -> Netns:
    """Create a namespace named prefix + random hex, with loopback up."""
    ns = Netns(unique_name(prefix))
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
    try:
        ns.run("ip", "link", "set", "lo", "up")
    except BaseException:
        ns.delete()
        raise
    return ns


@contextmanager
def netns(prefix: str) -> Iterator[Netns]:
    """A namespace for the duration of the block, deleted even when the block fails."""
    require_root()
    ns = create(prefix)
    try:
        yield ns
    finally:
        ns.delete()


@contextmanager
def netns_group(prefix: str, count: int) -> Iterator[list[Netns]]:
    """Several namespaces sharing one random prefix, all deleted at the end."""
    require_root()
    base = unique_name(prefix)
    with ExitStack() as stack:
        group: list[Netns] = []
        for i in range(count):
            ns = Netns(f"{base}-{i}")
            subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
            stack.callback(ns.delete)
            ns.run("ip", "link", "set", "lo", "up")
            group.append(ns)
        yield group
