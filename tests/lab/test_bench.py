"""The benchmark's machinery (lab/bench.py), small and fast: that it measures what it says,
not how fast anything is (speed targets are checked by running the benchmark itself)."""

from __future__ import annotations

import secrets
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from igd.decision import Allow, Deny
from igd.model import MapRequest, Mechanism, Protocol
from igd.policy import DEFAULTS_NAME, Policy
from igd.proto import natpmp, pcp
from igd.proto.pcp import PcpMapData, PcpOpcode, PcpRequest, PcpResponse, PcpResult
from igd.table import MappingTable
from lab import list_netns
from lab.bench import (
    _LOAD,
    LOAD_FIRST_PORT,
    PREFIX,
    BenchError,
    Settings,
    bench_policy,
    load_ports,
    main,
    preload,
    run_bench,
)
from lab.bench_report import (
    LOAD_MECHANISMS,
    IgdRun,
    Load,
    Machine,
    Report,
    Sample,
    Start,
    buckets,
    summarize,
)

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


def load_generator() -> dict[str, Any]:
    """The load generator's functions, as the LAN host runs them (its main part not run)."""
    namespace: dict[str, Any] = {"__name__": "bench_load"}
    exec(compile(_LOAD, "bench_load", "exec"), namespace)
    return namespace


def test_the_loads_pcp_map_is_what_the_codec_encodes_and_matches_only_its_answer() -> None:
    load, nonce, external = load_generator(), secrets.token_bytes(12), IPv4Address("100.128.7.1")
    wire, answer = load["pcp_map"](str(LAN_HOST), 13000, 3600, nonce)
    data = PcpMapData(nonce, 6, 13000, 13000, pcp.mapped(IPv4Address(0)))
    assert pcp.decode_request(wire) == PcpRequest(PcpOpcode.MAP, 3600, pcp.mapped(LAN_HOST), data)

    def reply(**changes: Any) -> bytes:
        body = replace(data, external_port=40000, external_address=pcp.mapped(external))
        body = replace(body, **changes)
        return pcp.encode_response(PcpResponse(PcpOpcode.MAP, PcpResult.SUCCESS, 3600, 9, body))

    assert answer(reply()) and load["pcp_result"](reply()) == 0
    refused = pcp.encode_error(wire, PcpResult.NOT_AUTHORIZED, lifetime=1800, epoch=9, parsed=True)
    assert answer(refused) and load["pcp_result"](refused) == PcpResult.NOT_AUTHORIZED
    assert not answer(reply(nonce=bytes(12)))  # another request's answer
    assert not answer(reply(internal_port=13001))
    assert not answer(natpmp.encode_response(
        natpmp.NatPmpMapResponse(Protocol.TCP, natpmp.NatPmpResult.SUCCESS, 9, 13000, 13000, 60)
    ))  # fmt: skip
    probe, probed = load["pcp_probe"](str(LAN_HOST))
    assert pcp.decode_request(probe) == PcpRequest(PcpOpcode.ANNOUNCE, 0, pcp.mapped(LAN_HOST))
    assert probed(pcp.encode_response(PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, 9)))


def test_the_loads_natpmp_map_is_what_the_codec_encodes_and_matches_only_its_answer() -> None:
    load = load_generator()
    wire, answer = load["natpmp_map"](10000, 3600)
    assert natpmp.decode_request(wire) == natpmp.NatPmpMapRequest(Protocol.TCP, 10000, 10000, 3600)

    def reply(result: natpmp.NatPmpResult, port: int = 10000) -> bytes:
        response = natpmp.NatPmpMapResponse(Protocol.TCP, result, 9, port, port, 3600)
        return natpmp.encode_response(response)

    assert answer(reply(natpmp.NatPmpResult.SUCCESS))
    assert load["natpmp_result"](reply(natpmp.NatPmpResult.OUT_OF_RESOURCES)) == 4
    assert not answer(reply(natpmp.NatPmpResult.SUCCESS, port=10001))


