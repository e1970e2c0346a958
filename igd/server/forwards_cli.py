"""`igd-server forwards export`: the documented mapping table of the admin's forwards.

Without `--all` it reads the policy file alone (no daemon needed); with `--all` it adds the
dynamic mappings the running daemon holds, read over its control socket.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from igd.policy import Policy, PolicyFileError
from igd.policy.file import Forward
from igd.server.config import Config, ConfigError
from igd.server.control import NotRunning, ask

COLUMNS = (
    "name",
    "kind",
    "protocol",
    "public_address",
    "public_port",
    "internal_address",
    "internal_port",
    "allowed_sources",
    "purpose",
    "owner",
    "until",
)


def add_forwards_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add the `forwards` command and its `export` subcommand."""
    forwards = subparsers.add_parser(
        "forwards", help="export the admin's forwards", description=__doc__
    )
    commands = forwards.add_subparsers(dest="forwards_command", metavar="COMMAND", required=True)
    export = commands.add_parser(
        "export", help="print the mapping table", description="Print the mapping table."
    )
    export.add_argument("--config", default=argparse.SUPPRESS)
    export.add_argument("--policy", type=Path, help="policy file (default: from the config)")
    export.add_argument("--socket", type=Path, help="control socket (default: from the config)")
    export.add_argument(
        "--format", choices=("csv", "json", "markdown"), default="markdown", help="output format"
    )
    export.add_argument(
        "--all", action="store_true", help="add the running daemon's dynamic mappings"
    )
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Print the forwards (and with --all the dynamic mappings); exit 2 on a bad file,
    3 when --all finds no daemon."""
    config: Config | None = None
    if args.policy is None or (args.all and args.socket is None):
        try:
            config = Config.load(args.config)
        except ConfigError as error:
            print(f"igd-server forwards: {error}", file=sys.stderr)
            return 2
    policy_path: Path = args.policy or (config.policy_file if config else Path())
    try:
        policy = Policy.load(policy_path)
    except PolicyFileError as error:
        print(error, file=sys.stderr)
        return 2
    public = str(config.external_address) if config and config.external_address else ""
    dynamic: list[dict[str, Any]] = []
    if args.all:
        socket_path: Path = args.socket or (config.control_socket if config else Path())
        try:
            mappings = ask(socket_path, "list")
            status = ask(socket_path, "status")
        except NotRunning as error:
            print(f"igd-server forwards: {error}", file=sys.stderr)
            return 3
        public = status.get("external_address") or public
        dynamic = dynamic_rows(mappings, public, wall=time.time())
    # A forward on one of network.external_addresses names its own; the others the default.
    rows = forward_rows(policy.forwards, public) + dynamic
    print(render(rows, args.format))
    return 0


def forward_rows(forwards: Iterable[Forward], public: str) -> list[dict[str, Any]]:
    """One row per forward and protocol, as declared."""
    rows = []
    for forward in forwards:
        for protocol in sorted(forward.protocols):
            count = forward.last_port - forward.first_port
            rows.append(
                {
                    "name": forward.name,
                    "kind": "static",
                    "protocol": str(protocol),
                    "public_address": str(forward.external_address or public),
                    "public_port": _span(forward.first_port, count),
                    "internal_address": str(forward.internal_address),
                    "internal_port": _span(forward.internal_port, count),
                    "allowed_sources": [str(n) for n in forward.remote_hosts or ()] or ["any"],
                    "purpose": forward.purpose,
                    "owner": forward.owner,
                    "until": _instant(forward.until) if forward.until is not None else "",
                }
            )
    return rows


def dynamic_rows(
    mappings: list[dict[str, Any]], public: str, *, wall: float
) -> list[dict[str, Any]]:
    """The running daemon's mappings other than forwards (from `igd-server list --json`)."""
    rows = []
    for m in mappings:
        if m["mechanism"] == "static":
            continue
        sources = [m["remote_host"]] if m["remote_host"] else m.get("remote_sources") or ["any"]
        rows.append(
            {
                "name": m["description"],
                "kind": m["mechanism"],
                "protocol": m["protocol"],
                "public_address": m.get("external_address") or public,
                "public_port": str(m["external_port"]),
                "internal_address": m["internal_address"],
                "internal_port": str(m["internal_port"]),
                "allowed_sources": sources,
                "purpose": "",
                "owner": f"client {m['client']}",
                "until": _instant(wall + m["lease_remaining"]),
            }
        )
    return rows


def render(rows: list[dict[str, Any]], form: str) -> str:
    """The rows as CSV, JSON or a Markdown table."""
    if form == "json":
        return json.dumps(rows, indent=2)
    flat = [[_cell(row[c]) for c in COLUMNS] for row in rows]
    if form == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(flat)
        return out.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in flat]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value)


def _span(first: int, count: int) -> str:
    return str(first) if not count else f"{first}-{first + count}"


def _instant(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
