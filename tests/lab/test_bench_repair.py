"""The repair benchmark's machinery, small: one size, each loss once."""

from __future__ import annotations

import math

import pytest

from lab import Lab
from lab.bench import BenchError
from lab.bench_repair import LOSSES, first_after, report, run_size


def test_first_after_times_the_return_after_a_loss_seen_after_since() -> None:
    samples: list[list[object]] = [[1.0, True], [2.0, False], [2.5, False], [3.0, True]]
    assert first_after(samples, 1.5, 1) == 1.5
    # A loss before `since` is not this one; none seen after it: the gap fell between samples.
    assert math.isnan(first_after([[1.0, False], [2.0, True], [3.0, True]], 1.5, 1))
    with pytest.raises(BenchError, match="not repaired"):
        first_after([[1.0, True], [2.0, False]], 1.5, 1)


def test_bench_repair_sees_every_mapping_come_back_after_each_loss() -> None:
    with Lab(wan_hosts=1, lan_hosts=1) as lab:
        runs = run_size(lab, 200, 1, lambda line: None)
    assert [r.loss for r in runs] == list(LOSSES)
    for run in runs:  # the kernel held all 201 afterwards, or run_size would have raised
        assert run.daemon_forwarding_ms is not None
        assert run.daemon_forwarding_ms <= run.daemon_total_ms
        assert math.isnan(run.reach) or run.reach > 0
    assert "| 200 | `flush ruleset` |" in report({200: runs}, 1)
