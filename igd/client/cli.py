"""`igd`: probe the gateway, show the external address, map, unmap and list port mappings.

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
from collections.abc import Sequence
from typing import Any

import igd
from igd.client.errors import (
    MappingRefused,
    NoGatewayError,
    PortMappingError,
    ProtocolError,
)
from igd.client.mapper import PortMapper
from igd.client.mapping import Mapping, MappingEvent
from igd.client.natpmp import NatPmpClient
from igd.client.pcp import PcpClient
from igd.client.probe import ProbeResult
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="igd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {igd.__version__}")
    parser.add_argument("--gateway", help="gateway address (default: the default route's)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=2.0, help="probe budget in seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe", help="what the gateway speaks, its external address, NAT verdict")
    sub.add_parser("ip", help="the gateway's external address")
    vias = [m.value for m in REQUESTED]
    add = sub.add_parser("map", help="map an external port to a local port")
    add.add_argument("port", type=_port_spec, metavar="PORT[/tcp|/udp]")
    add.add_argument("--external-port", type=int, help="suggested external port")
    add.add_argument("--exact", action="store_true", help="fail rather than take another port")
    add.add_argument("--lifetime", type=int, default=7200, help="lease in seconds (7200)")
    add.add_argument("--via", choices=vias, help="force a mechanism")
    add.add_argument("--description", default="igd", help="label stored on the gateway")
    add.add_argument("--keep", action="store_true", help="renew until interrupted, then release")
    rm = sub.add_parser("unmap", help="delete a mapping of this host")
    rm.add_argument("port", type=_port_spec, metavar="PORT[/tcp|/udp]")
    rm.add_argument("--via", choices=vias, help="mechanism the mapping was made with")
    rm.add_argument("--external-port", type=int, help="UPnP: the external port")
    rm.add_argument("--nonce", help="PCP: the mapping nonce `igd map --json` printed (hex)")
    sub.add_parser("list", help="the gateway's UPnP mapping list")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `igd` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
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
        "exit": code,
    }


async def _run(args: argparse.Namespace) -> int:
    async with PortMapper(args.gateway, probe_timeout=args.timeout) as mapper:
        if args.command == "probe":
            result = await mapper.probe()
            _out(args, result.to_dict(), _describe_probe(result))
            return EXIT_OK if result.choice.mechanism else EXIT_NO_GATEWAY
        if args.command == "ip":
            address = await mapper.external_address()
            verdict = mapper.last_probe.choice.verdict.value if mapper.last_probe else None
            _out(args, {"external_address": str(address), "verdict": verdict}, str(address))
            return EXIT_OK
        if args.command == "map":
            return await _map(args, mapper)
        if args.command == "unmap":
            return await _unmap(args, mapper)
        entries = await mapper.list()
        rows = [_row(entry) for entry in entries]
        text = "\n".join(
            f"{r['protocol']:<4} {r['external_port']:>5} -> {r['internal_client']}:"
            f"{r['internal_port']}  lease {r['lease']}  {r['description']}"
            for r in rows
        )
        _out(args, rows, text or "(no mappings)")
        return EXIT_OK


def _row(entry: Any) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in entry.__slots__}


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


def _describe_probe(result: ProbeResult) -> str:
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
    return "\n".join(lines)


def _describe(mapping: Mapping) -> str:
    return (
        f"{mapping.external_address}:{mapping.external_port} -> {mapping.internal_address}:"
        f"{mapping.internal_port}/{mapping.protocol.value} via {mapping.mechanism.value}, "
        f"lifetime {mapping.lifetime or 'permanent'}"
    )


async def _map(args: argparse.Namespace, mapper: PortMapper) -> int:
    port, protocol = args.port
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
    if not args.keep:
        await mapping.detach()  # stays on the gateway until its lease ends
        return EXIT_OK

    def show(event: MappingEvent) -> None:
        data = {"event": event.kind.value, **mapping.to_dict()}
        if event.error is not None:
            data["error"] = str(event.error)
        _out(args, data, f"{event.kind.value}: {_describe(mapping)}")

    mapping.subscribe(show)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await mapping.release()
    return EXIT_OK


async def _unmap(args: argparse.Namespace, mapper: PortMapper) -> int:
    port, protocol = args.port
    via = Mechanism(args.via) if args.via else None
    done: list[str] = []
    if via is Mechanism.PCP or (via is None and args.nonce):
        if not args.nonce:
            raise MappingRefused("PCP deletes need the mapping's nonce: pass --nonce")
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
