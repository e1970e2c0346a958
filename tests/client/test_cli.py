"""The `igd` command line, as a user runs it."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from igd.client.cli import build_parser
from igd.model import Protocol


def test_version_is_the_installed_package_version() -> None:
    script = Path(sys.executable).parent / "igd"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout == f"igd {version('igd')}\n"


def test_global_options_are_accepted_before_and_after_the_subcommand() -> None:
    parser = build_parser()
    after = parser.parse_args(["list", "--json", "--timeout", "3", "--gateway", "192.0.2.1"])
    before = parser.parse_args(["--json", "--timeout", "3", "--gateway", "192.0.2.1", "list"])
    for args in (after, before):
        assert (args.json, args.timeout, args.gateway, args.command) == (
            True, 3.0, "192.0.2.1", "list",
        )  # fmt: skip
    # Given only before the subcommand, the subcommand's defaults do not overwrite them.
    mapped = parser.parse_args(["-v", "--state-file", "/tmp/s.json", "map", "8080/udp"])
    assert (mapped.verbose, mapped.state_file, mapped.port) == (
        1,
        "/tmp/s.json",
        (8080, Protocol.UDP),
    )
    plain = parser.parse_args(["probe"])
    assert (plain.json, plain.timeout, plain.gateway, plain.verbose) == (False, 10.0, None, 0)


def test_usage_errors_exit_2_with_a_message() -> None:
    script = Path(sys.executable).parent / "igd"
    result = subprocess.run(
        [script, "map", "70000/tcp", "--json"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "port 70000 is not in 1..65535" in result.stderr


def test_a_pinhole_with_a_port_choice_or_over_natpmp_is_a_usage_error(tmp_path: Path) -> None:
    # A pinhole opens the internal port itself, and NAT-PMP has no IPv6: refused before
    # anything is sent (the gateway named is loopback, the state file a scratch one).
    script = Path(sys.executable).parent / "igd"
    base = [str(script), "--gateway", "127.0.0.1", "--state-file", str(tmp_path / "s.json"), "map"]
    for extra, message in (
        (["--ipv6", "--exact"], "no --external-port or --exact"),
        (["--both", "--external-port", "9000"], "no --external-port or --exact"),
        (["--ipv6", "--via", "natpmp"], "natpmp cannot open this pinhole"),
    ):
        result = subprocess.run(
            [*base, "8080/tcp", *extra], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.json").exists()
