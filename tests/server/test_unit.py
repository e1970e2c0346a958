"""The files shipped for installing igd-server as a service: the systemd unit passes
`systemd-analyze verify`, and `igd-server init` writes valid, commented examples without ever
replacing an admin's file."""

import shutil
import subprocess
import sys
from pathlib import Path

from igd.policy import Policy
from igd.server.config import Config
from igd.server.examples import Detected, render_unit, write_examples


def igd_server(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "igd-server"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30)


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: ./dev.sh setup installs Debian's systemd"
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    printed = igd_server("unit")
    assert printed.returncode == 0
    assert f"ExecStart={Path(sys.executable).parent / 'igd-server'} run " in printed.stdout
    unit = tmp_path / "igd-server.service"
    unit.write_text(printed.stdout)
    result = verify(unit)
    # verify exits 0 on some mistakes (an unknown Type= is "ignored"): no output is the test.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")
    # ... and it does complain about a broken copy, so the line above can fail.
    unit.write_text(printed.stdout.replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in verify(unit).stderr


def test_unit_runs_unprivileged_with_only_the_capabilities_it_needs() -> None:
    lines = dict(
        line.split("=", 1) for line in render_unit("/bin/true").splitlines() if "=" in line
    )
    assert lines["Type"] == "notify"
    assert lines["DynamicUser"] == "yes" and lines["NoNewPrivileges"] == "yes"
    assert lines["CapabilityBoundingSet"] == lines["AmbientCapabilities"]
    assert set(lines["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert lines["ProtectSystem"] == "strict"
    assert lines["StateDirectory"] == lines["RuntimeDirectory"] == "igd"
    assert lines["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_init_writes_valid_commented_examples(tmp_path: Path) -> None:
    found = Detected("wan0", ("br-lan", "wlan0"))
    written = write_examples(tmp_path / "etc", found)
    assert [(p.name, new) for p, new in written] == [("config.toml", True), ("policy.toml", True)]
    config = Config.load(tmp_path / "etc" / "config.toml")
    assert config.external_interface == "wan0"
    assert config.internal_interfaces == ("br-lan", "wlan0")
    assert config.policy_file == tmp_path / "etc" / "policy.toml"
    assert len(Policy.load(config.policy_file).rules) == 3
    text = (tmp_path / "etc" / "config.toml").read_text()
    assert "# wait_for_interfaces = false" in text and '# level = "info"' in text


def test_init_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("# mine\n")
    result = igd_server("init", str(tmp_path))
    assert result.returncode == 0
    assert f"kept existing {tmp_path / 'config.toml'}" in result.stdout
    assert f"wrote {tmp_path / 'policy.toml'}" in result.stdout
    assert (tmp_path / "config.toml").read_text() == "# mine\n"
    again = igd_server("init", str(tmp_path))
    assert f"kept existing {tmp_path / 'policy.toml'}" in again.stdout


def test_init_without_detected_interfaces_says_so(tmp_path: Path) -> None:
    write_examples(tmp_path, Detected(None, ()))
    text = (tmp_path / "config.toml").read_text()
    assert "NOT DETECTED (no default route)" in text
    assert "NOT DETECTED (no interface with a private address)" in text
    Config.load(tmp_path / "config.toml")  # still a valid file, with placeholders
