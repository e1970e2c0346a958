"""Retransmission, renewal and epoch rules, with time passed in."""

from __future__ import annotations

import itertools

from igd.client.timing import EpochRule, EpochTracker, natpmp_waits, pcp_waits, renew_at


def test_natpmp_waits_double_from_250_ms_nine_times() -> None:
    assert natpmp_waits() == [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]


def test_pcp_waits_follow_irt_and_cap_at_mrt() -> None:
    middle = list(itertools.islice(pcp_waits(lambda: 0.5), 12))  # RAND = 0
    assert middle[:4] == [3.0, 6.0, 12.0, 24.0]
    assert middle[-1] == 1024.0
    low = next(pcp_waits(lambda: 0.0))
    assert abs(low - 2.7) < 1e-9  # RAND = -0.1


def test_first_renewal_between_half_and_five_eighths() -> None:
    assert renew_at(100.0, 7200, 0, now=100.0, jitter=0.0) == 3700.0
    assert renew_at(100.0, 7200, 0, now=100.0, jitter=0.999) < 100 + 7200 * 5 / 8


def test_retries_at_three_quarters_then_seven_eighths_never_sooner_than_4_s() -> None:
    assert renew_at(0.0, 800, 1, now=400.0) == 600.0
    assert renew_at(0.0, 800, 2, now=600.0) == 700.0
    assert renew_at(0.0, 800, 3, now=749.0) == 753.0  # 750 is within 4 s of now
    assert renew_at(0.0, 800, 9, now=801.0) is None  # the lease has run out


def test_short_lab_leases_still_renew_before_expiry() -> None:
    assert renew_at(0.0, 2, 0, now=0.0) == 1.0
    retry = renew_at(0.0, 2, 1, now=1.0)
    assert retry is not None and 1.0 < retry < 2.0


def test_pcp_epoch_first_is_valid_then_consistent_time_is_valid() -> None:
    tracker = EpochTracker(EpochRule.PCP)
    assert tracker.observe(1000, now=50.0)
    assert tracker.observe(1100, now=150.0)
    assert tracker.observe(1101, now=151.5)


def test_pcp_epoch_going_back_means_restart() -> None:
    tracker = EpochTracker(EpochRule.PCP)
    tracker.observe(1000, now=0.0)
    assert not tracker.observe(3, now=10.0)
    assert tracker.observe(13, now=20.0)  # the new epoch is the baseline now


def test_pcp_epoch_running_slow_or_fast_means_restart() -> None:
    slow = EpochTracker(EpochRule.PCP)
    slow.observe(1000, now=0.0)
    assert not slow.observe(1010, now=100.0)  # the server counted 10 s while we counted 100
    fast = EpochTracker(EpochRule.PCP)
    fast.observe(1000, now=0.0)
    assert not fast.observe(1200, now=100.0)


def test_natpmp_epoch_rule_is_seven_eighths() -> None:
    tracker = EpochTracker(EpochRule.NATPMP)
    tracker.observe(100, now=0.0)
    assert tracker.observe(186, now=100.0)  # >= 100 + 87.5 - 2
    assert not tracker.observe(200, now=200.0)  # < 186 + 87.5 - 2
