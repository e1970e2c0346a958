"""Running the client in a lab host, shared by the client's lab tests against igd-server and
against miniupnpd: the `igd` command, and a PortMapper that watches its own renewals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lab import Lab

IGD = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "igd")


def state_file(lab: Lab) -> str:
    """The lab's own `igd` state file (the user's real one is never touched by tests)."""
    return str(lab.workdir / "igd-state.json")


def igd(lab: Lab, *args: str, stdin: str | None = None, host: str = "lan1") -> tuple[int, Any]:
    """`igd --json ARGS` on `host`: its exit code and its last JSON line (or its stderr)."""
    argv = [IGD, "--json", "--state-file", state_file(lab), *args]
    proc = lab.run(host, argv, check=False, timeout=60, input=stdin)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("{", "["))]
    return proc.returncode, json.loads(lines[-1]) if lines else proc.stderr


_RENEW = """
import asyncio, json
from igd.client import EventKind, PortMapper
async def main():
    async with PortMapper() as pm:
        m = await pm.map(9000, "udp", lifetime=2, via="{via}")
        kinds = []
        async with asyncio.timeout({seconds}):
            async for event in m.events():
                kinds.append(event.kind.value)
                if kinds.count("renewed") >= 4:
                    break
        print(json.dumps({{"kinds": kinds, "lifetime": m.lifetime, "port": m.external_port}}))
asyncio.run(main())
"""


def renew_script(via: str, seconds: float) -> str:
    """Client code mapping UDP 9000 for 2 s over `via` and printing the events it sees until
    four renewals (or `seconds` pass)."""
    return _RENEW.format(via=via, seconds=seconds)
