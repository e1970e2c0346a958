"""Throwaway network namespaces for kernel tests: the lab's harness (lab/netns.py), plus a
root check that fails the test (lab tests run in CI and never skip)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lab import netns as _harness
from lab.netns import LabCommandError, LabError, Netns, create, unique_name

__all__ = [
    "LabCommandError",
    "LabError",
    "Netns",
    "create",
    "netns",
    "netns_group",
    "require_root",
    "unique_name",
]


def require_root() -> None:
    """Fail (never skip) the calling test when not root: lab tests must run in CI."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, nftables); run it as root")


@contextmanager
def netns(prefix: str) -> Iterator[Netns]:
    """A namespace for the duration of the block, deleted even when the block fails."""
    require_root()
    with _harness.netns(prefix) as ns:
        yield ns


@contextmanager
def netns_group(prefix: str, count: int) -> Iterator[list[Netns]]:
    """Several namespaces sharing one random prefix, all deleted at the end."""
    require_root()
    with _harness.netns_group(prefix, count) as group:
        yield group
