"""`python -m lab.bench_datapath`: new flows per second admitted through DNAT, igd and miniupnpd.

In one namespace lab (traffic only between lab hosts): a generator on the WAN host `wan1` floods
UDP datagrams to one mapped port of the gateway's external address, each a new flow; the
gateway translates them to `lan1`, which drops them on arrival (a counting prerouting rule, so
it spends nothing on them). The gateway's conntrack is flushed before each flood; after a
warm-up the counter at lan1 is read twice, `--seconds` apart, while the generator still runs:
the datagrams that reached lan1 in between (each a new flow the gateway admitted and
translated) divided by that time are the rate, so the generator's start and stop are not in it.
Each case is run `--repeats` times and the median reported.

The generator (`--generator`, the same for igd and miniupnpd):

- `trafgen` (Debian's netsniff-ng, the default): one process, which trafgen pins to CPU 0,
  sends through a PACKET_MMAP ring on wan1 a frame from wan1's MAC to the gateway's WAN MAC,
  with the source address counting through `.4`-`.253` of the lab's WAN /24 (no lab host
  uses them; the gateway reaches them on its WAN link, so reverse-path checks pass) and the
  source port through 1024-65535 together: 8,064,000 distinct flows before one repeats, and at
  most `MAX_FLOWS` are sent per flood (under nf_conntrack_max, one limit for all namespaces).
- `hping3 --udp --flood`: one datagram per sendto, from wan1's own address, the source port
  counting from 1024: about 64,000 new flows before they repeat (the earlier generator).

A run in which the gateway's conntrack holds fewer entries than datagrams arrived at lan1 sent
some flows twice; its rate is marked as such.

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol, RemoteFilter
from igd.server.backends.nftables import NftablesBackend
from lab import Host, Lab
from lab.bench import preload
from lab.demo import natpmpc
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions

PREFIX = "igddp"
TABLE = "igd"
TARGET = 40000
FIRST_SOURCE_PORT = 1024
# trafgen's source addresses: the lab's WAN /24 from .4 to .253 (.1 is the gateway, .2 and .3
# the WAN hosts, .254 the gateway's second address in `--addressed`).
SOURCE_HOSTS = (4, 253)
MAX_FLOWS = 200_000  # per flood: below nf_conntrack_max (262,144 here), one limit for all netns
WARMUP = 0.2  # seconds of flood before the window opens (the generator's start is not in it)
TAIL = 0.3  # seconds the generator may run past the window before `timeout` stops it
GENERATORS = ("trafgen", "hping3")
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
    repeated: bool

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


class GeneratorError(RuntimeError):
    """The load generator stopped or failed before the measuring window closed."""


def mac(lab: Lab, host: Host, interface: str) -> str:
    """The MAC address of `interface` in `host`'s namespace."""
    out = lab.run(host, ["ip", "-j", "link", "show", "dev", interface]).stdout
    return str(json.loads(out)[0]["address"])


def trafgen_packet(lab: Lab, destination: str) -> str:
    """trafgen's packet: UDP to the target from a new (source address, source port) each time."""
    low, high = SOURCE_HOSTS
    source = lab.wan_network[low]
    # Two runtime counters that step together: 250 addresses by 64,512 ports repeat only after
    # their least common multiple (8,064,000 datagrams). The header functions recompute the
    # IPv4 and UDP checksums for every datagram whose fields a counter changed (trafgen(8)).
    # TTL must be set: trafgen's default is 0, which the gateway would not forward.
    return (
        "{ "
        f"eth(da={mac(lab, lab.gateway, lab.gateway.external_interface)},"
        f" sa={mac(lab, lab.wan[0], lab.wan[0].interface)}), "
        f"ipv4(sa={source}, sa[3]=dinc({low}, {high}), da={destination}, ttl=64), "
        f"udp(sp=dinc({FIRST_SOURCE_PORT}, 65535), dp={TARGET})"
        " }"
    )


def generator_argv(lab: Lab, generator: str, destination: str) -> list[str]:
    """The flood's command line on wan1 (bounded in time by the caller, in count here)."""
    if generator == "trafgen":
        # --cpus 1: one process (trafgen pins it to CPU 0); the gateway's work for each frame runs
        # in that process's send, on that CPU. --no-sock-mem: the socket memory sysctls it
        # would raise exist only in the initial namespace. -C: no CPU statistics at exit.
        return [
            "trafgen", "--dev", lab.wan[0].interface, "--cpus", "1", "--no-sock-mem", "-C",
            "--num", str(MAX_FLOWS), trafgen_packet(lab, destination),
        ]  # fmt: skip
    return [
        "hping3", "--udp", "--flood", "-q", "-p", str(TARGET), "-s", str(FIRST_SOURCE_PORT),
        destination,
    ]  # fmt: skip


