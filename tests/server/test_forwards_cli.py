"""`igd-server forwards export`: the documented mapping table, offline and with --all."""

import asyncio
import csv
import io
import json
from pathlib import Path

import pytest

from igd.server.cli import format_mappings, main
from igd.server.control import ControlServer

POLICY = """
[[forwards]]
name = "customer portal"
protocols = ["tcp"]
external_ports = "443"
internal_address = "192.168.2.100"
internal_port = 8443
remote_hosts = ["198.51.100.0/24", "203.0.113.7"]
until = "2027-01-31T18:00:00Z"
owner = "ops@example.com"
purpose = "portal for customers | partners"

[[forwards]]
name = "game"
protocols = ["udp", "tcp"]
external_ports = "27000-27002"
internal_address = "192.168.2.20"
internal_port = 37000
"""


def export(tmp_path: Path, *extra: str) -> list[str]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    return ["forwards", "export", "--policy", str(policy), *extra]


def test_csv_has_one_row_per_forward_and_protocol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(export(tmp_path, "--format", "csv")) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["name"], r["protocol"], r["public_port"], r["internal_port"]) for r in rows] == [
        ("customer portal", "tcp", "443", "8443"),
        ("game", "tcp", "27000-27002", "37000-37002"),
        ("game", "udp", "27000-27002", "37000-37002"),
    ]
    portal = rows[0]
    assert portal["allowed_sources"] == "198.51.100.0/24, 203.0.113.7/32"
    assert (portal["owner"], portal["until"]) == ("ops@example.com", "2027-01-31T18:00:00Z")
    assert rows[1]["allowed_sources"] == "any"


def test_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(export(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| name | kind | protocol |")
    assert "portal for customers \\| partners" in lines[2]
    assert main(export(tmp_path, "--format", "json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["allowed_sources"] == ["198.51.100.0/24", "203.0.113.7/32"]


def test_a_bad_policy_file_is_reported_like_policy_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text('[[forwards]]\nname = "x"\nprotocol = ["tcp"]\n')
    assert main(["forwards", "export", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml:3: forwards[0].protocol: unknown key 'protocol'" in err
    assert "(did you mean 'protocols'?)" in err


async def test_all_adds_the_running_daemons_dynamic_mappings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket = tmp_path / "control.sock"
    listing = [
        {
            "protocol": "tcp",
            "external_port": 443,
            "remote_host": None,
            "internal_address": "192.168.2.100",
            "internal_port": 8443,
            "lease_remaining": 0,
            "mechanism": "static",
            "client": "0.0.0.0",
            "description": "customer portal",
            "remote_sources": ["198.51.100.0/24", "203.0.113.7/32"],
        },
        {
            "protocol": "udp",
            "external_port": 51413,
            "remote_host": None,
            "internal_address": "192.168.2.30",
            "internal_port": 51413,
            "lease_remaining": 3600,
            "mechanism": "natpmp",
            "client": "192.168.2.30",
            "description": "",
            "remote_sources": [],
        },
    ]

    async def listed(args: object) -> object:
        return listing

    async def status(args: object) -> object:
        return {"external_address": "192.0.2.1"}

    server = ControlServer(socket, {"list": listed, "status": status})
    await server.start()
    try:
        args = export(tmp_path, "--all", "--socket", str(socket), "--format", "json")
        assert await asyncio.to_thread(main, args) == 0
    finally:
        await server.close()
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["public_port"]) for r in rows] == [
        ("static", "443"),
        ("static", "27000-27002"),
        ("static", "27000-27002"),
        ("natpmp", "51413"),
    ]
    assert {r["public_address"] for r in rows} == {"192.0.2.1"}
    assert rows[3]["owner"] == "client 192.168.2.30"
    assert rows[3]["until"].endswith("Z")


def test_all_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = export(tmp_path, "--all", "--socket", str(tmp_path / "none.sock"))
    assert main(args) == 3
    assert "not running" in capsys.readouterr().err


def test_list_shows_a_forwards_sources_and_no_lease() -> None:
    row = {
        "protocol": "tcp",
        "external_port": 443,
        "remote_host": None,
        "internal_address": "192.168.2.100",
        "internal_port": 8443,
        "lease_remaining": 0,
        "mechanism": "static",
        "client": "0.0.0.0",
        "description": "customer portal",
        "remote_sources": ["198.51.100.0/24"],
    }
    line = format_mappings([row]).splitlines()[1].split()
    assert line[:6] == ["tcp", "443", "only", "from", "198.51.100.0/24", "192.168.2.100:8443"]
    assert line[6:10] == ["-", "0", "0", "static"]  # lease, packets, bytes, mechanism
