"""Rate-limited logging: one line per interval, the next one carrying how many went unsaid."""

from __future__ import annotations

import logging

import pytest

from igd.server.ratelog import RateLimitedLog


def test_one_line_per_interval_with_the_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    bad = RateLimitedLog(logging.getLogger("test.ratelog"), logging.INFO, interval=60)
    for second in range(100):  # one bad datagram a second for 100 s
        bad.note(float(second), "bad datagram from %s", "192.168.1.9")
    assert bad.count == 100
    assert [r.getMessage() for r in caplog.records] == [
        "bad datagram from 192.168.1.9",
        "bad datagram from 192.168.1.9 (and 59 more like it since the previous such line)",
    ]
