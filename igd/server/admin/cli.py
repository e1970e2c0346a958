"""`igd-server admin hash-password`: the [admin] password_hash line for the configuration."""

from __future__ import annotations

import argparse
import getpass
import sys

from igd.server.admin.auth import hash_password

MIN_PASSWORD = 8  # characters; the scrypt hash and the login rate limit do the rest


def add_console_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `admin` command and its `hash-password` subcommand."""
    admin = subparsers.add_parser("admin", help="the admin web console's settings")
    commands = admin.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    hashing = commands.add_parser(
        "hash-password",
        help="print a password_hash for the [admin] section",
        description="Read a password (asked twice on a terminal, else one line of standard"
        " input) and print its scrypt hash as the [admin] password_hash setting.",
    )
    hashing.set_defaults(handler=run_hash_password)


def run_hash_password(args: argparse.Namespace) -> int:
    """Print `password_hash = "scrypt$..."`; 1 if the password is too short or mistyped."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("igd-server admin hash-password: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        print(
            f"igd-server admin hash-password: use at least {MIN_PASSWORD} characters",
            file=sys.stderr,
        )
        return 1
    print(f'password_hash = "{hash_password(password)}"')
    return 0
