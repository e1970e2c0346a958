"""`igd-server status | delete | flush | reload`: the admin's commands to the running daemon
over its control socket (igd/server/control.py, commands in igd/server/commands.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from ipaddress import AddressValueError, IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from igd.server.config import Config, ConfigError
from igd.server.control import NotRunning, Refused, ask

# Exit status: 0 done, 1 the daemon refused (its message on stderr), 2 bad configuration
# file, 3 no daemon running.
REFUSED, BAD_CONFIG, NOT_RUNNING = 1, 2, 3
# A flush or a reload of a large table commits many removals before it answers.
LONG_TIMEOUT = 120.0


def add_control_options(parser: argparse.ArgumentParser) -> None:
    """--config, --socket and --json, as every control command takes them."""
    parser.add_argument("--config", default=argparse.SUPPRESS)
    parser.add_argument("--socket", type=Path, help="control socket (default: from config)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_admin_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status`, `delete`, `delete-pinhole`, `flush` and `reload`."""
    status = subparsers.add_parser("status", help="the running daemon's state")
    add_control_options(status)
    status.set_defaults(handler=run_command("status", _no_args, format_status))

    delete = subparsers.add_parser(
        "delete",
        help="remove one mapping, whoever holds it",
        description="Remove the mapping of PROTO EXTERNAL_PORT (from REMOTE_HOST, for a"
        " mapping limited to one remote host) from the kernel and the lease store.",
    )
    delete.add_argument("protocol", type=str.lower, choices=("tcp", "udp"), metavar="PROTO")
    delete.add_argument("external_port", type=_port, metavar="EXTERNAL_PORT")
    delete.add_argument("--remote-host", type=_address, metavar="IP")
    delete.add_argument(
        "--external-address",
        type=_address,
        metavar="IP",
        help="the mapping's external address, when not the default (network.external_addresses)",
    )
    add_control_options(delete)
    delete.set_defaults(handler=run_command("delete", _delete_args, format_deleted))

    delete_pinhole = subparsers.add_parser(
        "delete-pinhole",
        help="close the IPv6 pinholes to one LAN endpoint, whoever holds them",
        description="Close every pinhole to PROTO [ADDRESS]:PORT (whatever remote host it"
        " admits) in the kernel and the lease store.",
    )
    delete_pinhole.add_argument("protocol", type=str.lower, choices=("tcp", "udp"), metavar="PROTO")
    delete_pinhole.add_argument("internal_address", type=_address6, metavar="ADDRESS")
    delete_pinhole.add_argument("internal_port", type=_port, metavar="PORT")
    add_control_options(delete_pinhole)
    delete_pinhole.set_defaults(
        handler=run_command("delete-pinhole", _delete_pinhole_args, format_pinholes_deleted)
    )

    flush = subparsers.add_parser(
        "flush",
        help="remove every mapping (of one client, of one mechanism)",
        description="Remove every mapping, or only those of one client and/or one mechanism.",
    )
    flush.add_argument("--client", type=_address, metavar="IP")
    flush.add_argument(
        "--mechanism", type=str.lower, choices=("natpmp", "pcp", "upnp"), metavar="M"
    )
    add_control_options(flush)
    flush.set_defaults(handler=run_command("flush", _flush_args, format_flushed))

    reload = subparsers.add_parser(
        "reload",
        help="load the policy file again (like SIGHUP), showing every error",
        description="Reopen the audit log and load the policy file again, as SIGHUP does;"
        " an invalid policy file is reported with its lines, the current policy stays, and"
        " the exit status is 1.",
    )
    add_control_options(reload)
    reload.set_defaults(handler=run_command("reload", _no_args, format_reloaded))


def run_command(
    command: str,
    arguments: Callable[[argparse.Namespace], dict[str, Any]],
    human: Callable[[Any], str],
) -> Callable[[argparse.Namespace], int]:
    """A handler sending `command` to the daemon and printing its answer."""

    def handle(args: argparse.Namespace) -> int:
        return send(args, command, arguments(args), human)

    return handle


def control_socket(args: argparse.Namespace, command: str) -> Path | None:
    """--socket, else the configuration's control socket; None (the error said on stderr)
    if the configuration does not load."""
    given: Path | None = args.socket
    if given is not None:
        return given
    try:
        return Config.load(args.config).control_socket
    except ConfigError as error:
        print(f"igd-server {command}: {error}", file=sys.stderr)
        return None