def linear_frames(lab: Lab) -> None:
    """Make wan1 hand the gateway each frame in one piece, as a NIC's receive path would."""
    # trafgen's ring frames carry all but the Ethernet header in a page fragment, and the
    # gateway's conntrack and NAT leave the UDP header there: each nftables payload load
    # (`th dport`) then copies it out instead of reading it in place, which doubles the cost
    # of a 5,000-rule walk (miniupnpd: 2,400 new flows/s instead of 4,600, docs/performance.md).
    # Without scatter-gather on wan1's interface the kernel linearizes each frame as it
    # leaves wan1, at the sender's cost.
    lab.run(lab.wan[0], ["ethtool", "-K", lab.wan[0].interface, "sg", "off"])


def sample(lab: Lab) -> tuple[float, int]:
    """(time, datagrams at lan1), the time taken halfway through the read."""
    before = time.monotonic()
    count = delivered(lab)
    return (before + time.monotonic()) / 2, count


def conntrack_count(lab: Lab) -> int:
    """Entries in the gateway's conntrack table."""
    out = lab.run(lab.gateway, ["conntrack", "-C"], check=False).stdout.strip()
    return int(out) if out.isdigit() else 0


def flood(
    lab: Lab, seconds: float, generator: str = "trafgen", destination: str | None = None
) -> tuple[float, bool]:
    """One bounded flood: new flows per second the gateway translated to lan1 within the
    window, and whether some datagrams repeated a flow."""
    lab.run(lab.gateway, ["conntrack", "-F"], check=False)
    lab.run(lab.lan[0], ["nft", "-f", "-"], input=SINK)
    time.sleep(0.05)
    argv = generator_argv(lab, generator, destination or lab.gateway.external_address)
    limit = WARMUP + seconds + TAIL
    proc = lab.popen(
        lab.wan[0],
        ["timeout", "-s", "INT", f"{limit}", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(WARMUP)
        opened, first = sample(lab)
        time.sleep(seconds)
        closed, last = sample(lab)
        running = proc.poll() is None
        # Each datagram that reached lan1 is a flow the gateway admitted and translated, and a
        # new one if the gateway's conntrack holds at least as many entries.
        repeated = conntrack_count(lab) < 0.99 * last
    finally:
        output, _ = proc.communicate(timeout=limit + 10)
    if not running:
        raise GeneratorError(
            f"{generator} stopped before the window closed (exit {proc.returncode});"
            f" more than {MAX_FLOWS:,} datagrams, or an error: {output.strip()[-500:]}"
        )
    return (last - first) / (closed - opened), repeated


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
    generator: str = "trafgen",
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
    runs = [
        await asyncio.to_thread(flood, lab, seconds, generator, destination) for _ in range(repeats)
    ]
    await backend.close(flush=True)
    name = "igd, 2nd address" if addressed else "igd"
    return Case(name, size, counters, filters, tuple(r for r, _ in runs), any(s for _, s in runs))


def miniupnpd_case(
    lab: Lab, size: int, *, seconds: float, repeats: int, generator: str = "trafgen"
) -> Case:
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
        runs = [flood(lab, seconds, generator) for _ in range(repeats)]
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
        note = " (flows repeated)" if c.repeated else ""
        runs = ", ".join(f"{r:,.0f}" for r in c.rates)
        ratio = f"{c.rate / base:.2f}\N{MULTIPLICATION SIGN}" if base else "-"
        lines.append(
            f"| {c.gateway} | {c.mappings:,} | {'on' if c.counters else 'off'} |"
            f" {'yes' if c.filters else 'no'} | {c.rate:,.0f}{note} | {runs} | {ratio} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> list[Case]:
    cases: list[Case] = []
    with Lab(prefix=PREFIX, wan_network=PUBLIC_LOOKING_WAN) as lab:
        if args.generator == "trafgen":
            linear_frames(lab)
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
                        generator=args.generator,
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
                lab,
                args.miniupnpd_size,
                seconds=args.seconds,
                repeats=args.repeats,
                generator=args.generator,
            )
            say(f"miniupnpd {case.mappings:,} rules: {case.rate:,.0f} new flows/s")
            cases.append(case)
    return cases


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (other work shares its cores)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
        help="length of each flood's measuring window (default %(default)s)",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default=GENERATORS[0],
        help="the load generator on wan1, for igd and miniupnpd alike (default %(default)s)",
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
    say(f"load average at the start: {load_average()}")
    cases = run(args, say)
    print(
        f"bench_datapath, {started}, {platform.node()}, Linux {platform.release()},"
        f" generator {args.generator}, load average {load_average()}\n"
    )
    print(markdown(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
