"""`igd`: probe the gateway, show the external address, map, unmap and list port mappings
(and IPv6 pinholes).

Exit codes: 0 done, 1 other error, 2 usage, 3 no gateway found (or it did not answer),
4 refused by the gateway, 5 the gateway answered something invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import igd
from igd.client.errors import (
    GatewayTimeout,
    MappingRefused,
    NoGatewayError,
    NoSuchMapping,
    PortMappingError,
    ProtocolError,
)
from igd.client.mapper import PortMapper
from igd.client.mapping import Mapping, MappingEvent
from igd.client.natpmp import NatPmpClient
from igd.client.pcp import PcpClient
from igd.client.pinholes import Ipv6Report, Pinhole
from igd.client.probe import ProbeResult
from igd.client.state import StateFile
from igd.model import REQUESTED, Mechanism, Protocol

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_GATEWAY = 3
EXIT_REFUSED = 4
EXIT_PROTOCOL = 5


def _port_spec(text: str) -> tuple[int, Protocol]:
    port, _, proto = text.partition("/")
    try:
        number = int(port)
        protocol = Protocol((proto or "tcp").lower())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want PORT or PORT/tcp or PORT/udp") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"port {number} is not in 1..65535")
    return number, protocol


DEFAULT_TIMEOUT = 10.0
PROBE_SHARE = 0.8  # of --timeout, at most the library's 2 s: the rest is for the request


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # Accepted before and after the subcommand: the subcommand's copies default to
    # SUPPRESS so that they do not overwrite what was given before it.
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--gateway", default=default(None),
        help="gateway address (default: the default route's); the only device used",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument(
        "--timeout", type=float, default=default(DEFAULT_TIMEOUT),
        help=f"seconds the whole command may take ({DEFAULT_TIMEOUT:g})",
    )  # fmt: skip
    parser.add_argument(
        "--gateway6", default=default(None),
        help="IPv6 router asked for pinholes (default: the IPv6 default route's)",
    )  # fmt: skip
    parser.add_argument(
        "--state-file", default=default(None),
        help="where this user's mappings are remembered (default: $XDG_STATE_HOME/igd/)",
    )  # fmt: skip
    parser.add_argument(
        "-v", "--verbose", action="count", default=default(0),
        help="log what happens (-vv: debug trace)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="igd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {igd.__version__}")
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "probe", parents=[common], help="what the gateway speaks, its external address, NAT verdict"
    )
    sub.add_parser("ip", parents=[common], help="the gateway's external address")
    vias = [m.value for m in REQUESTED]
    add = sub.add_parser("map", parents=[common], help="map an external port to a local port")
    add.add_argument("port", type=_port_spec, metavar="PORT[/tcp|/udp]")
    add.add_argument("--external-port", type=int, help="suggested external port")
    add.add_argument("--exact", action="store_true", help="fail rather than take another port")
    add.add_argument("--lifetime", type=int, default=7200, help="lease in seconds (7200)")
    add.add_argument("--via", choices=vias, help="force a mechanism")
    add.add_argument("--description", default="igd", help="label stored on the gateway")
    add.add_argument("--keep", action="store_true", help="renew until interrupted, then release")
    family = add.add_mutually_exclusive_group()
    family.add_argument("--ipv6", action="store_true", help="open an IPv6 pinhole instead")
    family.add_argument("--both", action="store_true", help="an IPv4 mapping and an IPv6 pinhole")
    rm = sub.add_parser("unmap", parents=[common], help="delete a mapping of this host")
    rm.add_argument("port", type=_port_spec, metavar="PORT[/tcp|/udp]")
    rm.add_argument("--via", choices=vias, help="mechanism, if igd did not make the mapping")
    rm.add_argument("--external-port", type=int, help="UPnP: the external port")
    rm.add_argument("--nonce", help="PCP: the mapping nonce, if igd did not make the mapping")
    rm.add_argument("--ipv6", action="store_true", help="the IPv6 pinhole (from the state file)")
    ls = sub.add_parser("list", parents=[common], help="this user's mappings on the gateway")
    ls.add_argument(
        "--router", action="store_true", help="the gateway's whole UPnP mapping list instead"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `igd` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # a request the library cannot make (a pinhole over NAT-PMP)
        print(f"igd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PortMappingError as exc:
        code = _exit_code(exc)
        if args.json:
            print(json.dumps(_error_dict(exc, code)))
        else:
            print(f"igd: {exc}", file=sys.stderr)
            print(f"igd: what to do: {exc.advice.value}", file=sys.stderr)
        return code


def _exit_code(exc: PortMappingError) -> int:
    if isinstance(exc, NoGatewayError):
        return EXIT_NO_GATEWAY
    if isinstance(exc, MappingRefused):
        return EXIT_REFUSED
    if isinstance(exc, ProtocolError):
        return EXIT_PROTOCOL
    return EXIT_ERROR


def _error_dict(exc: PortMappingError, code: int) -> dict[str, Any]:
    return {
        "error": str(exc),
        "type": type(exc).__name__,
        "advice": exc.advice.value,
        "mechanism": exc.mechanism.value if exc.mechanism else None,
        "code": exc.code,
        "retry_after": exc.retry_after,
        "error_lifetime": exc.error_lifetime,
        "exit": code,
    }


async def _run(args: argparse.Namespace) -> int:
    # --timeout bounds the whole command (probe, requests, closing); `map --keep` lifts the
    # bound once the mapping exists.
    scope = asyncio.timeout(args.timeout)
    try:
        async with scope:
            return await _command(args, scope)
    except TimeoutError:
        if not scope.expired():
            raise
    raise GatewayTimeout(f"{args.command}: no result within --timeout {args.timeout:g} s")


async def _command(args: argparse.Namespace, scope: asyncio.Timeout) -> int:
    state = StateFile(args.state_file)
    probe_budget = min(2.0, args.timeout * PROBE_SHARE)
    async with PortMapper(
        args.gateway, probe_timeout=probe_budget, state=state, gateway6=args.gateway6
    ) as mapper:
        if args.command == "probe":
            four, six = await asyncio.gather(
                mapper.probe(), mapper.probe_ipv6(), return_exceptions=True
            )
            if isinstance(six, BaseException):
                raise six
            if isinstance(four, BaseException):
                if not (isinstance(four, PortMappingError) and six.mechanisms):
                    raise four
                # An IPv6-only network: no IPv4 gateway, but pinholes to report.
                text = f"ipv4: {four}\n{_describe_six(six)}"
                _out(args, {"error": str(four), "ipv6": six.to_dict()}, text)
                return EXIT_OK
            text = _describe_probe(four, args.verbose > 0) + "\n" + _describe_six(six)
            _out(args, {**four.to_dict(), "ipv6": six.to_dict()}, text)
            return EXIT_OK if four.choice.mechanism or six.mechanisms else EXIT_NO_GATEWAY
        if args.command == "ip":
            address = await mapper.external_address()
            verdict = mapper.last_probe.choice.verdict.value if mapper.last_probe else None
            _out(args, {"external_address": str(address), "verdict": verdict}, str(address))
            return EXIT_OK
        if args.command == "map":
            return await _map(args, mapper, scope)
        if args.command == "unmap":
            return await _unmap(args, mapper)
        if args.router:
            entries = await mapper.list()
            rows = [_row(entry) for entry in entries]
            text = "\n".join(
                f"{r['protocol']:<4} {r['external_port']:>5} -> {r['internal_client']}:"
                f"{r['internal_port']}  lease {r['lease']}  {r['description']}"
                for r in rows
            )
            _out(args, rows, text or "(no mappings)")
            return EXIT_OK
        now = mapper.wall_clock()
        records = mapper.stored()
        rows = [{**r.to_dict(), "remaining": _rounded(r.remaining(now))} for r in records]
        text = "\n".join(
            f"{r.protocol.value:<4} [{r.internal_address}]:{r.internal_port} pinhole"
            f" via {r.mechanism.value}, {_left(r.remaining(now))}  {r.description}"
            if r.family == 6
            else f"{r.protocol.value:<4} {r.external_address}:{r.external_port} -> "
            f"{r.internal_address}:{r.internal_port} via {r.mechanism.value}, "
            f"{_left(r.remaining(now))}  {r.description}"
            for r in records
        )
        _out(args, rows, text or "(no mappings made by igd on this gateway)")
        return EXIT_OK


def _rounded(value: float | None) -> int | None:
    return None if value is None else round(value)


def _left(remaining: float | None) -> str:
    return "permanent" if remaining is None else f"{remaining:.0f} s left"


def _row(entry: Any) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in entry.__slots__}


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


def _describe_probe(result: ProbeResult, verbose: bool = False) -> str:
    lines = [f"gateway {result.gateway} (this host {result.local_address})"]
    for r in result.reports:
        state = "yes" if r.available else "no "
        bits = []
        if r.external_address is not None:
            bits.append(f"external {r.external_address} ({r.address_kind})")
        if r.epoch is not None:
            bits.append(f"epoch {r.epoch}")
        if r.seconds is not None:
            bits.append(f"{r.seconds * 1000:.0f} ms")
        if r.error:
            bits.append(r.error)
        if r.detail:
            bits.append(r.detail)
        lines.append(f"  {r.mechanism.value:<7} {state}  " + "; ".join(bits))
    chosen = result.choice.mechanism.value if result.choice.mechanism else "none"
    lines.append(f"chosen: {chosen}")
    lines.append(f"verdict: {result.choice.verdict.value}: {result.choice.reason}")
    if verbose:
        lines.extend(["trace:", *(f"  {line}" for line in result.trace)])
    return "\n".join(lines)


def _describe_six(report: Ipv6Report) -> str:
    if report.router is None:
        return f"ipv6: {report.pcp_error}"
    lines = [f"ipv6 router {report.router} (this host {report.local_address})"]
    pcp = f"epoch {report.pcp_epoch}" if report.pcp else report.pcp_error or ""
    lines.append(f"  pcp     {'yes' if report.pcp else 'no '}  {pcp}")
    status = report.firewall
    upnp = report.upnp_location or "" if report.upnp else report.upnp_error or ""
    if status is not None:
        upnp += f"; firewall {'enabled' if status.enabled else 'disabled'}, pinholes "
        upnp += "allowed" if status.inbound_allowed else "not allowed"
    lines.append(f"  upnp    {'yes' if report.upnp else 'no '}  {upnp}")
    return "\n".join(lines)


def _describe(mapping: Mapping[Any]) -> str:
    expires_at = mapping.expires_at
    until = f" (until {expires_at:%Y-%m-%d %H:%M:%S} UTC)" if expires_at else ""
    if isinstance(mapping, Pinhole):
        return (
            f"[{mapping.address}]:{mapping.port}/{mapping.protocol.value} open (IPv6 pinhole)"
            f" via {mapping.mechanism.value}, lifetime {mapping.lifetime}{until}"
        )
    return (
        f"{mapping.external_address}:{mapping.external_port} -> {mapping.internal_address}:"
        f"{mapping.internal_port}/{mapping.protocol.value} via {mapping.mechanism.value}, "
        f"lifetime {mapping.lifetime or 'permanent'}{until}"
    )


async def _made(args: argparse.Namespace, mapper: PortMapper) -> list[Mapping[Any]]:
    """What `igd map` asked for: a mapping, a pinhole (--ipv6) or both (--both)."""
    port, protocol = args.port
    if (args.ipv6 or args.both) and (args.external_port or args.exact):
        raise ValueError("a pinhole opens the internal port: no --external-port or --exact")
    if args.ipv6:
        pinhole = await mapper.pinhole(
            port, protocol, lifetime=args.lifetime, description=args.description, via=args.via
        )
        _out(args, pinhole.to_dict(), _describe(pinhole))
        return [pinhole]
    if args.both:
        got = await mapper.expose(port, protocol, lifetime=args.lifetime,
                                  description=args.description)  # fmt: skip
        held = [m for m in (got.mapping, got.pinhole) if m is not None]
        data = {
            "ipv4": got.mapping.to_dict() if got.mapping else None,
            "ipv6": got.pinhole.to_dict() if got.pinhole else None,
            "errors": [str(e) for e in got.errors],
        }
        text = [_describe(m) for m in held] + [f"failed: {e}" for e in got.errors]
        _out(args, data, "\n".join(text))
        return held
    mapping = await mapper.map(
        port,
        protocol,
        external_port=args.external_port,
        lifetime=args.lifetime,
        description=args.description,
        via=args.via,
        exact=args.exact,
    )
    _out(args, mapping.to_dict(), _describe(mapping))
    return [mapping]


async def _map(args: argparse.Namespace, mapper: PortMapper, scope: asyncio.Timeout) -> int:
    held = await _made(args, mapper)
    if not args.keep:
        for mapping in held:
            await mapping.detach()  # stays on the gateway until its lease ends
        return EXIT_OK
    scope.reschedule(None)  # mapped in time; now it lasts until interrupted

    def shower(mapping: Mapping[Any]) -> Callable[[MappingEvent[Any]], None]:
        def show(event: MappingEvent[Any]) -> None:
            data = {"event": event.kind.value, **mapping.to_dict()}
            if event.error is not None:
                data["error"] = str(event.error)
            _out(args, data, f"{event.kind.value}: {_describe(mapping)}")

        return show

    for mapping in held:
        mapping.subscribe(shower(mapping))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for mapping in held:
            await mapping.release()
    return EXIT_OK


async def _unmap(args: argparse.Namespace, mapper: PortMapper) -> int:
    port, protocol = args.port
    if args.ipv6:
        records = [r for r in mapper.stored() if r.family == 6]
        record = next((r for r in records if (r.protocol, r.internal_port) == (protocol, port)),
                      None)  # fmt: skip
        if record is None or not await mapper.unmap(port, protocol, family=6):
            raise NoSuchMapping(f"igd has no record of an IPv6 pinhole for {port}/{protocol.value}")
        data = {"deleted": [record.mechanism.value], **record.to_dict()}
        _out(args, data, f"closed the pinhole over {record.mechanism.value}")
        return EXIT_OK
    via = Mechanism(args.via) if args.via else None
    local = str(await mapper.local_address())
    record = next(
        (r for r in mapper.stored()
         if (r.protocol, r.internal_port, r.internal_address) == (protocol, port, local)),
        None,
    )  # fmt: skip
    if record and via in (None, record.mechanism) and not (args.nonce or args.external_port):
        # A mapping igd made (any mechanism, any earlier run): the state file knows how.
        await mapper.unmap(port, protocol)
        done = f"{record.mechanism.value} (external port {record.external_port})"
        data = {"deleted": [record.mechanism.value], **record.to_dict()}
        _out(args, data, f"deleted over {done}")
        return EXIT_OK
    code = await _unmap_unknown(args, mapper, port, protocol, via)
    if record is not None and mapper.state is not None:
        mapper.state.remove(record.key, now=mapper.wall_clock())  # deleted by hand
    return code


async def _unmap_unknown(
    args: argparse.Namespace,
    mapper: PortMapper,
    port: int,
    protocol: Protocol,
    via: Mechanism | None,
) -> int:
    """Delete a mapping igd has no record of, by what the user says about it."""
    done: list[str] = []
    if via is Mechanism.PCP or (via is None and args.nonce):
        if not args.nonce:
            raise NoSuchMapping(
                f"igd has no record of {port}/{protocol.value} on {mapper.gateway}; a PCP "
                "mapping made elsewhere is deleted only with its nonce: pass --nonce",
                mechanism=Mechanism.PCP,
            )
        async with PcpClient(mapper.gateway) as pcp:
            await pcp.unmap(protocol, port, nonce=bytes.fromhex(args.nonce))
        done.append("pcp")
    elif via in (None, Mechanism.NATPMP):
        with contextlib.suppress(NoGatewayError) if via is None else contextlib.nullcontext():
            async with NatPmpClient(mapper.gateway, attempts=4) as natpmp:
                await natpmp.unmap(protocol, port)
            done.append("natpmp")
    if via in (None, Mechanism.UPNP):
        with contextlib.suppress(NoGatewayError) if via is None else contextlib.nullcontext():
            client = await mapper.upnp()
            local = str(await mapper.local_address())
            ports = [args.external_port] if args.external_port else [
                e.external_port for e in await client.list_mappings()
                if e.internal_client == local and e.internal_port == port
                and e.protocol == protocol.value
            ]  # fmt: skip
            for external in ports:
                await client.delete_port_mapping(external, protocol)
            done.append(f"upnp ({len(ports)} deleted)")
    if not done:
        raise NoGatewayError("no mechanism answered")
    _out(args, {"deleted": done}, "deleted over " + ", ".join(done))
    return EXIT_OK
