"""The igd-server command: run the daemon, list its mappings, check configuration and policy
files, explain policy decisions."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import igd
from igd.policy import Policy, PolicyFileError
from igd.server.admin.cli import add_console_commands
from igd.server.admin_cli import add_admin_commands, control_socket
from igd.server.config import Config, ConfigError
from igd.server.control import NotRunning, Refused, ask
from igd.server.examples import detect, lan_hint, render_unit, write_examples
from igd.server.forwards_cli import add_forwards_commands
from igd.server.instance import StartError, acquire, interface_problems
from igd.server.interfaces import further_address_problems
from igd.server.policy_cli import add_policy_commands
from igd.server.systemd import LEVELS, notify, setup_logging

DEFAULT_CONFIG = "/etc/igd/config.toml"


DESCRIPTION = """\
Port-mapping gateway for a Linux router: LAN devices ask for inbound ports over NAT-PMP, PCP
or UPnP IGD; an admin policy file decides; granted mappings go into an nftables table of the
daemon's own and a lease store that survives restarts. Without a command, `run` is assumed.
"""

EPILOG = """\
first steps:
  igd-server init /etc/igd                 write commented config.toml and policy.toml
  igd-server config check /etc/igd/config.toml
  igd-server unit > /etc/systemd/system/igd-server.service
  systemctl enable --now igd-server        (reload the policy: systemctl reload igd-server)
  igd-server list                          the running daemon's mappings
exit status: 0 stopped cleanly, 2 refused to start (the message says why), 3 not running (list)
"""

INTERFACE_POLL = 1.0  # seconds between looks at missing interfaces (wait_for_interfaces)
INTERFACE_REPORT = 5.0  # seconds between "still waiting" lines


def _run_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--config, --dry-run and -v, on the top level and again on `run`."""
    # On `run` an absent option leaves the top-level value: `igd-server --dry-run run` works.
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--config",
        default=default(DEFAULT_CONFIG),
        metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=default(False),
        help="try a configuration and policy safely: mappings are granted and listed but kept"
        " in memory only (no nftables table, no lease file); still one instance per host",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="log debug messages (overrides log.level)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `igd-server`."""
    parser = argparse.ArgumentParser(
        prog="igd-server",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {igd.__version__}")
    _run_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the daemon in the foreground (the default)",
        description="Run the daemon in the foreground until SIGTERM or SIGINT; SIGHUP reloads"
        " the policy file. Logs go to standard error, one line each (journald-friendly).",
    )
    _run_options(run, top=False)
    listing = commands.add_parser(
        "list",
        help="show the running daemon's mappings",
        description="Ask the running daemon, over its control socket, for its mappings.",
    )
    listing.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE", help="configuration file"
    )
    listing.add_argument("--socket", type=Path, help="control socket (default: from config)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--pinholes", action="store_true", help="the IPv6 pinholes instead")
    add_admin_commands(commands)
    add_policy_commands(commands)
    add_config_commands(commands)
    init = commands.add_parser(
        "init",
        help="write commented example configuration and policy files",
        description="Write DIR/config.toml (with the interfaces detected on this machine) and"
        " DIR/policy.toml (a home-router policy), both commented. Existing files are kept"
        " as they are.",
    )
    init.add_argument("directory", type=Path, metavar="DIR", help="e.g. /etc/igd")
    init.set_defaults(handler=run_init)
    unit = commands.add_parser(
        "unit",
        help="print the systemd unit for this installation",
        description="Print the igd-server.service systemd unit shipped with the package, its"
        " ExecStart pointing at this igd-server. See docs/install.md.",
    )
    unit.set_defaults(handler=run_unit)
    add_forwards_commands(commands)
    add_console_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args)
    if args.command in (None, "run"):
        return _run(args)
    handler: Any = args.handler
    return int(handler(args))


def _run(args: argparse.Namespace) -> int:
    try:
        config = Config.load(args.config)
    except ConfigError as error:
        print(f"igd-server: refusing to start:\n{error}", file=sys.stderr)
        return 2
    # Log lines are written on the event loop's thread: a background writer thread was
    # measured to cost more (its wake-ups contend for the GIL on every request) than it saves.
    setup_logging(logging.DEBUG if args.verbose else LEVELS[config.log_level])
    return _serve(config, args.dry_run)


def _serve(config: Config, dry_run: bool) -> int:
    from igd.server.daemon import Daemon

    try:
        # The files first: a broken policy is reported whatever else is wrong. Then the lock,
        # before anything else is touched: a second instance must not even wait.
        Policy.load(config.policy_file)
        lock = acquire(config.state_directory)
    except PolicyFileError as error:
        print(f"igd-server: refusing to start:\n{error}", file=sys.stderr)
        return 2
    except StartError as error:
        return _refuse(error)
    try:
        _wait_for_interfaces(config)
        daemon = Daemon(config, dry_run=dry_run, lock=lock)
    except PolicyFileError as error:
        lock.release()
        print(f"igd-server: refusing to start:\n{error}", file=sys.stderr)
        return 2
    except (StartError, ValueError, OSError) as error:
        lock.release()
        return _refuse(error)
    except KeyboardInterrupt:
        lock.release()
        return 130
    try:
        asyncio.run(daemon.run())
    except (StartError, OSError) as error:
        # OSError: a socket taken between the port check and the bind; still one line.
        return _refuse(error)
    return 0


