"""What `python -m lab.bench` measured: statistics of the load's requests, the results of
each gateway run, the target verdicts and the markdown report (docs/performance.md)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from igd.model import Mechanism
from igd.proto.natpmp import NatPmpResult
from igd.proto.pcp import PcpResult

# Targets from the issues, for this 2-core machine; the rate and cost targets hold for every
# mechanism the load speaks.
TARGET_RATE, TARGET_RATE_SIZE = 2000.0, 10_000
TARGET_COST_RATIO, TARGET_COST_SIZE = 1.5, 50_000
TARGET_RESTORE_S, TARGET_RESTORE_SIZE = 2.0, 50_000
TARGET_RSS_MB, TARGET_RSS_SIZE = 150.0, 50_000

LOAD_MECHANISMS = (Mechanism.NATPMP, Mechanism.PCP)  # what the load speaks, in run order
NAMES = {Mechanism.NATPMP: "NAT-PMP", Mechanism.PCP: "PCP"}
_RESULTS: dict[Mechanism, type[NatPmpResult] | type[PcpResult]] = {
    Mechanism.NATPMP: NatPmpResult,
    Mechanism.PCP: PcpResult,
}


# -- statistics (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it was first sent (s from the load's start), its latency, its result."""

    start: float
    latency: float
    result: int  # the protocol's result code; -1 when no answer came after every retransmit


@dataclass(frozen=True, slots=True)
class Stats:
    """A run of consecutive requests, one outstanding at a time."""

    count: int
    ok: int
    failed: int  # answered with a non-zero result code
    lost: int  # never answered
    seconds: float
    rps: float  # answered requests per second
    p50_ms: float
    p99_ms: float
    mean_ms: float
    results: tuple[tuple[int, int], ...] = ()  # (result code, answers with it), by code


@dataclass(frozen=True, slots=True)
class Bucket:
    """Requests that met a table of `low` to `high` mappings (high exclusive unless last)."""

    low: int
    high: int
    stats: Stats


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ascending values (q in 0..1); nan when empty."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summarize(samples: Sequence[Sample]) -> Stats:
    """Counts, rate and latency percentiles of consecutive samples."""
    if not samples:
        return Stats(0, 0, 0, 0, 0.0, 0.0, math.nan, math.nan, math.nan)
    answered = sorted(s.latency for s in samples if s.result >= 0)
    seconds = samples[-1].start + samples[-1].latency - samples[0].start
    codes: dict[int, int] = {}
    for sample in samples:
        if sample.result >= 0:
            codes[sample.result] = codes.get(sample.result, 0) + 1
    return Stats(
        count=len(samples),
        ok=codes.get(0, 0),
        failed=sum(n for code, n in codes.items() if code > 0),
        lost=len(samples) - len(answered),
        seconds=seconds,
        rps=len(answered) / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(answered, 0.50) * 1000,
        p99_ms=percentile(answered, 0.99) * 1000,
        mean_ms=sum(answered) / len(answered) * 1000 if answered else math.nan,
        results=tuple(sorted(codes.items())),
    )


