"""Finding gateways: every default route from the routing table."""

from __future__ import annotations

from pathlib import Path

from igd.client.discovery import default_routes


def test_every_default_route_is_read_best_metric_first(tmp_path: Path) -> None:
    # /proc/net/route: addresses little-endian hex; flags 0x3 = UP|GATEWAY.
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t634DA8C0\t0003\t0\t0\t10\t00000000\t0\t0\t0\n"
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t5\t00000000\t0\t0\t0\n"
        "eth0\t004DA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth1\t0000000A\t0100000A\t0003\t0\t0\t0\t000000FF\t0\t0\t0\n"
    )
    routes = default_routes(table)
    assert [(str(r.address), r.interface, r.default) for r in routes] == [
        ("192.168.1.1", "wlan0", True), ("192.168.77.99", "eth0", False),
    ]  # fmt: skip
