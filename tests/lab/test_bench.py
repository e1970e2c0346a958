"""The benchmark's machinery (igd/lab/bench.py), small and fast: that it measures what it says,
not how fast anything is (speed targets are checked by running the benchmark itself)."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from igd.decision import Allow, Deny
from igd.lab import list_netns
from igd.lab.bench import (
    LOAD_FIRST_PORT,
    PREFIX,
    BenchError,
    Sample,
    Settings,
    bench_policy,
    buckets,
    main,
    preload,
    run_bench,
    summarize,
)
from igd.model import MapRequest, Mechanism, Protocol
from igd.policy import Policy
from igd.policy_file import DEFAULTS_NAME
from igd.table import MappingTable

LAN_HOST = IPv4Address("192.168.77.10")


def request(client: IPv4Address = LAN_HOST, port: int = 10000, **changes: object) -> MapRequest:
    fields: dict[str, object] = {
        "mechanism": Mechanism.NATPMP,
        "client": client,
        "protocol": Protocol.TCP,
        "internal_address": client,
        "internal_port": port,
        "external_port": port,
        "lifetime": 3600,
    }
    fields.update(changes)
    return MapRequest(**fields)  # type: ignore[arg-type]


def test_bench_policy_lets_one_lan_host_hold_the_largest_run() -> None:
    policy = Policy.load(bench_policy())
    assert (policy.defaults.max_mappings, policy.defaults.max_mappings_per_client) == (
        100_000,
        100_000,
    )
    full = MappingTable()
    for mapping in preload(53_000, [LAN_HOST], range(0), now=0.0):
        full.put(mapping)
    granted = policy.evaluate(request(), full, now=0.0)
    assert isinstance(granted, Allow) and granted.rule == "bench LAN to self"
    for refused in (
        request(port=80),  # privileged ports stay refused
        request(client=IPv4Address("10.0.0.5")),  # not the lab LAN
        request(internal_address=IPv4Address("192.168.77.20")),  # secure mode
    ):
        assert isinstance(policy.evaluate(refused, full, now=0.0), Deny)
    assert policy.evaluate(request(port=80), full, now=0.0).rule == DEFAULTS_NAME


def test_preload_spreads_owners_and_keeps_off_the_loads_ports() -> None:
    owners = [IPv4Address(f"192.168.77.{i}") for i in range(20, 30)]
    load_ports = range(LOAD_FIRST_PORT, LOAD_FIRST_PORT + 3000)
    mappings = preload(50_000, owners, load_ports, now=100.0)
    assert len({m.key for m in mappings}) == 50_000
    assert {m.protocol for m in mappings} == {Protocol.TCP, Protocol.UDP}
    assert not any(m.external_port in load_ports for m in mappings)
    assert not any(m.external_port in (5350, 5351) for m in mappings)
    assert all(m.internal_address == m.owner.client for m in mappings)
    assert {m.owner.client for m in mappings} == set(owners)
    with pytest.raises(BenchError):
        preload(130_000, owners, load_ports, now=100.0)


def test_stats_and_buckets_follow_the_table_each_request_met() -> None:
    # Five requests, 10 ms each, back to back; the third is refused (code 4), the fifth
    # unanswered: the table grows only with successes.
    samples = [
        Sample(0.00, 0.010, 0),
        Sample(0.01, 0.010, 0),
        Sample(0.02, 0.010, 4),
        Sample(0.03, 0.010, 0),
        Sample(0.04, 0.020, -1),
    ]
    stats = summarize(samples)
    assert (stats.count, stats.ok, stats.failed, stats.lost) == (5, 3, 1, 1)
    assert stats.seconds == pytest.approx(0.06)
    assert stats.rps == pytest.approx(4 / 0.06)  # answered requests only
    assert stats.p50_ms == pytest.approx(10.0)
    found = buckets(samples, width=2)
    assert [(b.low, b.high, b.stats.count) for b in found] == [(0, 2, 2), (2, 3, 3)]


def test_a_small_run_against_both_gateways() -> None:
    prefix = f"{PREFIX}{secrets.token_hex(3)}"
    settings = Settings(
        sizes=(0, 200), requests=100, seconds=20, miniupnpd_seconds=3, prefix=prefix
    )
    report = run_bench(settings, lambda line: None)
    assert [run.size for run in report.igd] == [0, 200]
    for run in report.igd:
        assert (run.load.count, run.load.ok, run.load.lost) == (100, 100, 0)
        for start in (run.cold, run.warm):
            assert start.restored == start.persisted == start.kernel == run.size
            assert 0 <= start.restore_s < start.ready_s
        assert run.kernel_after == run.size + 100
        assert run.load.rps > 0 and run.load.p50_ms <= run.load.p99_ms
        assert 10 < run.rss_mb < 1000
    mini = report.miniupnpd
    assert mini is not None, "miniupnpd-nftables is not installed: run ./dev.sh setup"
    assert mini.load.ok > 0 and mini.load.ok == mini.kernel_rules
    assert mini.buckets[0].low == 0 and sum(b.stats.count for b in mini.buckets) == mini.load.count
    text = report.markdown()
    assert "| table size | igd req/s | igd p50 ms | igd p99 ms" in text
    assert "\n| 0 | " in text and "\n| 200 | " in text
    assert f"miniupnpd {mini.version}" in text
    assert not [ns for ns in list_netns() if ns.startswith(prefix)]


def test_the_command_prints_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "results.md"
    argv = ["--sizes", "0", "--requests", "20", "--miniupnpd-seconds", "0", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed == output.read_text()
    assert "\n| 0 | " in printed and "miniupnpd: skipped." in printed
