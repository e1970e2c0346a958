"""The core stays pure: no sockets, clocks or event loops, and no reach into the server or the
client (STYLE.md; docs/design.md "The core"). The core is every module under igd/ outside
igd/server/ and igd/client/: the model, table, ports, decision, gateway, policy and codecs."""

import ast
from pathlib import Path

import pytest

import igd

PACKAGE = Path(igd.__file__).parent
CORE = sorted([*PACKAGE.glob("*.py"), *PACKAGE.glob("policy/*.py"), *PACKAGE.glob("proto/*.py")])
FORBIDDEN = {"asyncio", "socket", "aiohttp", "time", "select", "selectors", "threading"}
ADAPTERS = ("igd.server.", "igd.client.")


def imports(path: Path) -> set[str]:
    """Every module the file imports, by full dotted name (`from igd import server` too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_core_is_every_module_outside_server_and_client() -> None:
    relative = {str(path.relative_to(PACKAGE)) for path in CORE}
    for module in ("model.py", "table.py", "ports.py", "decision.py", "gateway.py"):
        assert module in relative
    assert {"policy/engine.py", "policy/file.py", "policy/locate.py"} <= relative
    assert {"proto/natpmp.py", "proto/pcp.py", "proto/soap.py"} <= relative
    assert not any(name.startswith(("server/", "client/")) for name in relative)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_module_imports_no_io_and_no_adapter(path: Path) -> None:
    imported = imports(path)
    io = {name for name in imported if name.split(".")[0] in FORBIDDEN}
    adapters = {name for name in imported if f"{name}.".startswith(ADAPTERS)}
    assert not io, f"{path.name} imports {sorted(io)}"
    assert not adapters, f"{path.name} imports {sorted(adapters)}"
