"""UPnP control-plane benchmark in the namespace lab: `python -m igd.lab.bench_upnp`.

Measures, through real SOAP over HTTP from a LAN host: AddPortMapping per second (one
request at a time) with 0, 10,000 and 50,000 mappings already held; the time to list
10,000 mappings with one GetListOfPortMappings and with a GetGenericPortMappingEntry walk.
With `--miniupnpd` the same client runs against Debian's miniupnpd in the same lab.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time

from igd.lab import Lab

PUBLIC_LOOKING_WAN = "100.128.7.0/24"  # miniupnpd refuses documentation ranges
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
MINIUPNPD_RULESET = """
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""

# Runs in the LAN host: discovers the control URL from the description, then measures.
_CLIENT = r"""
import asyncio, json, re, sys, time
import aiohttp

DESC, ME = sys.argv[1], sys.argv[2]
LEVELS, SAMPLE, LIST_AT = json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
XML = 'text/xml; charset="utf-8"'

ENV = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
       's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
       '<u:{a} xmlns:u="{t}">{args}</u:{a}></s:Body></s:Envelope>')

async def main():
    out = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
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
            async with session.post(url, data=body, headers=headers) as r:
                text = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"{action} {args}: {r.status} {text[:300]}")
                return text

        def add(port, proto):
            return call("AddPortMapping", NewRemoteHost="", NewExternalPort=port, NewProtocol=proto,
                        NewInternalPort=port, NewInternalClient=ME, NewEnabled=1,
                        NewPortMappingDescription="bench", NewLeaseDuration=86400)

        # Clear of the gateways' own ports (5000/tcp, 1900/udp, 5350-5351/udp).
        held, tcp, TCP0, UDP0 = 0, 10000, 10000, 6000
        for level in LEVELS:
            # Fill to the level with 8 requests in flight (TCP), then time SAMPLE single adds (UDP).
            while tcp - TCP0 < level:
                batch = min(level - (tcp - TCP0), 512)
                await asyncio.gather(*(add(tcp + i, "TCP") for i in range(batch)))
                tcp += batch
                held += batch
            udp = UDP0 + held - (tcp - TCP0)
            start = time.perf_counter()
            for i in range(SAMPLE):
                await add(udp + i, "UDP")
            elapsed = time.perf_counter() - start
            held += SAMPLE
            out[f"add_per_s_at_{level}"] = round(SAMPLE / elapsed, 1)
            if level == LIST_AT or (LIST_AT and level > LIST_AT and "list_s" not in out):
                count = held
                start = time.perf_counter()
                try:
                    text = await call("GetListOfPortMappings", NewStartPort=0, NewEndPort=65535,
                                      NewProtocol="TCP", NewManage=1, NewNumberOfPorts=0)
                    out["list_entries"] = text.count("PortMappingEntry>") // 2
                    out["list_s"] = round(time.perf_counter() - start, 3)
                except RuntimeError as exc:
                    out["list_error"] = str(exc)[:200]
                start = time.perf_counter()
                walked = 0
                for index in range(count):
                    try:
                        await call("GetGenericPortMappingEntry", NewPortMappingIndex=index)
                    except RuntimeError:
                        break
                    walked += 1
                out["walk_entries"] = walked
                out["walk_s"] = round(time.perf_counter() - start, 3)
    print(json.dumps(out))

asyncio.run(main())
"""


def run(levels: list[int], sample: int, list_at: int, miniupnpd: bool) -> dict[str, object]:
    """One benchmark run in a fresh lab; the numbers the client measured."""
    prefix = f"igdupnpbench{secrets.token_hex(2)}"
    with Lab(prefix, wan_hosts=1, lan_hosts=1, wan_network=PUBLIC_LOOKING_WAN) as lab:
        gw, lan = lab.gateway, lab.lan[0]
        if miniupnpd:
            conf = lab.workdir / "miniupnpd.conf"
            conf.write_text(
                f"ext_ifname={gw.external_interface}\nlistening_ip={gw.interface}\n"
                f"port={HTTP_PORT}\nenable_natpmp=no\nenable_upnp=yes\nsecure_mode=yes\n"
                "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n"
                "upnp_table_name=filter\nupnp_nat_table_name=filter\n"
                "upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n"
                "upnp_nat_postrouting_chain=postrouting_miniupnpd\n"
            )
            lab.run("gw", ["nft", "-f", "-"], input=MINIUPNPD_RULESET)
            lab.popen(
                "gw", ["miniupnpd", "-d", "-f", str(conf)], stderr=lab.gateway_log_path.open("ab")
            )
            description = f"http://{gw.address}:{HTTP_PORT}/rootDesc.xml"
        else:
            policy = lab.workdir / "bench-policy.toml"
            policy.write_text(POLICY)
            config = lab.write_gateway_config(
                policy, upnp={"enabled": True, "http_port": HTTP_PORT, "igd_version": 2}
            )
            lab.start_gateway(config)
            description = ""
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
        proc = lab.python(
            lan,
            [
                "-c",
                _CLIENT,
                description,
                lan.address,
                json.dumps(levels),
                str(sample),
                str(list_at),
            ],
            timeout=3600,
        )
        result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igd.lab.bench_upnp", description=__doc__)
    parser.add_argument(
        "--levels", default="0,10000,50000", help="mappings held before each sample"
    )
    parser.add_argument(
        "--sample", type=int, default=500, help="AddPortMapping calls timed per level"
    )
    parser.add_argument("--list-at", type=int, default=10000, help="list when this many are held")
    parser.add_argument("--miniupnpd", action="store_true", help="run against Debian's miniupnpd")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.levels.split(",")]
    result = run(levels, args.sample, args.list_at, args.miniupnpd)
    name = "miniupnpd" if args.miniupnpd else "igd-server"
    print(json.dumps({"gateway": name, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "run"]
