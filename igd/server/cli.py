"""The igd-server command: run the daemon, list its mappings, check configuration and policy
files, explain policy decisions."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import igd
from igd.policy import Policy, PolicyFileError
from igd.server.admin_cli import add_admin_commands
from igd.server.config import Config, ConfigError
from igd.server.control import NotRunning, Refused, ask
from igd.server.policy_cli import add_policy_commands

DEFAULT_CONFIG = "/etc/igd/config.toml"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `igd-server`."""
    parser = argparse.ArgumentParser(
        prog="igd-server",
        description="Port-mapping gateway: NAT-PMP, PCP and UPnP IGD over nftables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {igd.__version__}")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="configuration file")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="keep mappings in memory only: no nftables, no lease file",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the daemon (the default)")
    run.add_argument("--config", default=argparse.SUPPRESS)
    run.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS)
    listing = commands.add_parser("list", help="show the running daemon's mappings")
    listing.add_argument("--config", default=argparse.SUPPRESS)
    listing.add_argument("--socket", type=Path, help="control socket (default: from config)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add_admin_commands(commands)
    add_policy_commands(commands)
    add_config_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args)
    if args.command in (None, "run"):
        return _run(args)
    handler: Any = args.handler
    return int(handler(args))


def _run(args: argparse.Namespace) -> int:
    # Log lines are written on the event loop's thread: a background writer thread was
    # measured to cost more (its wake-ups contend for the GIL on every request) than it saves.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    from igd.server.daemon import Daemon

    try:
        config = Config.load(args.config)
        daemon = Daemon(config, dry_run=args.dry_run)
    except (ConfigError, PolicyFileError) as error:
        print(f"igd-server: refusing to start:\n{error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"igd-server: refusing to start: {error}", file=sys.stderr)
        return 2
    asyncio.run(daemon.run())
    return 0


def add_config_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `config` command and its `check` subcommand."""
    config = subparsers.add_parser("config", help="check configuration files")
    commands = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="validate configuration files and the policy files they name",
        description="Validate configuration files, and the policy file each one names, as the"
        " daemon does at start. Exit status 0 when all are valid, 1 otherwise.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="configuration file (TOML)")
    check.set_defaults(handler=run_config_check)


def run_config_check(args: argparse.Namespace) -> int:
    """Load each file and its policy; print OK lines to stdout and every issue to stderr."""
    status = 0
    for path in args.files:
        try:
            config = Config.load(path)
            policy = Policy.load(config.policy_file)
        except (ConfigError, PolicyFileError) as error:
            for issue in error.issues:
                print(issue, file=sys.stderr)
            status = 1
            continue
        count = len(policy.rules)
        rules = f"{count} rule{'' if count == 1 else 's'}"
        print(f"{path}: OK (policy {config.policy_file}: {rules})")
    return status


def _list(args: argparse.Namespace) -> int:
    socket_path = args.socket
    if socket_path is None:
        try:
            socket_path = Config.load(args.config).control_socket
        except ConfigError as error:
            print(f"igd-server list: {error}", file=sys.stderr)
            return 2
    try:
        mappings = ask(socket_path, "list")
    except NotRunning as error:
        print(f"igd-server list: {error}", file=sys.stderr)
        return 3
    except Refused as error:
        print(f"igd-server list: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(mappings, indent=2))
        return 0
    print(format_mappings(mappings))
    return 0


def format_mappings(mappings: list[dict[str, Any]]) -> str:
    """A table for people."""
    if not mappings:
        return "no mappings"
    header = ("PROTO", "EXTERNAL", "INTERNAL", "LEASE", "VIA", "CLIENT", "DESCRIPTION")
    rows = [header]
    for m in mappings:
        external = str(m["external_port"])
        if m["remote_host"]:
            external += f" from {m['remote_host']}"
        rows.append(
            (
                m["protocol"],
                external,
                f"{m['internal_address']}:{m['internal_port']}",
                f"{m['lease_remaining']}s",
                m["mechanism"],
                m["client"],
                m["description"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
