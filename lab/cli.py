"""`./dev.sh lab`: build, enter and remove the namespace lab, or run the demo in it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lab import LAB_PREFIX, Lab, LabError, cleanup_stale, list_netns
from lab.demo import DemoError, default_policy, run_demo
from lab.miniupnpd import PUBLIC_LOOKING_WAN
from lab.netns import check_name, netns_exec


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m lab` (`./dev.sh lab`)."""
    parser = argparse.ArgumentParser(prog="./dev.sh lab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="build a lab and leave it running")
    _prefix_option(up)
    up.add_argument("--wan-hosts", type=int, default=2)
    up.add_argument("--lan-hosts", type=int, default=2)
    # miniupnpc's upnpc gives up on a gateway whose WAN address is private or reserved
    # (documentation ranges too): the interactive lab's WAN looks public, so `upnpc -s`
    # works out of the box. It exists only inside the lab's namespaces.
    up.add_argument("--wan-network", default=PUBLIC_LOOKING_WAN)
    up.add_argument("--lan-network", default="192.168.77.0/24")
    up.add_argument("--external-interface", default="wan0")

    down = commands.add_parser("down", help="remove a lab (and what a crashed run left)")
    _prefix_option(down)
    down.add_argument(
        "--all",
        action="store_true",
        help=f"remove every {LAB_PREFIX}* namespace, including labs of test runs in progress",
    )

    exec_ = commands.add_parser("exec", help="run a command in a lab host: exec lan1 -- CMD...")
    _prefix_option(exec_)
    exec_.add_argument("host", help="gw, wan1, wan2, ..., lan1, lan2, ...")
    exec_.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")

    demo = commands.add_parser("demo", help="map a LAN service through the daemon, then unmap")
    demo.add_argument("--policy", help="policy file (default: policies/lab.toml)")

    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.exit(2, "lab: network namespaces need root: run it as root\n")
    try:
        if args.command == "up":
            return _up(args)
        if args.command == "down":
            return _down(args)
        if args.command == "exec":
            return _exec(args)
        return run_demo(Path(args.policy).resolve() if args.policy else None)
    except (LabError, DemoError, ValueError) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130


def _prefix_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix",
        default=LAB_PREFIX,
        type=check_name,
        help=f"lab name: namespaces are PREFIX-gw, PREFIX-lan1, ... (default {LAB_PREFIX})",
    )


def _up(args: argparse.Namespace) -> int:
    lab = Lab(
        args.prefix,
        wan_hosts=args.wan_hosts,
        lan_hosts=args.lan_hosts,
        wan_network=args.wan_network,
        lan_network=args.lan_network,
        external_interface=args.external_interface,
    ).build()
    try:
        config = lab.write_gateway_config(default_policy(), upnp={"enabled": True})
    except DemoError:
        config = None
    lab.detach()
    print(lab.describe())
    opt = f" --prefix {lab.prefix}" if lab.prefix != LAB_PREFIX else ""
    print()
    print("Enter a host:        ./dev.sh lab exec" + opt + " lan1 -- bash")
    print(f"                 or  ip netns exec {lab.lan[0].ns} bash")
    if config is not None:
        server = os.path.join(os.path.dirname(sys.executable), "igd-server")
        print(f"Start the gateway:   ./dev.sh lab exec{opt} gw -- {server} --config {config}")
        print(f"Ask for a mapping:   ./dev.sh lab exec{opt} lan1 -- natpmpc -g "
              f"{lab.gateway.address} -a 8080 8080 tcp 3600")  # fmt: skip
        print(f"      or over UPnP:  ./dev.sh lab exec{opt} lan1 -- upnpc -m eth0 -a "
              f"{lab.lan[0].address} 8080 8080 tcp")  # fmt: skip
    print(f"Remove it all:       ./dev.sh lab down{opt}")
    return 0


def _down(args: argparse.Namespace) -> int:
    prefix = LAB_PREFIX if args.all else f"{args.prefix}-"
    removed = cleanup_stale(prefix)
    for name in removed:
        print(f"removed {name}")
    if not removed:
        print(f"nothing to remove ({prefix}*)")
    return 0


def _exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise LabError("no command given: ./dev.sh lab exec HOST -- CMD...")
    ns = f"{args.prefix}-{args.host}"
    if ns not in list_netns():
        raise LabError(f"no namespace {ns}: start a lab with `./dev.sh lab up` first")
    argv = netns_exec(ns, cmd)
    os.execvp(argv[0], argv)  # noqa: S606 - replaces this process, as intended
