"""Client benchmark: time from `map()` to a usable mapping (a WAN host connects through it),
per mechanism and for the automatic choice, next to `upnpc -a` and `natpmpc -a` for the same
mapping, against Debian's miniupnpd (UPnP, NAT-PMP, PCP) and against igd-server.

`.venv/bin/python -m lab.bench_client [--rounds N]` (root: it builds namespace labs).
Also holds what the client's lab tests share: miniupnpd's options for them, running client code.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from lab import Lab
from lab.demo import connect, default_policy, start_service, wait_for_gateway
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions

# What the client's lab tests and this benchmark run miniupnpd with: UPnP IGD, NAT-PMP and
# PCP; the 2 s minimum lifetime lets the renewal tests see several renewals.
CLIENT_OPTIONS = MiniupnpdOptions(
    upnp=True, http_port=2189, system_uptime=True, clean_ruleset_interval=0, min_lifetime=2
)


def client_python(lab: Lab, host: str, code: str, *, timeout: float = 60.0) -> dict[str, object]:
    """Run client code in `host`; it prints one JSON object last, which is returned."""
    proc = lab.python(host, code, check=False, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"client code failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


# Maps, then polls (in the LAN host) until the bench's WAN probe says it works: a file flag
# written by the driver once the WAN connect succeeded.
_MAP_AND_TIME = """
import asyncio, json, os, sys, time
from igd.client.mapper import PortMapper
via = sys.argv[1] if sys.argv[1] != "auto" else None
async def main():
    async with PortMapper(listen=False) as pm:
        started = time.perf_counter()
        m = await pm.map(int(sys.argv[2]), "tcp", lifetime=600, via=via, description="bench")
        mapped = time.perf_counter() - started
        print(json.dumps({"mapped": mapped, "port": m.external_port,
                          "mechanism": m.mechanism.value}), flush=True)
        while not os.path.exists(sys.argv[3]):
            await asyncio.sleep(0.005)
asyncio.run(main())
"""


def time_client(lab: Lab, via: str, port: int) -> tuple[float, float, str]:
    """(seconds until map() returned, seconds until a WAN host got through, mechanism)."""
    flag = lab.workdir / f"usable-{via}-{port}"
    flag.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = lab.python_popen(
        "lan1", ["-c", _MAP_AND_TIME, via, str(port), str(flag)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"the client for {via} failed (exit {proc.returncode})")
    info = json.loads(line)
    _until_reachable(lab, int(info["port"]))
    usable = time.perf_counter() - started
    flag.touch()
    proc.wait(30)
    return float(info["mapped"]), usable, str(info["mechanism"])


def time_tool(lab: Lab, argv: list[str], port: int, delete: list[str]) -> float:
    """Seconds from starting `argv` (upnpc/natpmpc) in lan1 until a WAN host gets through."""
    started = time.perf_counter()
    lab.run("lan1", argv, timeout=30)
    _until_reachable(lab, port)
    elapsed = time.perf_counter() - started
    lab.run("lan1", delete, check=False, timeout=30)
    return elapsed


def _until_reachable(lab: Lab, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(lab, "wan1", lab.gateway.external_address, port, timeout=1.0)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _summary(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:7.1f} ms  (min {min(samples) * 1000:.1f})"


def _bench(rounds: int, cases: dict[str, Callable[[int], float]]) -> dict[str, str]:
    results: dict[str, list[float]] = {name: [] for name in cases}
    for index in range(rounds):
        for offset, (name, case) in enumerate(cases.items()):
            results[name].append(case(9000 + index * 10 + offset))
    return {name: _summary(samples) for name, samples in results.items()}


def _cases(lab: Lab, vias: list[str], tools: list[str]) -> dict[str, Callable[[int], float]]:
    """Benchmark cases for a lab whose gateway runs already; each starts its own service."""
    gw = lab.gateway.address

    def service(port: int) -> None:
        start_service(lab, "lan1", port)

    def client(via: str) -> Callable[[int], float]:
        def case(port: int) -> float:
            service(port)
            # In-process map() time: the mapping was then checked usable by a WAN connect.
            # Process start to usable adds Python's start-up and imports (~0.3 s here).
            return time_client(lab, via, port)[0]

        return case

    def upnpc(port: int) -> float:
        service(port)
        add = ["upnpc", "-e", "bench", "-a", "@", str(port), str(port), "tcp", "600"]
        return time_tool(lab, add, port, ["upnpc", "-d", str(port), "tcp"])

    def natpmpc(port: int) -> float:
        service(port)
        add = ["natpmpc", "-g", gw, "-a", str(port), str(port), "tcp", "600"]
        return time_tool(lab, add, port, [*add[:-1], "0"])

    cases = {f"igd map via {via}": client(via) for via in vias}
    tool_cases = {"upnpc -a": upnpc, "natpmpc -a": natpmpc}
    cases.update({name: tool_cases[name] for name in tools})
    return cases


def run(rounds: int, write: Callable[[str], None] = print) -> None:
    """Run the benchmark against miniupnpd and against igd-server; print two tables."""
    title = "map() until it returns (the tools: start until a WAN host gets through)"
    with (
        Lab(
            prefix=f"igdclibm{secrets.token_hex(2)}",
            wan_network=PUBLIC_LOOKING_WAN,
            wan_hosts=1,
            lan_hosts=1,
        ) as lab,
        Miniupnpd(lab, CLIENT_OPTIONS),
    ):
        cases = _cases(lab, ["auto", "pcp", "natpmp", "upnp"], ["upnpc -a", "natpmpc -a"])
        write(f"miniupnpd 2.3.1 (Debian), {title}, {rounds} rounds:")
        for name, line in _bench(rounds, cases).items():
            write(f"  {name:<22} {line}")
    with Lab(
        prefix=f"igdclibs{secrets.token_hex(2)}",
        wan_hosts=1,
        lan_hosts=1,
        wan_network=PUBLIC_LOOKING_WAN,  # clients refuse UPnP with a reserved external address
    ) as lab:
        lab.start_gateway(lab.write_gateway_config(default_policy(), upnp={"enabled": True}))
        wait_for_gateway(lab)
        cases = _cases(lab, ["auto", "pcp", "natpmp", "upnp"], ["upnpc -a", "natpmpc -a"])
        write(f"igd-server, {title}, {rounds} rounds:")
        for name, line in _bench(rounds, cases).items():
            write(f"  {name:<22} {line}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m lab.bench_client`."""
    parser = argparse.ArgumentParser(prog="python -m lab.bench_client")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
