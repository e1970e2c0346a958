"""The synchronous API as a type checker sees it: an application under `mypy --strict` gets
the same types as from the asyncio API, and a wrong argument is an error, not `Any`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SAMPLE = """
from igd.client import SyncPortMapper

with SyncPortMapper(probe_timeout=1.0, disable=["upnp"]) as pm:
    with pm.map(8080, "tcp", lifetime=600, timeout=5) as m:
        reveal_type(m.external_port)
        reveal_type(m.external_address)
        reveal_type(m.expires_at)
        reveal_type(m.remaining)
        reveal_type(m.renew())
        reveal_type(m.mechanism)
        for event in m.events():
            reveal_type(event.kind)
    reveal_type(pm.probe(timeout=2).choice.verdict)
    reveal_type(pm.external_address())
    reveal_type(pm.unmap(8080, "tcp"))
SyncPortMapper(probe_timeout="fast")
SyncPortMapper().map("8080")
"""


def test_sync_api_is_fully_typed(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(SAMPLE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir",
         str(tmp_path / "cache"), str(sample)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(REPO)},  # the package as an application sees it
    )  # fmt: skip
    lines = [line.split(": ", 2)[1:] for line in result.stdout.splitlines() if ": " in line]
    # mypy prints builtins with or without their module, depending on its version
    notes = [text.replace("builtins.", "") for kind, text in lines if kind == "note"]
    errors = [text for kind, text in lines if kind == "error"]
    assert notes == [
        'Revealed type is "int"',
        'Revealed type is "ipaddress.IPv4Address"',
        'Revealed type is "datetime.datetime | None"',
        'Revealed type is "float | None"',
        'Revealed type is "None"',
        'Revealed type is "igd.model.Mechanism"',
        'Revealed type is "igd.client.mapping.EventKind"',
        'Revealed type is "igd.client.selection.Verdict"',
        'Revealed type is "ipaddress.IPv4Address"',
        'Revealed type is "bool"',
    ], result.stdout
    assert len(errors) == 2, result.stdout
    assert '"probe_timeout"' in errors[0] and '"str"' in errors[0]
    assert '"map"' in errors[1] and '"str"' in errors[1]
