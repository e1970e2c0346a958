"""Double-NAT benchmarks (docs/upstream.md, results in docs/performance.md); root: they
build namespace labs.

`.venv/bin/python -m lab.bench_upstream [--rounds N]`: time from a LAN host's `natpmpc -a`
until a WAN host gets through both NATs, per upstream gateway and mirroring mechanism (about
half a minute with the default 5 rounds).

`.venv/bin/python -m lab.bench_upstream rate [--existing 0,1000] [--batch 500]`: mirrored
mappings per second with that many mappings already mirrored, per mechanism, against an
igd-server upstream (each batch stops after `--seconds`; about a minute in all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab import TomlValue
from lab.bench import LIMITS, memory_mb
from lab.cascade import CascadeLab, UpstreamSite
from lab.demo import start_service, wait_for_gateway
from lab.miniupnpd import PUBLIC_LOOKING_WAN, Miniupnpd, MiniupnpdOptions

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_POLICY = REPO / "policies" / "lab-upstream.toml"
LAN_POLICY = REPO / "policies" / "lab.toml"
PROBE_TIMEOUT = 10.0
SERVICE = 8080  # the LAN service's port; each round maps another external port to it

# Runs in the WAN host: connects every 2 ms until the LAN service answers, then prints the
# system-wide monotonic clock (the same in every namespace) at that moment.
_PROBE = """
import socket, sys, time
address, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
print("ready", flush=True)
while time.monotonic() < deadline:
    try:
        with socket.create_connection((address, port), timeout=0.5) as s:
            if s.recv(64):
                print(time.monotonic(), flush=True)
                sys.exit(0)
    except OSError:
        time.sleep(0.002)
sys.exit(1)
"""


def time_natpmpc(lab: CascadeLab, port: int) -> float:
    """Seconds from starting `natpmpc -a` in lan1 until wan1 gets through; then deleted."""
    probe = lab.python_popen(
        lab.wan[0], ["-c", _PROBE, lab.upstream.external_address, str(port), str(PROBE_TIMEOUT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert probe.stdout is not None
    if probe.stdout.readline().strip() != "ready":
        raise RuntimeError("the WAN probe did not start")
    started = time.monotonic()
    argv = ["natpmpc", "-g", lab.gateway.address, "-a", str(port), str(SERVICE), "tcp"]
    lab.run(lab.lan[0], [*argv, "600"], timeout=30)
    line = probe.stdout.readline().strip()
    probe.wait(PROBE_TIMEOUT + 5)
    if probe.returncode != 0 or not line:
        raise RuntimeError(f"port {port} not reachable through both NATs")
    lab.run(lab.lan[0], [*argv, "0"], check=False, timeout=30)
    return float(line) - started


@contextmanager
def cascade(upstream: str, mode: str) -> Iterator[CascadeLab]:
    """A two-level lab with `upstream` (igd-server or miniupnpd) and our gateway mirroring
    over `mode`, both answering."""
    network = PUBLIC_LOOKING_WAN if upstream == "miniupnpd" else "203.0.113.0/24"
    with CascadeLab(public_network=network) as lab:
        mini = None
        if upstream == "miniupnpd":
            mini = Miniupnpd(UpstreamSite(lab).as_lab(), MiniupnpdOptions(min_lifetime=2))
            mini.start()
        else:
            lab.start_upstream(lab.write_upstream_config(UPSTREAM_POLICY))
            time.sleep(1.0)  # its sockets; our gateway's probe retries anyway
        try:
            lab.start_gateway(lab.write_gateway_config(LAN_POLICY, upstream={"mode": mode}))
            deadline = time.monotonic() + 20
            while wait_for_gateway(lab) != lab.upstream.external_address:
                if time.monotonic() > deadline:
                    raise RuntimeError("our gateway never reported the public address")
                time.sleep(0.2)
            yield lab
        finally:
            if mini is not None:
                mini.stop()


# -- mirrored mappings per second ------------------------------------------------------------

RATE_FIRST_PORT = 20000  # the rate loads' internal (and suggested external) ports start here
MAX_WINDOW = 16  # igd-server answers at most 16 requests of one client at once (server/pxp.py)
PENDING_LIFETIME = 30  # an answer with at most this lease was not mirrored (server/upstream.py)
RATE_REPLY_WAIT = 10.0  # our gateway's reply_wait: answers wait for the upstream mapping

_BENCH_POLICY = """
[defaults]
action = "deny"
max_lease = 3600
min_lease = 2
max_mappings_per_client = 65535
max_mappings = 65535