def buckets(samples: Sequence[Sample], width: int, base: int = 0) -> list[Bucket]:
    """Samples grouped by the table size each met: `base` plus the mappings made before it."""
    groups: dict[int, list[Sample]] = {}
    size = base
    for sample in samples:
        groups.setdefault(size // width, []).append(sample)
        size += sample.result == 0
    return [
        Bucket(index * width, min((index + 1) * width, size), summarize(group))
        for index, group in sorted(groups.items())
    ]


def result_name(mechanism: Mechanism, code: int) -> str:
    """The name of a result code of `mechanism` (the number when the protocol has none)."""
    try:
        return _RESULTS[mechanism](code).name
    except ValueError:
        return f"code {code}"


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """One start of igd-server: what it restored, how long that took, what the kernel held."""

    restored: int
    persisted: int
    restore_s: float  # as the daemon logs it: store, table, policy and kernel reconcile
    ready_s: float  # from launching the process to its "ready" line
    kernel: int  # entries in the kernel's maps once ready
    rss_mb: float  # the daemon's resident memory once ready


@dataclass(frozen=True, slots=True)
class Load:
    """One load of one protocol's map requests against a gateway."""

    mechanism: Mechanism
    met: int  # mappings the gateway held when the load began
    stats: Stats
    timeouts: int  # retransmits
    kernel_after: int  # igd: entries in its maps; miniupnpd: DNAT rules in its chain

    @property
    def name(self) -> str:
        """The protocol's name as people write it."""
        return NAMES[self.mechanism]

    def problems(self) -> str:
        """Refusals by result, unanswered requests and retransmits; empty when none."""
        parts = [
            f"{n:,} {result_name(self.mechanism, code)}"
            for code, n in self.stats.results
            if code != 0
        ]
        if self.stats.lost:
            parts.append(f"{self.stats.lost:,} unanswered")
        if self.timeouts:
            parts.append(f"{self.timeouts:,} retransmits")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class IgdRun:
    """igd-server at one preloaded table size: its starts, then one load per protocol."""

    size: int
    cold: Start  # empty kernel table (after a reboot)
    warm: Start  # kernel still holding the mappings (daemon restarted)
    loads: tuple[Load, ...]  # in the order they ran, each adding its mappings
    rss_mb: float  # after the last load

    def load(self, mechanism: Mechanism) -> Load | None:
        """The load of `mechanism`, if it ran."""
        return next((load for load in self.loads if load.mechanism is mechanism), None)

    @property
    def kernel_after(self) -> int:
        """Entries in the kernel's maps after the last load."""
        return self.loads[-1].kernel_after if self.loads else self.warm.kernel


@dataclass(frozen=True, slots=True)
class MiniupnpdRun:
    """miniupnpd, from an empty table, under one protocol's load for a time budget."""

    version: str
    budget_s: float
    load: Load
    buckets: tuple[Bucket, ...]

    def bucket_for(self, size: int) -> Bucket | None:
        """The bucket holding table size `size`, if the run got there."""
        for bucket in self.buckets:
            if bucket.low <= size < bucket.high or size == bucket.low:
                return bucket
        return None


@dataclass(frozen=True, slots=True)
class Machine:
    """What the results were measured on, and when."""

    cpu: str
    cores: int
    kernel: str
    python: str
    nft: str
    date: str

    @classmethod
    def here(cls) -> Machine:
        """This machine, now."""
        cpu = "unknown CPU"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False)
        return cls(
            cpu=cpu,
            cores=os.cpu_count() or 0,
            kernel=platform.release(),
            python=platform.python_version(),
            nft=nft.stdout.strip() or "nft not found",
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one benchmark run measured."""

    machine: Machine
    requests: int
    mechanisms: tuple[Mechanism, ...]
    igd: tuple[IgdRun, ...]
    miniupnpd: tuple[MiniupnpdRun, ...] = ()
    miniupnpd_note: str = ""

    def verdicts(self) -> list[tuple[str, str, bool]]:
        """(target, what was measured, met) for each target the measured sizes cover."""
        runs = {run.size: run for run in self.igd}
        out: list[tuple[str, str, bool]] = []
        for mechanism in self.mechanisms:
            out += _load_verdicts(mechanism, runs)
        if (run := runs.get(TARGET_RESTORE_SIZE)) is not None:
            for label, start in (("cold start", run.cold), ("warm restart", run.warm)):
                out.append(
                    (
                        f"restore {TARGET_RESTORE_SIZE:,} leases ≤ {TARGET_RESTORE_S:.0f} s"
                        f" ({label})",
                        f"{start.restore_s:.2f} s (ready {start.ready_s:.2f} s after launch)",
                        start.restore_s <= TARGET_RESTORE_S,
                    )
                )
        if (run := runs.get(TARGET_RSS_SIZE)) is not None:
            out.append(
                (
                    f"RSS ≤ {TARGET_RSS_MB:.0f} MB at {TARGET_RSS_SIZE:,}",
                    f"{run.rss_mb:.0f} MB after the run ({run.kernel_after:,} mappings);"
                    f" {run.cold.rss_mb:.0f} MB after a cold start",
                    run.rss_mb <= TARGET_RSS_MB,
                )
            )
        return out

    def markdown(self) -> str:
        """The results as markdown: main table, miniupnpd by size, starts, targets, machine."""
        m = self.machine
        lines = [*self._main_table(), *self._miniupnpd_table(), *self._starts_table()]
        if verdicts := self.verdicts():
            lines += ["", "| target | measured | verdict |", "| --- | --- | --- |"]
            lines += [f"| {t} | {v} | {'met' if ok else 'NOT met'} |" for t, v, ok in verdicts]
        lines += [
            "",
            f"Machine: {m.cpu}, {m.cores} cores, Linux {m.kernel}, Python {m.python},"
            f" {m.nft}; {m.date}.",
        ]
        return "\n".join(lines) + "\n"

    def _main_table(self) -> list[str]:
        names = [NAMES[mech] for mech in self.mechanisms]
        budgets = ", ".join(f"{run.load.name} {run.budget_s:.0f} s" for run in self.miniupnpd)
        lines = [
            f"{' and '.join(names)} map requests, one outstanding, {self.requests:,} new mappings"
            f" per protocol per igd run"
            + (f"; miniupnpd from empty, {budgets}" if budgets else "")
            + ".",
        ]
        if len(self.mechanisms) > 1:
            lines.append(
                f"At each size the loads run in this order ({', '.join(names)}), each adding its"
                f" mappings: the {names[-1]} load meets the size plus"
                f" {self.requests * (len(names) - 1):,}."
            )
        head = ["table size"]
        for name in names:
            head += [f"igd {name} req/s", f"{name} p50 ms", f"{name} p99 ms"]
        head += [f"miniupnpd {run.load.name} req/s" for run in self.miniupnpd]
        lines += ["", _row(head), _row(["---:"] * len(head))]
        for run in self.igd:
            cells = [f"{run.size:,}"]
            for mechanism in self.mechanisms:
                load = run.load(mechanism)
                cells += (
                    [f"{load.stats.rps:,.0f}", _ms(load.stats.p50_ms), _ms(load.stats.p99_ms)]
                    if load is not None
                    else ["—"] * 3
                )
            for mini in self.miniupnpd:
                bucket = mini.bucket_for(run.size)
                cells.append(
                    f"{bucket.stats.rps:,.0f} ({bucket.low:,}-{bucket.high:,})"
                    if bucket is not None
                    else f"not reached (reached {mini.load.stats.ok:,})"
                )
            lines.append(_row(cells))
        problems = [
            f"{run.size:,} {load.name}: {text}"
            for run in self.igd
            for load in run.loads
            if (text := load.problems())
        ]
        lines += [
            "",
            "igd requests that were refused, unanswered or retransmitted: " + "; ".join(problems)
            if problems
            else "igd: every request was granted at its first send.",
        ]
        return lines

    def _miniupnpd_table(self) -> list[str]:
        if not self.miniupnpd:
            return ["", f"miniupnpd: {self.miniupnpd_note}."] if self.miniupnpd_note else []
        lines = [""]
        for run in self.miniupnpd:
            stats = run.load.stats
            problems = run.load.problems()
            lines.append(
                f"miniupnpd {run.version}, {run.load.name}: {stats.count:,} requests in"
                f" {run.budget_s:.0f} s, {stats.ok:,} granted"
                + (f" ({problems})" if problems else ", no retransmits")
                + f"; {run.load.kernel_after:,} DNAT rules in its chain at the end."
            )
        head = ["mappings"]
        for run in self.miniupnpd:
            name = run.load.name
            head += [f"{name} req/s", f"{name} p50 ms", f"{name} p99 ms"]
        lines += [
            "",
            "miniupnpd by the number of mappings each request met:",
            "",
            _row(head),
            _row(["---:"] * len(head)),
        ]
        by_low = [{bucket.low: bucket for bucket in run.buckets} for run in self.miniupnpd]
        for low in sorted({low for found in by_low for low in found}):
            high = max(found[low].high for found in by_low if low in found)
            cells = [f"{low:,}-{high:,}"]
            for found in by_low:
                if (bucket := found.get(low)) is None:
                    cells += ["—"] * 3
                else:
                    stats = bucket.stats
                    cells += [f"{stats.rps:,.0f}", _ms(stats.p50_ms), _ms(stats.p99_ms)]
            lines.append(_row(cells))
        return lines

    def _starts_table(self) -> list[str]:
        return [
            "",
            "igd-server starts and memory (restore: as the daemon logs it, lease store to kernel):",
            "",
            "| table size | cold start restore s | warm restart restore s | ready after launch s"
            " (cold / warm) | RSS MB when ready (cold / warm) | RSS MB after the run |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {r.size:,} | {r.cold.restore_s:.3f} | {r.warm.restore_s:.3f}"
                f" | {r.cold.ready_s:.2f} / {r.warm.ready_s:.2f}"
                f" | {r.cold.rss_mb:.0f} / {r.warm.rss_mb:.0f} | {r.rss_mb:.0f} |"
                for r in self.igd
            ),
        ]


def _load_verdicts(mechanism: Mechanism, runs: dict[int, IgdRun]) -> list[tuple[str, str, bool]]:
    """The rate and cost targets for the loads of `mechanism`."""
    name = NAMES[mechanism]
    out = []
    rated = runs.get(TARGET_RATE_SIZE)
    if rated is not None and (load := rated.load(mechanism)) is not None:
        out.append(
            (
                f"{name}: ≥ {TARGET_RATE:,.0f} mappings/s with {TARGET_RATE_SIZE:,} existing",
                f"{load.stats.rps:,.0f}/s",
                load.stats.rps >= TARGET_RATE,
            )
        )
    base_run, big_run = runs.get(0), runs.get(TARGET_COST_SIZE)
    base = base_run.load(mechanism) if base_run is not None else None
    big = big_run.load(mechanism) if big_run is not None else None
    if base is not None and big is not None:
        ratio = big.stats.mean_ms / base.stats.mean_ms
        out.append(
            (
                f"{name}: cost per request at {TARGET_COST_SIZE:,} ≤ {TARGET_COST_RATIO}x"
                " cost at 0",
                f"{ratio:.2f}x ({big.stats.mean_ms:.3f} vs {base.stats.mean_ms:.3f} ms mean;"
                f" p50 {big.stats.p50_ms / base.stats.p50_ms:.2f}x)",
                ratio <= TARGET_COST_RATIO,
            )
        )
    return out


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"
