"""UPnP control-plane benchmark in the namespace lab: `python -m lab.bench_upnp`.

Measures, through real SOAP over HTTP from a LAN host: AddPortMapping per second (one
request at a time) with 0, 10,000 and 50,000 mappings already held; the time to list
10,000 mappings with a GetGenericPortMappingEntry walk and with one GetListOfPortMappings.
With `--miniupnpd` the same client runs against Debian's miniupnpd in the same lab; it
fills its table as far as `--fill-seconds` allows and measures at the size reached.
Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import time

from lab import Lab
from lab.bench import LIMITS
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions, version

HTTP_PORT = 5000
POLICY = """
[defaults]
action = "allow"
secure_mode = true
max_lease = 86400
min_lease = 2
max_mappings_per_client = 60000
max_mappings = 60000
"""
# Runs in the LAN host: discovers the control URL from the description, then measures.
# Against miniupnpd 2.3.1 the old client timed out. miniupnpd serves one request at a time,
# closes every connection, and listens with a backlog of 5: 8 connections at once overflow
# it, the kernel drops the extra SYNs and those clients wait out SYN retransmits (1, 3, 7 s);
# with 512 requests gathered behind the 8 connections under aiohttp's default 5-minute total
# timeout, which counts the wait for a free connection, requests timed out. So: IN_FLIGHT
# workers of one request at a time each (4 for miniupnpd, below its backlog), a connect and
# read timeout but no total one, and a time budget for the fill, since miniupnpd slows as its
# table grows. The timed samples are one request at a time either way. GetListOfPortMappings
# kills miniupnpd 2.3.1 once it holds more than about 150 mappings (`upnpc -L` too), so the
# walk runs first and the list last.
_CLIENT = r"""
import asyncio, json, re, sys, time
import aiohttp

DESC, ME = sys.argv[1], sys.argv[2]
LEVELS, SAMPLE, LIST_AT = json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
FILL_SECONDS, WALK_SECONDS = float(sys.argv[6]), float(sys.argv[7])
IN_FLIGHT = int(sys.argv[8])
XML = 'text/xml; charset="utf-8"'
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)

ENV = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
       's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
       '<u:{a} xmlns:u="{t}">{args}</u:{a}></s:Body></s:Envelope>')

class Failed(RuntimeError):
    pass

async def main():
    out = {}
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        async with session.get(DESC) as r:
            desc = await r.text()
        stype = re.search(r"urn:schemas-upnp-org:service:WANIPConnection:\d", desc).group(0)
        block = desc[desc.index(stype):]
        control = re.search(r"<controlURL>([^<]+)</controlURL>", block).group(1)
        base = re.match(r"(http://[^/]+)", DESC).group(1)
        url = base + control

        async def call(action, **args):
            inner = "".join(f"<{k}>{v}</{k}>" for k, v in args.items())
            body = ENV.format(a=action, t=stype, args=inner)
            headers = {"SOAPACTION": f'"{stype}#{action}"', "Content-Type": XML}
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    text = await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise Failed(f"{action}: no answer ({type(exc).__name__} {exc})") from None
            if r.status != 200:
                raise Failed(f"{action} {args}: {r.status} {text[:300]}")
            return text

        def add(port, proto):
            return call("AddPortMapping", NewRemoteHost="", NewExternalPort=port, NewProtocol=proto,
                        NewInternalPort=port, NewInternalClient=ME, NewEnabled=1,
                        NewPortMappingDescription="bench", NewLeaseDuration=86400)

        async def fill(first, stop, deadline):
            # IN_FLIGHT workers, one request at a time each, on new TCP ports first..stop-1
            # until the deadline; how many were added.
            ports, added = iter(range(first, stop)), 0
            async def worker():
                nonlocal added
                for port in ports:
                    if time.monotonic() > deadline:
                        return
                    await add(port, "TCP")
                    added += 1
            await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
            return added

        # Clear of the gateways' own ports (5000/tcp, 1900/udp, 5350-5351/udp).
        held, tcp, TCP0, UDP0 = 0, 0, 10000, 6000
        deadline = time.monotonic() + FILL_SECONDS
        for level in LEVELS:
            # Fill to the level (TCP, or as far as the budget goes), then time SAMPLE single
            # adds (UDP) at the size reached.
            if tcp < level:
                started = time.perf_counter()
                added = await fill(TCP0 + tcp, TCP0 + level, deadline)
                out["fill_s"] = round(out.get("fill_s", 0) + time.perf_counter() - started, 1)
                tcp += added
                held += added
            out[f"held_at_{level}"] = held
            udp = UDP0 + held - tcp
            start = time.perf_counter()
            for i in range(SAMPLE):
                await add(udp + i, "UDP")
            out[f"add_per_s_at_{level}"] = round(SAMPLE / (time.perf_counter() - start), 1)
            held += SAMPLE
            short = tcp < level
            if short:
                out["fill_stopped"] = f"{tcp} of {level} TCP mappings in {FILL_SECONDS:.0f} s"
            if LIST_AT and (level >= LIST_AT or short) and "walk_s" not in out:
                out["listed_at"] = held
                start = time.perf_counter()
                walked, walk_deadline = 0, time.monotonic() + WALK_SECONDS
                for index in range(held):
                    if time.monotonic() > walk_deadline:
                        out["walk_stopped"] = f"time budget of {WALK_SECONDS:.0f} s"
                        break
                    try:
                        await call("GetGenericPortMappingEntry", NewPortMappingIndex=index)
                    except Failed as exc:
                        out["walk_error"] = str(exc)[:200]
                        break
                    walked += 1
                out["walk_entries"] = walked
                out["walk_s"] = round(time.perf_counter() - start, 3)
                start = time.perf_counter()
                try:
                    text = await call("GetListOfPortMappings", NewStartPort=0, NewEndPort=65535,
                                      NewProtocol="TCP", NewManage=1, NewNumberOfPorts=0)
                    out["list_entries"] = text.count("PortMappingEntry>") // 2
                    out["list_s"] = round(time.perf_counter() - start, 3)
                except Failed as exc:
                    out["list_error"] = str(exc)[:200]
                    try:
                        await call("GetExternalIPAddress")
                    except Failed:
                        out["list_error"] += "; the gateway no longer answers"
                        break
            if short:
                break
    print(json.dumps(out))

