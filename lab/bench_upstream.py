"""Double-NAT benchmark: time from a LAN host's `natpmpc -a` until a WAN host gets through
both NATs, per upstream gateway and mirroring mechanism (docs/upstream.md).

`.venv/bin/python -m lab.bench_upstream [--rounds N]` (root: it builds namespace labs; about
half a minute with the default 5 rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
