"""`python -m lab.bench_datapath`: new flows per second admitted through DNAT, igd and miniupnpd.

In one namespace lab (traffic only between lab hosts): `hping3` on the WAN host `wan1` floods
UDP datagrams to one mapped port of the gateway's external address, each from the next source
port (a new flow each), for `--seconds`; the gateway translates them to `lan1`, which drops
them on arrival (a counting prerouting rule, so it spends nothing on them). The rate is the
number of datagrams that reached lan1 (each a new flow the gateway admitted and translated)
divided by the flood's time; the gateway's conntrack is flushed before each run. Each case is run
`--repeats` times and the median reported.

Cases: igd's table (the daemon's own payload, written through `NftablesBackend`) holding 0,
10,000 and 50,000 mappings besides the target, with the per-mapping counters on and off, and
with a FILTER on the target (the `admit` chain) on and off; then miniupnpd's table with
`--miniupnpd-size` DNAT rules, the target's last (a rule per mapping: the miniupnpd shape).
The target's rule is the one miniupnpd itself wrote for a NAT-PMP request; the others are
copies of it for other ports (its raw protocol match spelled `ip protocol udp`), added in one
transaction (filling it through miniupnpd takes
minutes: docs/performance.md).

With `--addressed`, the same cases again on a second external address of the gateway
(`network.external_addresses`: the `*_addr` maps keyed by destination address, protocol and
port), the target and every other mapping on that address.

Source ports run from 1024 upwards: about 64,000 new flows per run before they repeat. A run
that reaches that many is reported as a lower bound ("≥").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol, RemoteFilter
from igd.server.backends.nftables import NftablesBackend
from lab import Lab
from lab.bench import preload
from lab.demo import natpmpc
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions

PREFIX = "igddp"
TABLE = "igd"
TARGET = 40000
FIRST_SOURCE_PORT = 1024
PORT_SPACE = 65536 - FIRST_SOURCE_PORT
DEFAULT_SIZES = (0, 10_000, 50_000)
DEFAULT_SECONDS = 0.5
DEFAULT_REPEATS = 3
DEFAULT_MINIUPNPD_SIZE = 5_000
LEASE = 7200.0

SINK = f"""
table ip sink
delete table ip sink
table ip sink {{
  chain prerouting {{ type filter hook prerouting priority raw; policy accept;
    udp dport {TARGET} counter notrack drop
  }}
}}
"""
"""On lan1: count what arrives for the target, drop it at once (recreated before each run)."""


@dataclass(frozen=True, slots=True)
class Case:
    """One measured configuration and its runs (new flows per second)."""

    gateway: str
    mappings: int
    counters: bool
    filters: bool
    rates: tuple[float, ...]
    saturated: bool

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def delivered(lab: Lab) -> int:
    """Datagrams for the target that reached lan1 since the sink was made."""
    out = lab.run(lab.lan[0], ["nft", "-j", "list", "table", "ip", "sink"]).stdout
    for obj in json.loads(out)["nftables"]:
        for expr in obj.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    return 0


def flood(lab: Lab, seconds: float, destination: str | None = None) -> tuple[float, bool]:
    """One bounded flood; new flows per second the gateway translated to lan1, and whether
    the source ports ran out (the rate is then a lower bound)."""
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    lab.run(lab.lan[0], ["nft", "-f", "-"], input=SINK)
    time.sleep(0.05)
    argv = [
        "timeout", "-s", "INT", f"{seconds}",
        "hping3", "--udp", "--flood", "-q", "-p", str(TARGET), "-s", str(FIRST_SOURCE_PORT),
        destination or lab.gateway.external_address,
    ]  # fmt: skip
    started = time.monotonic()
    lab.run(lab.wan[0], argv, check=False, timeout=seconds + 10)
    elapsed = min(time.monotonic() - started, seconds + 0.05)
    # Each datagram that reached lan1 is a flow the gateway admitted and translated (its
    # source port is new until the ports run out).
    flows = delivered(lab)
    return flows / min(seconds, elapsed), flows >= PORT_SPACE * 0.95


def second_address(lab: Lab) -> IPv4Address:
    """The gateway's second external address in the lab (on its WAN interface)."""
    return IPv4Address(lab.wan_network[-2])


def target(lab: Lab, *, filters: bool, address: IPv4Address | None = None) -> Mapping:
    lan = IPv4Address(lab.lan[0].address)
    allowed = (RemoteFilter(IPv4Network(lab.wan_network)),) if filters else ()
    return Mapping(
        MappingKey(Protocol.UDP, TARGET, None, address),
        lan,
        TARGET,
        Owner(Mechanism.PCP, lan),
        0.0,
        LEASE,
        filters=allowed,
    )