[[rules]]
name = "{name}"
action = "allow"
clients = ["{clients}"]
protocols = ["tcp", "udp"]
internal_ports = "1024-65535"
external_ports = "1024-65535"
"""

# Runs in a LAN host: NAT-PMP map requests for `count` new internal ports from `first`, at
# most `window` unanswered at once (retransmitted after 4 s, 3 sends at most), until all are
# answered or `seconds` pass. Prints one JSON object: elapsed seconds, and per answered port
# [result, lifetime, latency s].
_RATE_LOAD = r"""
import json, select, socket, sys, time
from igd.model import Protocol
from igd.proto import natpmp
from igd.proto.natpmp import NatPmpMapRequest, NatPmpMapResponse
gateway, first, count, window, seconds = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((gateway, 5351))
s.setblocking(False)
ports, pending, sends, answers = iter(range(first, first + count)), {}, {}, {}
started = time.monotonic()
deadline = started + seconds
exhausted = False
def send(port):
    s.send(natpmp.encode_request(NatPmpMapRequest(Protocol.TCP, port, port, 3600)))
    pending[port] = time.monotonic()
    sends[port] = sends.get(port, 0) + 1
while time.monotonic() < deadline and (pending or not exhausted):
    while not exhausted and len(pending) < window:
        port = next(ports, None)
        if port is None:
            exhausted = True
        else:
            send(port)
    ready, _, _ = select.select([s], [], [], 0.05)
    now = time.monotonic()
    while ready:
        try:
            data = s.recv(64)
        except BlockingIOError:
            break
        try:
            answer = natpmp.decode_response(data)
        except ValueError:
            continue
        if isinstance(answer, NatPmpMapResponse) and answer.internal_port in pending:
            port = answer.internal_port
            answers[port] = [int(answer.result), answer.lifetime, now - pending.pop(port)]
    for port, sent in list(pending.items()):
        if now - sent > 4.0:
            if sends[port] >= 3:
                del pending[port]
            else:
                send(port)
print(json.dumps({"elapsed": time.monotonic() - started, "answers": answers}))
"""


@dataclass(frozen=True, slots=True)
class Batch:
    """One timed batch of new mappings at one number of mappings already mirrored."""

    mechanism: str
    existing: int
    asked: int
    mirrored: int
    local_only: int
    failed: int
    seconds: float
    latency_ms: float
    rss_mb: float

    @property
    def rate(self) -> float:
        return self.mirrored / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.mechanism}: {self.mirrored}/{self.asked} mirrored at {self.existing:,}"
            f" existing in {self.seconds:.2f} s = {self.rate:.0f}/s, median answer"
            f" {self.latency_ms:.1f} ms, local only {self.local_only}, failed {self.failed},"
            f" gateway RSS {self.rss_mb:.1f} MB"
        )


def load_batch(lab: CascadeLab, first: int, count: int, window: int, seconds: float) -> dict:  # type: ignore[type-arg]
    """Ask for `count` mappings from lan1; the load's JSON report."""
    argv = ["-c", _RATE_LOAD, lab.gateway.address, str(first), str(count), str(window),
            str(seconds)]  # fmt: skip
    out = lab.python(lab.lan[0], argv, timeout=seconds + 30).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def rate_lab(mechanism: str) -> CascadeLab:
    """A cascade with an igd-server upstream and our gateway mirroring over `mechanism`, both
    with policies and flood limits that let thousands of mappings through (started)."""
    lab = CascadeLab(lan_hosts=1).build()
    assert isinstance(lab, CascadeLab)
    try:
        up_policy = lab.workdir / "bench-upstream-policy.toml"
        up_policy.write_text(_BENCH_POLICY.format(name="middle", clients=lab.middle_network))
        lan_policy = lab.workdir / "bench-lan-policy.toml"
        lan_policy.write_text(_BENCH_POLICY.format(name="lan", clients=lab.lan_network))
        lab.start_upstream(lab.write_upstream_config(up_policy, limits=LIMITS))
        time.sleep(1.0)
        upstream: dict[str, TomlValue] = {
            "mode": mechanism, "reply_wait": RATE_REPLY_WAIT, "max_mappings": 65535,
        }  # fmt: skip
        lab.start_gateway(lab.write_gateway_config(lan_policy, limits=LIMITS, upstream=upstream))
        deadline = time.monotonic() + 20
        while wait_for_gateway(lab) != lab.upstream.external_address:
            if time.monotonic() > deadline:
                raise RuntimeError("our gateway never reported the public address")
            time.sleep(0.2)
    except BaseException:
        lab.teardown()
        raise
    return lab