def _refuse(error: BaseException) -> int:
    print(f"igd-server: refusing to start: {error}", file=sys.stderr)
    return 2


def _wait_for_interfaces(config: Config) -> None:
    """Return when every interface is up with an address; raise StartError unless waiting."""
    log = logging.getLogger("igd.daemon")
    need_address = config.external_address is None
    internal = config.internal_interfaces

    def look() -> list[str]:
        found = interface_problems(config.external_interface, internal, need_address=need_address)
        # Only their presence is waited for: whether they are public is checked at start.
        return found + further_address_problems(config.external_addresses, allow_private=True)

    problems = look()
    if problems and not config.wait_for_interfaces:
        raise StartError("; ".join(problems) + " (or set network.wait_for_interfaces = true)")
    last_report = -INTERFACE_REPORT
    while problems:
        now = time.monotonic()
        if now - last_report >= INTERFACE_REPORT:
            last_report = now
            what = "; ".join(problems)
            log.warning("waiting for interfaces (network.wait_for_interfaces): %s", what)
            # Keep a Type=notify start from timing out while we wait on purpose.
            extend = int(3 * INTERFACE_REPORT * 1_000_000)
            notify(f"STATUS=waiting: {what}", f"EXTEND_TIMEOUT_USEC={extend}")
        time.sleep(INTERFACE_POLL)
        problems = look()


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
            issues = policy.address_issues(config.external_addresses)
            if issues:
                raise PolicyFileError(issues)
        except (ConfigError, PolicyFileError) as error:
            for issue in error.issues:
                print(issue, file=sys.stderr)
            status = 1
            continue
        count = len(policy.rules)
        rules = f"{count} rule{'' if count == 1 else 's'}"
        print(f"{path}: OK (policy {config.policy_file}: {rules})")
    return status


def run_init(args: argparse.Namespace) -> int:
    """Write the example files; say which were written and which were kept."""
    found = detect()
    try:
        results = write_examples(args.directory, found)
    except OSError as error:
        print(f"igd-server init: {error}", file=sys.stderr)
        return 1
    print(lan_hint(found))
    for path, written in results:
        print(f"{'wrote' if written else 'kept existing'} {path}")
    config = args.directory.absolute() / "config.toml"
    print(f"next: review both files, then `igd-server config check {config}`")
    return 0


def run_unit(args: argparse.Namespace) -> int:
    """Print the systemd unit for this installation."""
    print(render_unit(), end="")
    return 0


def _list(args: argparse.Namespace) -> int:
    socket_path = control_socket(args, "list")
    if socket_path is None:
        return 2
    try:
        mappings = ask(socket_path, "pinholes" if args.pinholes else "list")
    except NotRunning as error:
        print(f"igd-server list: {error}", file=sys.stderr)
        return 3
    except Refused as error:
        print(f"igd-server list: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(mappings, indent=2))
        return 0
    print(format_pinholes(mappings) if args.pinholes else format_mappings(mappings))
    return 0


def format_pinholes(pinholes: list[dict[str, Any]]) -> str:
    """A table of IPv6 pinholes for people."""
    if not pinholes:
        return "no pinholes"
    rows: list[tuple[str, ...]] = [
        ("PROTO", "INTERNAL", "FROM", "LEASE", "VIA", "CLIENT", "DESCRIPTION")
    ]
    rows += [
        (
            p["protocol"],
            f"[{p['internal_address']}]:{p['internal_port']}",
            ", ".join(p["remote"]) or "any",
            f"{p['lease_remaining']}s",
            p["mechanism"],
            p["client"],
            p["description"],
        )
        for p in pinholes
    ]
    return _table(rows)


def format_mappings(mappings: list[dict[str, Any]]) -> str:
    """A table for people."""
    if not mappings:
        return "no mappings"
    header = (
        "PROTO", "EXTERNAL", "INTERNAL", "LEASE", "PACKETS", "BYTES", "VIA", "CLIENT",
        "DESCRIPTION",
    )  # fmt: skip
    rows = [header]
    for m in mappings:
        external = str(m["external_port"])
        if m.get("external_address"):
            external = f"{m['external_address']}:{external}"
        if m["remote_host"]:
            external += f" from {m['remote_host']}"
        if m.get("remote_sources"):
            external += f" only from {', '.join(m['remote_sources'])}"
        rows.append(
            (
                m["protocol"],
                external,
                f"{m['internal_address']}:{m['internal_port']}",
                "-"
                if m["mechanism"] == "static" and not m["lease_remaining"]
                else f"{m['lease_remaining']}s",
                str(m.get("packets", 0)),
                str(m.get("bytes", 0)),
                m["mechanism"],
                m["client"],
                m["description"],
            )
        )
    return _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