asyncio.run(main())
"""


DEFAULT_FILL_SECONDS = 240.0  # miniupnpd slows as its table grows: it gets this long to fill
DEFAULT_WALK_SECONDS = 120.0
PREFIX = "igdupnpbench"
IN_FLIGHT = 8  # requests at once while filling the table (igd-server allows 8 per client)
MINIUPNPD_IN_FLIGHT = 4  # below the backlog of 5 miniupnpd listens with


def run(
    levels: list[int],
    sample: int,
    list_at: int,
    miniupnpd: bool,
    *,
    fill_seconds: float = DEFAULT_FILL_SECONDS,
    walk_seconds: float = DEFAULT_WALK_SECONDS,
    prefix: str | None = None,
) -> dict[str, object]:
    """One benchmark run in a fresh lab; the numbers the client measured."""
    prefix = prefix or f"{PREFIX}{secrets.token_hex(2)}"
    with (
        Lab(prefix, wan_hosts=1, lan_hosts=1, wan_network=PUBLIC_LOOKING_WAN) as lab,
        contextlib.ExitStack() as stack,
    ):
        gw, lan = lab.gateway, lab.lan[0]
        if miniupnpd:
            options = MiniupnpdOptions(
                natpmp=False, upnp=True, http_port=HTTP_PORT, allow_lan=False
            )
            description = stack.enter_context(Miniupnpd(lab, options)).description_url
            in_flight = MINIUPNPD_IN_FLIGHT
        else:
            policy = lab.workdir / "bench-policy.toml"
            policy.write_text(POLICY)
            # The benchmark's limits (lab/bench.py): the fill outruns the shipped 500 actions/s.
            config = lab.write_gateway_config(
                policy,
                upnp={"enabled": True, "http_port": HTTP_PORT, "igd_version": 2},
                limits=LIMITS,
            )
            lab.start_gateway(config)
            description, in_flight = "", IN_FLIGHT
        deadline = time.monotonic() + 15
        while not description:
            for line in lab.gateway_log().splitlines():
                if "UPnP IGD serving version" in line:
                    path = line.rsplit(" at ", 1)[1].split(",")[0].strip()
                    description = f"http://{gw.address}:{HTTP_PORT}{path}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{lab.gateway_log()}")
            time.sleep(0.2)
        time.sleep(1.0)
        argv = [description, lan.address, json.dumps(levels), str(sample), str(list_at)]
        argv += [str(fill_seconds), str(walk_seconds), str(in_flight)]
        proc = lab.python(lan, ["-c", _CLIENT, *argv], timeout=3600)
        result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: one run against igd-server (or miniupnpd), its numbers as JSON."""
    parser = argparse.ArgumentParser(prog="python -m lab.bench_upnp", description=__doc__)
    parser.add_argument(
        "--levels", default="0,10000,50000", help="mappings held before each sample"
    )
    parser.add_argument(
        "--sample", type=int, default=500, help="AddPortMapping calls timed per level"
    )
    parser.add_argument("--list-at", type=int, default=10000, help="list when this many are held")
    parser.add_argument(
        "--fill-seconds",
        type=float,
        default=DEFAULT_FILL_SECONDS,
        help="time budget for filling the table to the levels (default %(default)s)",
    )
    parser.add_argument(
        "--walk-seconds",
        type=float,
        default=DEFAULT_WALK_SECONDS,
        help="time budget for the GetGenericPortMappingEntry walk (default %(default)s)",
    )
    parser.add_argument("--miniupnpd", action="store_true", help="run against Debian's miniupnpd")
    parser.add_argument("--prefix", help=f"lab name (default {PREFIX} and a random suffix)")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.levels.split(",")]
    result = run(
        levels,
        args.sample,
        args.list_at,
        args.miniupnpd,
        fill_seconds=args.fill_seconds,
        walk_seconds=args.walk_seconds,
        prefix=args.prefix,
    )
    name = f"miniupnpd {version()}" if args.miniupnpd else "igd-server"
    print(json.dumps({"gateway": name, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "run"]