def run_rate(
    mechanism: str, existing: Sequence[int], batch: int, window: int, seconds: float
) -> list[Batch]:
    """Timed batches of `batch` new mappings at each count of mappings already mirrored."""
    results = []
    lab = rate_lab(mechanism)
    try:
        port, held = RATE_FIRST_PORT, 0
        for size in sorted(existing):
            if size > held:  # fill, untimed
                report = load_batch(lab, port, size - held, window, seconds * 4)
                port += size - held
                held += sum(1 for r, life, _ in report["answers"].values()
                            if r == 0 and life > PENDING_LIFETIME)  # fmt: skip
            report = load_batch(lab, port, batch, window, seconds)
            port += batch
            answers = list(report["answers"].values())
            mirrored = [a for a in answers if a[0] == 0 and a[1] > PENDING_LIFETIME]
            local = [a for a in answers if a[0] == 0 and a[1] <= PENDING_LIFETIME]
            process = lab.gateway_process
            assert process is not None
            latencies = [a[2] for a in answers] or [0.0]
            failed = batch - len(mirrored) - len(local)
            results.append(Batch(
                mechanism, held, batch, len(mirrored), len(local), failed,
                report["elapsed"], statistics.median(latencies) * 1000, memory_mb(process.pid),
            ))  # fmt: skip
            held += len(mirrored)
            print(results[-1].line(), flush=True)
    finally:
        lab.teardown()
    return results


def rate_table(results: Sequence[Batch]) -> str:
    """The docs/performance.md table."""
    lines = [
        "| mirrored over | already mirrored | new mappings | mirrored/s | median answer |"
        " gateway RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {b.mechanism} | {b.existing:,} | {b.mirrored}/{b.asked} | {b.rate:,.0f} |"
        f" {b.latency_ms:.1f} ms | {b.rss_mb:.0f} MB |"
        for b in results
    ]
    return "\n".join(lines)


def main_rate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench_upstream rate")
    parser.add_argument("--existing", default="0,1000", help="mappings already mirrored")
    parser.add_argument("--batch", type=int, default=500, help="new mappings timed each time")
    parser.add_argument("--mechanisms", default="pcp,natpmp")
    parser.add_argument("--window", type=int, default=MAX_WINDOW)
    parser.add_argument("--seconds", type=float, default=30.0, help="bound on one batch")
    args = parser.parse_args(argv)
    existing = [int(n) for n in args.existing.split(",")]
    if not 1 <= args.window <= MAX_WINDOW or args.batch < 1 or min(existing) < 0:
        parser.error(f"--window 1..{MAX_WINDOW}, --batch positive, --existing not negative")
    if max(existing) + args.batch * len(existing) > 65535 - RATE_FIRST_PORT:
        parser.error("more ports than the range has")
    results: list[Batch] = []
    for mechanism in args.mechanisms.split(","):
        results += run_rate(mechanism, existing, args.batch, args.window, args.seconds)
    print(rate_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rate"]:
        return main_rate(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    results: dict[str, str] = {}
    for upstream, mode in (
        ("igd-server", "pcp"), ("igd-server", "natpmp"),
        ("miniupnpd", "pcp"), ("miniupnpd", "natpmp"),
    ):  # fmt: skip
        with cascade(upstream, mode) as lab:
            service = start_service(lab, lab.lan[0], SERVICE)
            try:
                samples = [time_natpmpc(lab, 20000 + i) for i in range(args.rounds)]
            finally:
                service.kill()
        name = f"{upstream} upstream, mirrored over {mode}"
        results[name] = (
            f"median {statistics.median(samples) * 1000:.1f} ms"
            f" (min {min(samples) * 1000:.1f}, max {max(samples) * 1000:.1f})"
        )
        print(f"{name}: {results[name]}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
