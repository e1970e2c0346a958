"""The data-path benchmark's machinery, small: one size, one short flood per case."""

from __future__ import annotations

import argparse

from lab.bench_datapath import markdown, run


def test_bench_datapath_measures_flows_through_the_mapping() -> None:
    args = argparse.Namespace(
        sizes=(100,),
        seconds=0.2,
        repeats=1,
        miniupnpd_size=0,
        addressed=True,
        generator="trafgen",
    )
    cases = run(args, lambda line: None)
    assert [(c.gateway, c.mappings, c.counters, c.filters) for c in cases] == [
        ("igd", 100, True, False),
        ("igd", 100, False, False),
        ("igd", 100, True, True),
        ("igd, 2nd address", 100, True, False),
        ("igd, 2nd address", 100, True, True),
    ]
    # Flows reach the LAN host through the DNAT: what arrives there is what is counted.
    assert all(c.rate > 1000 for c in cases), cases
    # trafgen's source address and port counters make every datagram a flow of its own.
    assert not any(c.repeated for c in cases), cases
    assert "| igd | 100 | on | yes |" in markdown(cases)
