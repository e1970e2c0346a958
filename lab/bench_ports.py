"""Port choice at a full table: the cost of a refusal when no port is free against a grant.

`python -m lab.bench_ports [--mappings 64000] [--rounds 2000]`. Pure (no namespaces, no
kernel): the gateway core alone, with its table filled directly. Prints one line per case
with the median and 99th percentile in microseconds (results in docs/performance.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from igd.gateway import Gateway, Granted, Refused
from igd.model import Mapping, MappingKey, MapRequest, Mechanism, Owner, Protocol
from igd.policy import Policy

POLICY = """
[defaults]
action = "allow"
max_mappings = 100000
max_mappings_per_client = 100000
[[rules]]
name = "high ports"
action = "allow"
external_ports = "1024-65535"
"""
HOLDER = IPv4Address("192.168.1.10")
ASKER = IPv4Address("192.168.1.11")
FIRST = 1024
LAST = 65535


def filled(mappings: int) -> Gateway:
    """A gateway whose table holds `mappings` TCP mappings on ports from 1024 up."""
    gateway = Gateway(Policy.parse(POLICY), rng=random.Random(8))  # noqa: S311 (repeatable runs)
    owner = Owner(Mechanism.NATPMP, HOLDER)
    for port in range(FIRST, FIRST + mappings):
        key = MappingKey(Protocol.TCP, port)
        gateway.table.put(Mapping(key, HOLDER, port, owner, created=0.0, expires=1e9))
    return gateway


def ask(internal_port: int) -> MapRequest:
    return MapRequest(Mechanism.NATPMP, ASKER, Protocol.TCP, ASKER, internal_port, 0, 600)


def timed(rounds: int, step: Callable[[int], None]) -> list[float]:
    samples = []
    for index in range(rounds):
        started = time.perf_counter()
        step(index)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def report(name: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    print(f"{name:<48} median {statistics.median(ordered):8.1f} µs   p99 {p99:8.1f} µs")


def main() -> None:
    """Measure and print the three cases."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mappings", type=int, default=64000)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    span = LAST - FIRST + 1

    # A grant: the asker takes a free port, which is removed again.
    for size in (10000, args.mappings):
        gateway = filled(size)

        def grant(index: int, gateway: Gateway = gateway) -> None:
            result = gateway.map(ask(1 + index % 60000), now=0.0)
            assert isinstance(result, Granted)
            gateway.remove([result.mapping], why="bench")

        report(f"grant at {size} mappings", timed(args.rounds, grant))

    # A refusal: every port of the allowed range is held.
    full = filled(span)

    def refuse(index: int) -> None:
        assert isinstance(full.map(ask(1 + index % 60000), now=0.0), Refused)

    report(f"refusal at {span} mappings (range full)", timed(args.rounds, refuse))

    # The hardest grant: one free port left, found by the fallback search.
    one_left = filled(span)
    one_left.table.remove(MappingKey(Protocol.TCP, 40000))

    def last_port(index: int) -> None:
        result = one_left.map(ask(1 + index % 30000), now=0.0)
        assert isinstance(result, Granted) and result.mapping.external_port == 40000
        one_left.remove([result.mapping], why="bench")

    report(f"grant of the one free port at {span - 1} mappings", timed(args.rounds, last_port))


if __name__ == "__main__":
    main()
