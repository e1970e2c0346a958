"""Fixtures for namespace-lab tests: a fresh lab per test, and a way to start the daemon in it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from lab import Lab
from lab.demo import wait_for_gateway

REPO = Path(__file__).resolve().parents[2]
LAB_POLICY = REPO / "policies" / "lab.toml"


class StartGateway(Protocol):
    """Start the daemon in the lab's gateway and wait until it answers NAT-PMP."""

    def __call__(
        self,
        policy: str | Path = ...,
        *,
        extra_args: tuple[str, ...] = ...,
        wait: bool = ...,
        **sections: dict[str, Any],
    ) -> subprocess.Popen[bytes]: ...


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A built lab (2 WAN hosts, gateway, 2 LAN hosts), torn down after the test."""
    with Lab() as built:
        yield built


@pytest.fixture
def gateway(lab: Lab) -> StartGateway:
    """Start `python -m igd.server` in `lab`'s gateway with a policy and config overrides.

    `gateway(policy, natpmp={"enabled": False}, ...)`: each keyword updates one config table.
    Waits until NAT-PMP answers from lan1 when NAT-PMP is enabled; the config path is then
    `lab.gateway_config`, the log `lab.gateway_log()`. The lab's teardown stops the daemon.
    """

    def start(
        policy: str | Path = LAB_POLICY,
        *,
        extra_args: tuple[str, ...] = (),
        wait: bool = True,
        **sections: dict[str, Any],
    ) -> subprocess.Popen[bytes]:
        config = lab.write_gateway_config(REPO / policy, **sections)
        proc = lab.start_gateway(config, extra_args)
        if wait and sections.get("natpmp", {}).get("enabled", True):
            wait_for_gateway(lab)
        return proc

    return start