async def igd_case(
    lab: Lab,
    size: int,
    *,
    counters: bool,
    filters: bool,
    seconds: float,
    repeats: int,
    addressed: bool = False,
) -> Case:
    address = second_address(lab) if addressed else None
    backend = NftablesBackend(
        TABLE,
        lab.gateway.external_interface,
        netns=lab.gateway.ns,
        counters=counters,
        addresses=() if address is None else (address,),
    )
    await backend.open()
    await backend.set_destinations([IPv4Address(lab.gateway.external_address)])
    owners = [IPv4Address(lab.lan[1].address)]
    others = preload(size, owners, range(TARGET, TARGET + 1), now=0.0)
    if address is not None:
        others = [replace(m, key=replace(m.key, external_address=address)) for m in others]
    wanted = [*others, target(lab, filters=filters, address=address)]
    await backend.reconcile(wanted, now=0.0, audit=False)
    destination = None if address is None else str(address)
    runs = [await asyncio.to_thread(flood, lab, seconds, destination) for _ in range(repeats)]
    await backend.close(flush=True)
    name = "igd, 2nd address" if addressed else "igd"
    return Case(name, size, counters, filters, tuple(r for r, _ in runs), any(s for _, s in runs))


def miniupnpd_case(lab: Lab, size: int, *, seconds: float, repeats: int) -> Case:
    with Miniupnpd(lab, MiniupnpdOptions(), name="miniupnpd-datapath") as mini:
        natpmpc(lab, lab.lan[0], "-a", str(TARGET), str(TARGET), "udp", "3600")
        (rule,) = [line.strip() for line in mini.dnat_rules().splitlines()]
        # nft 1.0.6 lists miniupnpd's raw protocol match (`@nh,72,8 0x11`) in a form it cannot
        # read back: the copies say the same as `ip protocol udp` (one load, one compare).
        rule = rule.replace("@nh,72,8 0x11", "ip protocol udp")
        # Its own rule for the target, then copies for other ports inserted before it: each
        # new flow to the target walks all of them, as with a full miniupnpd table.
        ports = [p for p in range(10_000, 65_536) if p != TARGET][: size - 1]
        script = "".join(
            f"insert rule inet filter prerouting_miniupnpd {rule.replace(str(TARGET), str(p))}\n"
            for p in ports
        )
        lab.run(lab.gateway, ["nft", "-f", "-"], input=script, timeout=120)
        count = mini.rule_count()
        runs = [flood(lab, seconds) for _ in range(repeats)]
    return Case(
        "miniupnpd", count, False, False, tuple(r for r, _ in runs), any(s for _, s in runs)
    )


def markdown(cases: Sequence[Case]) -> str:
    base = next(
        (
            c.rate
            for c in cases
            if c.gateway == "igd" and c.mappings == 0 and c.counters and not c.filters
        ),
        0.0,
    )
    lines = [
        "| gateway | mappings | counters | FILTER on target | new flows/s (median) | runs"
        " | vs igd at 0 |",
        "| --- | ---: | --- | --- | ---: | --- | ---: |",
    ]
    for c in cases:
        bound = "≥ " if c.saturated else ""
        runs = ", ".join(f"{r:,.0f}" for r in c.rates)
        ratio = f"{c.rate / base:.2f}\N{MULTIPLICATION SIGN}" if base else "-"
        lines.append(
            f"| {c.gateway} | {c.mappings:,} | {'on' if c.counters else 'off'} |"
            f" {'yes' if c.filters else 'no'} | {bound}{c.rate:,.0f} | {runs} | {ratio} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> list[Case]:
    cases: list[Case] = []
    with Lab(prefix=PREFIX, wan_network=PUBLIC_LOOKING_WAN) as lab:
        if args.addressed:
            bits = lab.wan_network.prefixlen
            address = f"{second_address(lab)}/{bits}"
            lab.run(
                lab.gateway, ["ip", "addr", "add", address, "dev", lab.gateway.external_interface]
            )
        for size in args.sizes:
            shapes = [(True, False, False), (False, False, False), (True, True, False)]
            if args.addressed:
                shapes += [(True, False, True), (True, True, True)]
            for counters, filters, addressed in shapes:
                case = asyncio.run(
                    igd_case(
                        lab,
                        size,
                        counters=counters,
                        filters=filters,
                        seconds=args.seconds,
                        repeats=args.repeats,
                        addressed=addressed,
                    )
                )
                say(
                    f"{case.gateway} {size:>6,} mappings, counters {'on ' if counters else 'off'},"
                    f" FILTER {'yes' if filters else 'no '}:"
                    f" {case.rate:,.0f} new flows/s"
                )
                cases.append(case)
        if args.miniupnpd_size:
            case = miniupnpd_case(
                lab, args.miniupnpd_size, seconds=args.seconds, repeats=args.repeats
            )
            say(f"miniupnpd {case.mappings:,} rules: {case.rate:,.0f} new flows/s")
            cases.append(case)
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench_datapath", description=__doc__)
    parser.add_argument(
        "--sizes",
        type=lambda t: tuple(int(x) for x in t.split(",")),
        default=DEFAULT_SIZES,
        help="mappings besides the target (default %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help="length of each flood (default %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help="floods per case (default %(default)s)"
    )
    parser.add_argument(
        "--addressed",
        action="store_true",
        help="also measure mappings on a second external address",
    )
    parser.add_argument(
        "--miniupnpd-size",
        type=int,
        default=DEFAULT_MINIUPNPD_SIZE,
        help="miniupnpd DNAT rules, 0 skips it (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 5 or not 1 <= args.repeats <= 10:
        parser.error("--seconds must be in (0, 5] and --repeats in 1..10 (bounded load)")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cases = run(args, say)
    print(f"bench_datapath, {started}, {platform.node()}, Linux {platform.release()}\n")
    print(markdown(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