def send(
    args: argparse.Namespace, command: str, arguments: dict[str, Any], human: Callable[[Any], str]
) -> int:
    """Ask the daemon; print the result (as JSON with --json) or the refusal on stderr."""
    path = control_socket(args, command)
    if path is None:
        return BAD_CONFIG
    timeout = LONG_TIMEOUT if command in ("flush", "reload") else 5.0
    try:
        result = ask(path, command, arguments, timeout=timeout)
    except NotRunning as error:
        print(f"igd-server {command}: {error}", file=sys.stderr)
        return NOT_RUNNING
    except Refused as error:
        if args.json:
            print(json.dumps({"error": str(error)}, indent=2))
        print(f"igd-server {command}: {error}", file=sys.stderr)
        return REFUSED
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """`igd-server status` for people."""
    mechanisms = ", ".join(f"{k} {v}" for k, v in status["by_mechanism"].items())
    rows = [
        ("version", status["version"]),
        ("uptime", _duration(status["uptime"])),
        ("external address", status["external_address"] or "none"),
        *(
            [("further addresses", ", ".join(status["external_addresses"]))]
            if status.get("external_addresses")
            else []
        ),
        ("epoch", str(status["epoch"])),
        ("mappings", f"{status['mappings']}" + (f" ({mechanisms})" if mechanisms else "")),
        *([("pinholes", str(status["pinholes"]))] if status.get("pinholes") is not None else []),
        ("policy", f"{status['policy']} ({status['rules']} rules)"),
        ("policy sha256", status["policy_sha256"]),
        ("policy loaded", status["policy_loaded"]),
        ("audit log", status["audit_file"] or "off"),
    ]
    upstream = status.get("upstream")
    if upstream:
        rows.append(("upstream", _chain(upstream)))
        if upstream["last_error"]:
            rows.append(("upstream error", upstream["last_error"]))
    return "\n".join(f"{name + ':':18}{value}" for name, value in rows)


def _chain(up: dict[str, Any]) -> str:
    """Double NAT in one line: local -> public address, mechanism, verdict, mirror counts."""
    if not up["active"]:
        return f"{up['mode']}, {up['verdict']}: not mirroring"
    line = (
        f"{up['local_external_address']} -> {up['public_address'] or '?'} via"
        f" {up['mechanism'] or '?'} (gateway {up['upstream_gateway']}), {up['verdict']};"
        f" {up['mirrored']} mirrored, {up['failing']} failing"
    )
    if up.get("full"):
        line += f", full ({up['max_mappings']})"
    return line if up["reachable"] else line + "; the upstream does not answer"


def format_deleted(mapping: dict[str, Any]) -> str:
    return f"deleted {_describe(mapping)}"


def format_pinholes_deleted(result: dict[str, Any]) -> str:
    removed = result["removed"]
    lines = [f"closed {len(removed)} pinhole{'' if len(removed) == 1 else 's'}"]
    lines += [
        f"  {p['protocol']} [{p['internal_address']}]:{p['internal_port']}"
        f" ({p['mechanism']}, client {p['client']})"
        for p in removed
    ]
    return "\n".join(lines)


def format_flushed(result: dict[str, Any]) -> str:
    removed = result["removed"]
    lines = [f"removed {len(removed)} mapping{'' if len(removed) == 1 else 's'}"]
    lines += [f"  {_describe(m)}" for m in removed]
    return "\n".join(lines)


def format_reloaded(result: dict[str, Any]) -> str:
    removed = result["removed"]
    lines = [
        f"policy reloaded from {result['policy']}: {result['rules']} rules;"
        f" {len(removed)} mappings it no longer allows removed"
    ]
    lines += [f"  {_describe(m)}" for m in removed]
    return "\n".join(lines)


def _describe(m: dict[str, Any]) -> str:
    remote = f" from {m['remote_host']}" if m["remote_host"] else ""
    return (
        f"{m['protocol']} {m['external_port']}{remote} -> {m['internal_address']}:"
        f"{m['internal_port']} ({m['mechanism']}, client {m['client']})"
    )


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def _no_args(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def _delete_args(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"protocol": args.protocol, "external_port": args.external_port}
    if args.remote_host is not None:
        request["remote_host"] = str(args.remote_host)
    if args.external_address is not None:
        request["external_address"] = str(args.external_address)
    return request


def _delete_pinhole_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "protocol": args.protocol,
        "internal_address": str(args.internal_address),
        "internal_port": args.internal_port,
    }


def _flush_args(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {}
    if args.client is not None:
        request["client"] = str(args.client)
    if args.mechanism is not None:
        request["mechanism"] = args.mechanism
    return request


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"want a port 1-65535, not {text!r}")
    return port


def _address6(text: str) -> IPv6Address:
    try:
        return IPv6Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv6 address: {text!r}") from None


def _address(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None
