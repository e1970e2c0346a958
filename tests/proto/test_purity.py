"""The codecs stay pure: no sockets, clocks or event loops (STYLE.md)."""

import ast
from pathlib import Path

import pytest

import igd.proto

FORBIDDEN = {"asyncio", "socket", "aiohttp", "time", "select", "selectors"}
MODULES = sorted(Path(igd.proto.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_codec_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path.name} imports {imported & FORBIDDEN}"
