"""`python -m lab.bench_repair`: how fast igd-server repairs its table after a firewall reload.

In one namespace lab: for each size, a fresh daemon starts over a lease store preloaded with
that many mappings plus one target (TCP TARGET to a listener on lan1). Then, `--repeats`
times for each loss (`nft flush ruleset`, `nft delete table ip igd`), the bench runs the loss
in the gateway and measures from just before it:

- forwarding: until the target's DNAT element is back (a poller in the gateway asks the
  kernel every few ms). The daemon writes every forwarding element in one transaction, so
  that element back means all are back; the bench checks the count afterwards;
- reach: until a new TCP connection from wan1 to the external address and TARGET reaches
  lan1's listener again (wan1 tries a new connection every few ms; while the table is gone
  the gateway itself answers with a reset);
- counters: until the target's counter element is back (written after the forwarding).

The daemon's own log line gives its view (from notification to forwarding, and to done).
Every process is bounded in time; traffic stays between the lab's hosts. Results with
machine and date: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from igd.model import Mapping, MappingKey, Mechanism, Owner, Protocol
from igd.server.store import POLICY_KEY, Clock, LeaseStore, file_digest
from lab import Lab, LabError
from lab.bench import (
    LIMITS,
    PRELOAD_LEASE,
    BenchError,
    bench_policy,
    kernel_entries,
    preload,
    preload_owners,
    start_daemon,
)
from lab.bench_report import Machine
from lab.demo import log_tail

PREFIX = "igdrep"
TABLE = "igd"
TARGET = 40000
DEFAULT_SIZES = (0, 10_000, 50_000)
DEFAULT_REPEATS = 3
LOSSES = {
    "flush ruleset": ["nft", "flush", "ruleset"],
    "delete table": ["nft", "delete", "table", "ip", TABLE],
}
WINDOW = 6.0  # seconds each probe runs: before the loss, and for the repair after it
LEAD = 0.7  # seconds the probes run before the loss
RESTORED = re.compile(
    r"table restored with (\d+) mappings in (\d+) ms(?:, forwarding after (\d+) ms)?"
)

# On lan1: accept and close connections to TARGET until the deadline.
_LISTEN = r"""
import socket, sys, time
end = time.monotonic() + float(sys.argv[1])
s = socket.create_server(("0.0.0.0", int(sys.argv[2])), backlog=512)
s.settimeout(0.2)
while time.monotonic() < end:
    try:
        c, _ = s.accept()
    except TimeoutError:
        continue
    c.close()
"""

# On wan1: a new TCP connection every few ms for `seconds`; prints [[monotonic s when the
# attempt ended, ok], ...].
_CONNECT = r"""
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    try:
        socket.create_connection((host, port), timeout=0.05).close()
        ok = True
    except OSError:
        ok = False
    out.append((time.monotonic(), ok))
    time.sleep(0.002)
print(json.dumps(out))
"""

# In the gateway: whether the target's DNAT and counter elements are in the kernel, every
# few ms for `seconds` (one GETSETELEM each, ~0.1 ms); prints [[monotonic s at the answer,
# dnat present, counter present], ...].
_POLL = r"""
import json, socket, sys, time
from igd.server.backends.netlink import NETLINK_NETFILTER, encode_get, parse_replies
table, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
key = bytes((6, 0, 0, 0)) + port.to_bytes(2, "big") + bytes(2)
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
sock.bind((0, 0))
sock.settimeout(1.0)
seq, out, end = 0, [], time.monotonic() + seconds
def present(name):
    global seq
    seq += 1
    sock.send(encode_get(table, name, key, seq))
    while True:
        for reply in parse_replies(sock.recv(65536)):
            if reply.seq == seq:
                return reply.errno == 0
while time.monotonic() < end:
    row = (present("portmap"), present("counted"))
    out.append((time.monotonic(), *row))
    time.sleep(0.002)
print(json.dumps(out))
"""


@dataclass(frozen=True, slots=True)
class Repair:
    """One loss and its repair, seconds from just before the loss."""

    loss: str
    forwarding: float
    reach: float
    counters: float
    daemon_forwarding_ms: float | None
    daemon_total_ms: float


def first_after(samples: list[list[object]], since: float, column: int) -> float:
    """Seconds from `since` to the first sample with `column` true after one with it false;
    NaN if no sample after `since` saw it false (the gap fell between two samples)."""
    gone = False
    for row in samples:
        t = float(row[0])  # type: ignore[arg-type]
        if t < since:
            continue
        if not row[column]:
            gone = True
        elif gone:
            return t - since
    if gone or not samples or float(samples[-1][0]) < since:  # type: ignore[arg-type]
        raise BenchError(f"not repaired within the window (column {column}): {samples[-3:]}")
    return math.nan


def target_mapping(lab: Lab, now: float) -> Mapping:
    """TCP TARGET to lan1's listener, held by lan1."""
    owner = IPv4Address(lab.lan[0].address)
    return Mapping(
        MappingKey(Protocol.TCP, TARGET),
        owner,
        TARGET,
        Owner(Mechanism.NATPMP, owner),
        now,
        now + PRELOAD_LEASE,
    )


