"""Session-wide test setup: lab tests fail loudly, never skip, when the lab cannot run."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# `./dev.sh fuzz` (pytest -m fuzz --hypothesis-profile=fuzz): the same properties over network
# input as every test run, with many more examples each (IGD_FUZZ_EXAMPLES, default 10000).
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("IGD_FUZZ_EXAMPLES", "10000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LAB_TESTS = Path(__file__).parent / "lab"
_LAB_PROBLEM = pytest.StashKey[str | None]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/lab as `lab`, and check once whether the lab can run."""
    for item in items:
        if LAB_TESTS in item.path.parents:
            item.add_marker(pytest.mark.lab)
    if any(item.get_closest_marker("lab") for item in items):
        config.stash[_LAB_PROBLEM] = _lab_problem()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail (not skip) a lab test when the machine cannot build the lab."""
    problem = item.config.stash.get(_LAB_PROBLEM, None)
    if problem and item.get_closest_marker("lab"):
        pytest.fail(
            f"lab tests need root and network namespaces: run ./dev.sh test as root ({problem})",
            pytrace=False,
        )


def _lab_problem() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "`ip` not found: install iproute2"
    probe = f"igdlabprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None
