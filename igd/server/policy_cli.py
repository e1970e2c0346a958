"""`igd-server policy check|explain`: validate a policy file, or show how it decides a request.

`add_policy_commands` adds the commands to a parser; each subcommand stores its handler as
`args.handler`, which takes the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from igd.decision import Allow, Decision
from igd.model import REQUESTED, MapRequest, Mechanism, Protocol
from igd.pinhole import PinholeAllow, PinholeDeny, PinholeKey, PinholeOwner, PinholeRequest
from igd.policy import DEFAULTS_NAME, EMPTY_VIEW, Policy, PolicyFileError

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2

DEFAULT_LIFETIME = 7200
"""Lease asked for when --lifetime is absent: RFC 6886 §3.3's recommended lifetime."""


def add_policy_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `policy` command and its `check` and `explain` subcommands."""
    policy = subparsers.add_parser(
        "policy",
        help="check a policy file or explain its decisions",
        description="Check policy files for mistakes, or show which rule decides a request and"
        " why. The policy file says which LAN clients may map which ports; reference:"
        " docs/policy.md.",
    )
    commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check", help="validate policy files", description="Validate policy files."
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="policy file (TOML)")
    check.set_defaults(handler=run_check)

    explain = commands.add_parser(
        "explain",
        help="show how a policy decides one request",
        description="Show how a policy decides one request, as if the gateway held no mappings."
        " An IPv6 client asks for a pinhole (its external port is its internal port).",
    )
    explain.add_argument("--policy", required=True, metavar="FILE", help="policy file (TOML)")
    explain.add_argument(
        "--client", required=True, type=_address, metavar="ADDRESS", help="requesting address"
    )
    explain.add_argument("--protocol", required=True, type=_lower, choices=list(Protocol))
    explain.add_argument("--via", required=True, type=_lower, choices=list(REQUESTED))
    explain.add_argument("--internal-port", required=True, type=_port(1), metavar="PORT")
    explain.add_argument(
        "--external-port",
        type=_port(0),
        default=0,
        metavar="PORT",
        help="suggested external port; 0 (the default) lets the gateway choose",
    )
    explain.add_argument(
        "--internal-address",
        type=_address,
        metavar="ADDRESS",
        help="address the mapping or pinhole points at (default: the client; another is"
        " third party)",
    )
    explain.add_argument(
        "--lifetime",
        type=_positive,
        default=DEFAULT_LIFETIME,
        metavar="SECONDS",
        help=f"requested lease (default {DEFAULT_LIFETIME})",
    )
    explain.add_argument("--description", default="", help="mapping description")
    explain.add_argument(
        "--exact",
        action="store_true",
        help="the external port must be honoured or refused (UPnP AddPortMapping)",
    )
    explain.add_argument(
        "--renewal", action="store_true", help="evaluate as a renewal (no quotas, port fixed)"
    )
    explain.add_argument("--json", action="store_true", help="print the decision as JSON")
    explain.set_defaults(handler=run_explain)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `igd-server policy ...` on its own (for tests and scripts); return the exit status."""
    parser = argparse.ArgumentParser(prog="igd-server")
    add_policy_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    status: int = args.handler(args)
    return status


def run_check(args: argparse.Namespace) -> int:
    """Load each file; print OK lines to stdout and every issue to stderr."""
    status = 0
    for path in args.files:
        try:
            policy = Policy.load(path)
        except PolicyFileError as error:
            for issue in error.issues:
                print(issue, file=sys.stderr)
            status = 1
            continue
        for warning in policy.warnings(wall=time.time()):
            print(warning, file=sys.stderr)
        count = len(policy.rules)
        forwards = len(policy.forwards)
        also = f", {forwards} forward{'' if forwards == 1 else 's'}" if forwards else ""
        print(f"{path}: OK ({count} rule{'' if count == 1 else 's'}{also})")
    return status