def measure(lab: Lab, loss: str, size: int) -> Repair:
    """Run `loss` in the gateway with the probes going; the repair's times."""
    python = [sys.executable, "-c"]
    probe = lab.popen(
        lab.wan[0],
        [*python, _CONNECT, lab.gateway.external_address, str(TARGET), str(WINDOW)],
        stdout=subprocess.PIPE,
        text=True,
    )
    poll = lab.popen(
        lab.gateway,
        [*python, _POLL, TABLE, str(TARGET), str(WINDOW)],
        stdout=subprocess.PIPE,
        text=True,
    )
    log = lab.gateway_log_path
    offset = log.stat().st_size
    time.sleep(LEAD)
    since = time.monotonic()
    lab.run(lab.gateway, LOSSES[loss])
    reached, polled = (json.loads(p.communicate(timeout=WINDOW + 60)[0]) for p in (probe, poll))
    match = None
    for _ in range(200):
        with log.open("rb") as f:
            f.seek(offset)
            match = RESTORED.search(f.read().decode(errors="replace"))
        if match:
            break
        time.sleep(0.05)
    if match is None:
        raise BenchError(f"no restore logged after {loss}\n{log_tail(lab)}")
    held = kernel_entries(lab)
    if held != size + 1:
        raise BenchError(f"after {loss}: the kernel holds {held} mappings, not {size + 1}")
    return Repair(
        loss,
        forwarding=first_after(polled, since, 1),
        reach=first_after(reached, since, 1),
        counters=first_after(polled, since, 2),
        daemon_forwarding_ms=float(match.group(3)) if match.group(3) else None,
        daemon_total_ms=float(match.group(2)),
    )


def run_size(lab: Lab, size: int, repeats: int, say: Callable[[str], None]) -> list[Repair]:
    """A daemon over `size` preloaded mappings (and the target); every loss `repeats` times."""
    state = lab.workdir / f"state-{size}"
    now = time.monotonic()
    policy = bench_policy()
    store = LeaseStore(state / "leases.sqlite")
    try:
        held = preload(size, preload_owners(lab), range(TARGET, TARGET + 1), now=now)
        store.apply([], [*held, target_mapping(lab, now)], Clock(mono=now))
        store.set_meta(POLICY_KEY, file_digest(Path(policy)))
    finally:
        store.close()
    config = lab.write_gateway_config(
        policy,
        filename=f"gateway-{size}.toml",
        state={"directory": str(state)},
        limits=LIMITS,
        nftables={"table": TABLE, "on_stop": "flush"},
    )
    start = start_daemon(lab, config)
    say(f"{size:,}: start-up restored {start.restored:,} in {start.restore_s:.3f} s")
    listener = lab.popen(lab.lan[0], [sys.executable, "-c", _LISTEN, "3600", str(TARGET)])
    runs = []
    try:
        for _ in range(repeats):
            for loss in LOSSES:
                run = measure(lab, loss, size)
                say(
                    f"{size:,} {loss}: forwarding {run.forwarding * 1000:.0f} ms, reach"
                    f" {run.reach * 1000:.0f} ms, counters {run.counters * 1000:.0f} ms"
                    f" (daemon: {run.daemon_forwarding_ms} / {run.daemon_total_ms} ms)"
                )
                runs.append(run)
    finally:
        listener.kill()
        listener.wait()
        if lab.stop_gateway() != 0:
            say(f"igd-server did not stop cleanly\n{log_tail(lab)}")
    return runs


def spread(values: Sequence[float]) -> str:
    """`median (min-max)` in ms, over the runs whose probe saw the gap (and how many did
    not, if any)."""
    ms = [v * 1000 for v in values if not math.isnan(v)]
    unseen = len(values) - len(ms)
    note = f", {unseen} gap unseen" if unseen else ""
    if not ms:
        return f"gap unseen ({unseen} runs)"
    return f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f}{note})"


def report(results: dict[int, list[Repair]], repeats: int) -> str:
    """The markdown table: median (min-max) ms per size and loss."""
    m = Machine.here()
    lines = [
        f"Machine: {m.cpu}, {m.cores} cores, Linux {m.kernel}, Python {m.python}, {m.nft};"
        f" {m.date}. {repeats} repeats each; ms from just before the loss,"
        " median (min-max).",
        "",
        "| mappings | loss | forwarding back | WAN connection reaches LAN | counters back"
        " | daemon: forwarding / done |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for size, runs in results.items():
        for loss in LOSSES:
            mine = [r for r in runs if r.loss == loss]
            fwd = [r.daemon_forwarding_ms or r.daemon_total_ms for r in mine]
            lines.append(
                f"| {size:,} | `{loss}` | {spread([r.forwarding for r in mine])}"
                f" | {spread([r.reach for r in mine])} | {spread([r.counters for r in mine])}"
                f" | {statistics.median(fwd):.0f} /"
                f" {statistics.median([r.daemon_total_ms for r in mine]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: build a lab, measure each size, print the report."""
    parser = argparse.ArgumentParser(prog="python -m lab.bench_repair", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    args = parser.parse_args(argv)
    try:
        sizes = [int(word.replace("_", "")) for word in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: want comma-separated integers, not {args.sizes!r}")
    if any(s < 0 for s in sizes) or not 1 <= args.repeats <= 20:
        parser.error("sizes must be >= 0 and --repeats 1..20")

    def say(line: str) -> None:
        print(f"bench_repair: {line}", file=sys.stderr, flush=True)

    try:
        with Lab(f"{PREFIX}{secrets.token_hex(3)}", wan_hosts=1, lan_hosts=1) as lab:
            results = {size: run_size(lab, size, args.repeats, say) for size in sizes}
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        say(f"FAILED: {exc}")
        return 1
    print(report(results, args.repeats), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