def test_preload_spreads_owners_and_keeps_off_the_loads_ports() -> None:
    owners = [IPv4Address(f"192.168.77.{i}") for i in range(20, 30)]
    natpmp_ports, pcp_ports = load_ports(Mechanism.NATPMP, 3000), load_ports(Mechanism.PCP, 3000)
    assert (natpmp_ports.start, natpmp_ports.stop) == (LOAD_FIRST_PORT, pcp_ports.start)
    avoid = range(LOAD_FIRST_PORT, pcp_ports.stop)  # as run_igd preloads
    mappings = preload(50_000, owners, avoid, now=100.0)
    assert len({m.key for m in mappings}) == 50_000
    assert {m.protocol for m in mappings} == {Protocol.TCP, Protocol.UDP}
    assert not any(m.external_port in avoid for m in mappings)
    assert not any(m.external_port in (5350, 5351) for m in mappings)
    assert all(m.internal_address == m.owner.client for m in mappings)
    assert {m.owner.client for m in mappings} == set(owners)
    with pytest.raises(BenchError):
        preload(130_000, owners, avoid, now=100.0)


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


def test_each_protocol_is_judged_against_the_same_targets() -> None:
    def load(mechanism: Mechanism, per_request_ms: float) -> Load:
        samples = [Sample(i * per_request_ms / 1000, per_request_ms / 1000, 0) for i in range(10)]
        return Load(mechanism, 0, summarize(samples), 0, 10)

    start = Start(0, 0, 1.0, 1.1, 0, 50.0)
    runs = tuple(
        IgdRun(size, start, start, (load(Mechanism.NATPMP, 0.4), load(Mechanism.PCP, pcp_ms)), 60)
        for size, pcp_ms in ((0, 0.5), (10_000, 0.6), (50_000, 1.0))
    )
    report = Report(Machine("cpu", 2, "6.1", "3.11", "nft", "now"), 10, LOAD_MECHANISMS, runs)
    verdicts = {target: (measured, met) for target, measured, met in report.verdicts()}
    assert verdicts["NAT-PMP: ≥ 2,000 mappings/s with 10,000 existing"] == ("2,500/s", True)
    assert verdicts["PCP: ≥ 2,000 mappings/s with 10,000 existing"] == ("1,667/s", False)
    assert verdicts["NAT-PMP: cost per request at 50,000 ≤ 1.5x cost at 0"][1]
    measured, met = verdicts["PCP: cost per request at 50,000 ≤ 1.5x cost at 0"]
    assert measured.startswith("2.00x") and not met
    assert "| 10,000 | 2,500 | 0.40 | 0.40 | 1,667 | 0.60 | 0.60 |" in report.markdown()


def test_a_small_run_against_both_gateways_with_both_protocols() -> None:
    prefix = f"{PREFIX}{secrets.token_hex(3)}"
    settings = Settings(
        sizes=(0, 200), requests=100, seconds=20, miniupnpd_seconds=2, prefix=prefix
    )
    report = run_bench(settings, lambda line: None)
    assert [run.size for run in report.igd] == [0, 200]
    for run in report.igd:
        for start in (run.cold, run.warm):
            assert start.restored == start.persisted == start.kernel == run.size
            assert 0 <= start.restore_s < start.ready_s
        # NAT-PMP then PCP, each making 100 new mappings the kernel holds.
        assert [load.mechanism for load in run.loads] == [Mechanism.NATPMP, Mechanism.PCP]
        held = run.size
        for load in run.loads:
            assert (load.stats.count, load.stats.ok, load.stats.lost) == (100, 100, 0)
            assert load.stats.results == ((0, 100),)
            assert (load.met, load.kernel_after) == (held, held + 100)
            assert load.stats.rps > 0 and load.stats.p50_ms <= load.stats.p99_ms
            held = load.kernel_after
        assert run.kernel_after == run.size + 200
        assert 10 < run.rss_mb < 1000
    assert [mini.load.mechanism for mini in report.miniupnpd] == [
        Mechanism.NATPMP,
        Mechanism.PCP,
    ], "miniupnpd-nftables is not installed: run ./dev.sh setup"
    for mini in report.miniupnpd:
        # Each protocol's load meets a fresh miniupnpd and every mapping is a DNAT rule (on a
        # busy machine a request may go unanswered and still be granted).
        stats = mini.load.stats
        assert 0 < stats.ok <= mini.load.kernel_after <= stats.ok + stats.lost
        assert mini.buckets[0].low == 0
        assert sum(b.stats.count for b in mini.buckets) == mini.load.stats.count
    text = report.markdown()
    assert (
        "| table size | igd NAT-PMP req/s | NAT-PMP p50 ms | NAT-PMP p99 ms | igd PCP req/s" in text
    )
    assert "\n| 0 | " in text and "\n| 200 | " in text
    assert f"miniupnpd {report.miniupnpd[0].version}, PCP:" in text
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