def run_explain(args: argparse.Namespace) -> int:
    """Evaluate one request against an empty table and print why it is allowed or denied."""
    if isinstance(args.client, IPv6Address):
        return _explain_pinhole(args)
    if args.internal_address is not None and not isinstance(args.internal_address, IPv4Address):
        return _usage("an IPv4 client's mapping points at an IPv4 --internal-address")
    if (args.exact or args.renewal) and not args.external_port:
        print(
            "igd-server policy explain: error: --exact and --renewal need --external-port",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        policy = Policy.load(args.policy)
    except PolicyFileError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        return EXIT_USAGE
    request = MapRequest(
        mechanism=Mechanism(args.via),
        client=args.client,
        protocol=Protocol(args.protocol),
        internal_address=args.internal_address or args.client,
        internal_port=args.internal_port,
        external_port=args.external_port,
        lifetime=args.lifetime,
        description=args.description,
        exact_port=args.exact,
    )
    decision = decide(policy, request, renewal=args.renewal)
    if args.json:
        print(json.dumps(explanation(policy, request, decision), indent=2))
    else:
        print(render(policy, request, decision))
    return EXIT_ALLOW if isinstance(decision, Allow) else EXIT_DENY


def _usage(message: str) -> int:
    print(f"igd-server policy explain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _explain_pinhole(args: argparse.Namespace) -> int:
    """`explain` for an IPv6 client: a pinhole request, decided like the gateway would."""
    internal = args.internal_address or args.client
    if not isinstance(internal, IPv6Address):
        return _usage("an IPv6 client's pinhole points at an IPv6 --internal-address")
    if args.external_port or args.exact:
        return _usage("a pinhole's external port is its internal port: drop --external-port")
    mechanism = Mechanism(args.via)
    if mechanism not in (Mechanism.PCP, Mechanism.UPNP):
        return _usage(f"{mechanism} has no IPv6 pinholes; use --via pcp or --via upnp")
    try:
        policy = Policy.load(args.policy)
    except PolicyFileError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        return EXIT_USAGE
    key = PinholeKey(internal, Protocol(args.protocol), args.internal_port)
    request = PinholeRequest(key, PinholeOwner(mechanism, args.client), args.lifetime,
                             args.description)  # fmt: skip
    decision = policy.evaluate_pinhole(request, held=0, total=0, now=0.0, renewal=args.renewal)
    if args.json:
        print(json.dumps(pinhole_explanation(policy, request, decision), indent=2))
    else:
        print(render_pinhole(policy, request, decision))
    return EXIT_ALLOW if isinstance(decision, PinholeAllow) else EXIT_DENY


def pinhole_explanation(
    policy: Policy, request: PinholeRequest, decision: PinholeAllow | PinholeDeny
) -> dict[str, Any]:
    """A pinhole decision as a JSON-ready dict."""
    rule = policy.rule(decision.rule)
    result: dict[str, Any] = {
        "decision": "allow" if isinstance(decision, PinholeAllow) else "deny",
        "kind": "pinhole",
        "rule": decision.rule,
        "rule_line": rule.line if rule else None,
        "policy": policy.source,
    }
    if isinstance(decision, PinholeAllow):
        result |= {
            "lifetime": decision.lifetime,
            "requested_lifetime": request.lifetime,
            "restrictions": list(decision.notes),
            "remote_sources": _sources(decision),
        }
    else:
        reason = decision.refusal.name.lower().replace("_", "-")
        result |= {"reason": reason, "detail": decision.detail}
    return result


def render_pinhole(
    policy: Policy, request: PinholeRequest, decision: PinholeAllow | PinholeDeny
) -> str:
    """A pinhole decision as text for people, in the shape of `render`."""
    key, owner = request.key, request.owner
    headline = (
        f"pinhole {key.protocol} [{key.internal_address}]:{key.internal_port}"
        f" for {owner.client} via {owner.mechanism}"
    )
    lines = [f"{'ALLOW' if isinstance(decision, PinholeAllow) else 'DENY':<6} {headline}"]
    lines.append(f"rule:           {_rule_text(policy, decision.rule)}")
    if isinstance(decision, PinholeAllow):
        lines.append(f"lease:          {decision.lifetime} s (requested {request.lifetime} s)")
        lines.append(f"external port:  {key.internal_port} (a pinhole translates nothing)")
        sources = _sources(decision)
        if sources is not None:
            lines.append(f"remote sources: {', '.join(sources)}")
        for index, note in enumerate(decision.notes or ("none",)):
            lines.append(f"{'restrictions:' if index == 0 else '':<15} {note}")
    else:
        lines.append(f"reason:         {decision.refusal.name.lower().replace('_', '-')}")
        lines.append(f"detail:         {decision.detail}")
    return "\n".join(lines)


def _rule_text(policy: Policy, name: str) -> str:
    rule = policy.rule(name)
    if rule is not None:
        where = f"{policy.source}:{rule.line}" if rule.line else policy.source
        return f"{rule.name} ({where})"
    if name == DEFAULTS_NAME:
        return f"{DEFAULTS_NAME} ({policy.source} [defaults])"
    return name


def decide(policy: Policy, request: MapRequest, *, renewal: bool = False) -> Decision:
    """How the policy decides one request as if the gateway held no mappings (also the admin
    console's explain form)."""
    return policy.evaluate(request, EMPTY_VIEW, now=0.0, renewal=renewal)


def explanation(policy: Policy, request: MapRequest, decision: Decision) -> dict[str, Any]:
    """The decision as a JSON-ready dict."""
    rule = policy.rule(decision.rule)
    result: dict[str, Any] = {
        "decision": "allow" if isinstance(decision, Allow) else "deny",
        "rule": decision.rule,
        "rule_line": rule.line if rule else None,
        "policy": policy.source,
    }
    if isinstance(decision, Allow):
        result |= {
            "lifetime": decision.lifetime,
            "requested_lifetime": request.lifetime,
            "external_ports": str(decision.external_ports),
            "suggested_port": request.external_port or None,
            "suggested_port_honoured": _honoured(request, decision),
            "restrictions": list(decision.restrictions),
            "remote_sources": _sources(decision),
            # The addresses a PCP request may get, the first by default (None: the default).
            "external_addresses": [
                str(a) if a else "default" for a in policy.addresses_for(request)[1]
            ],
        }
    else:
        result |= {"reason": str(decision.reason), "detail": decision.detail}
    return result


def render(policy: Policy, request: MapRequest, decision: Decision) -> str:
    """The decision as text for people: a headline, then one labelled line per fact."""
    target = f"{request.internal_address}:{request.internal_port}"
    headline = f"{request.protocol} {target} for {request.client} via {request.mechanism}"
    if request.external_port:
        kind = "exact" if request.exact_port else "suggested"
        headline += f", external port {request.external_port} ({kind})"
    verdict = "ALLOW" if isinstance(decision, Allow) else "DENY"
    lines = [f"{verdict:<6} {headline}"]
    if policy.rule(decision.rule) is not None or decision.rule == DEFAULTS_NAME:
        lines.append(f"rule:           {_rule_text(policy, decision.rule)}")
    if isinstance(decision, Allow):
        lines.append(f"lease:          {decision.lifetime} s (requested {request.lifetime} s)")
        lines.append(f"external ports: {decision.external_ports}")
        lines.append(f"suggested port: {_suggestion(request, decision)}")
        sources = _sources(decision)
        if sources is not None:
            lines.append(f"remote sources: {', '.join(sources)}")
        if policy.addressed:
            addresses = [str(a) if a else "default" for a in policy.addresses_for(request)[1]]
            lines.append(f"external addr.: {', '.join(addresses)} (the first unless PCP asks)")
        for index, note in enumerate(decision.restrictions or ("none",)):
            lines.append(f"{'restrictions:' if index == 0 else '':<15} {note}")
    else:
        lines.append(f"reason:         {decision.reason}")
        lines.append(f"detail:         {decision.detail}")
    return "\n".join(lines)


def _sources(decision: Allow | PinholeAllow) -> list[str] | None:
    """The sources a rule's remote_hosts let the mapping admit; None: any the request asks."""
    if decision.filters is None:
        return None
    return [str(f.network) + (f" port {f.port}" if f.port else "") for f in decision.filters] or [
        "the remote host asked for"
    ]


def _honoured(request: MapRequest, decision: Allow) -> bool | None:
    if not request.external_port:
        return None
    return request.external_port in decision.external_ports


def _suggestion(request: MapRequest, decision: Allow) -> str:
    if not request.external_port:
        return "none; the gateway picks a free port from the allowed ports"
    if request.exact_port:
        return f"{request.external_port} (exact): used if free, else the request fails"
    if request.external_port in decision.external_ports:
        return f"{request.external_port} is honoured if it is free"
    return f"{request.external_port} is not allowed; the gateway picks another allowed port"


def _address(text: str) -> IPv4Address | IPv6Address:
    try:
        return ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _lower(text: str) -> str:
    return text.lower()


def _port(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
        if not minimum <= port <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} is outside {minimum}-65535")
        return port

    return convert


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 1:
        raise argparse.ArgumentTypeError("the lifetime must be at least 1 second")
    return value
