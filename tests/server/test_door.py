"""Service is the only way in: no adapter or admin surface reaches the table or the policy."""

import ast
from pathlib import Path

import pytest

import igd.server

SERVER = Path(igd.server.__file__).parent
# The door itself and what stands behind it; the backends and the store are its effects.
BEHIND_THE_DOOR = {"service.py", "commits.py", "store.py", "feed.py"}
# `igd-server policy check|explain` reads a policy file offline; no gateway is involved.
OFFLINE = {"policy_cli.py"}
ADAPTERS = sorted(
    path
    for path in SERVER.rglob("*.py")
    if "backends" not in path.parts and path.name not in BEHIND_THE_DOOR | OFFLINE
)
# Attributes that are the gateway's insides: the core, its table, its policy decisions.
FORBIDDEN_ATTRIBUTES = {"gateway", "table", "own_mapping", "rollback", "evaluate", "recheck",
                        "listeners", "committer"}  # fmt: skip
FORBIDDEN_MODULES = {"igd.table"}


def reaches_behind(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in FORBIDDEN_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name in FORBIDDEN_MODULES]  # fmt: skip
    return found


def test_the_adapters_are_all_checked() -> None:
    names = {path.relative_to(SERVER).as_posix() for path in ADAPTERS}
    assert {"natpmp.py", "pcp.py", "pxp.py", "daemon.py", "control.py"} <= names
    assert {"upnp/mappings.py", "upnp/actions.py", "upnp/__init__.py"} <= names


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda p: p.relative_to(SERVER).as_posix())
def test_adapter_goes_through_the_service(path: Path) -> None:
    assert reaches_behind(path) == []


def test_the_check_sees_a_reach_behind(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "from igd.table import MappingTable\n"
        "def f(service):\n"
        "    return service.gateway.table.entry(0), service.gateway.policy.evaluate(1, 2)\n"
    )
    assert len(reaches_behind(sneaky)) == 5
