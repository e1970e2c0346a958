"""igd-server's command line: refusing to start on bad files, `config check`, `list` without a
daemon, `--version`."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import igd
from igd.server.cli import format_mappings, format_pinholes, main

GOOD_POLICY = '[defaults]\naction = "allow"\n'


def write_config(tmp: Path, policy: str, extra: str = "") -> Path:
    (tmp / "policy.toml").write_text(policy)
    config = tmp / "config.toml"
    config.write_text(
        '[network]\nexternal_interface = "wan0"\ninternal_interfaces = ["lo"]\n'
        f'[state]\ndirectory = "{tmp / "state"}"\n[policy]\nfile = "policy.toml"\n{extra}'
    )
    return config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igd.server", *args], capture_output=True, text=True, timeout=30
    )


def test_refuses_to_start_with_the_policy_checkers_message(tmp_path: Path) -> None:
    bad = (
        '[defaults]\naction = "allow"\n\n[[rules]]\nname = "x"\naction = "allow"\n'
        'clients = ["10.0.0.300/8"]\n'
    )
    config = write_config(tmp_path, bad)
    started = run("--config", str(config))
    checked = run("policy", "check", str(tmp_path / "policy.toml"))
    assert started.returncode == 2 and checked.returncode == 1
    line = f"{tmp_path / 'policy.toml'}:7: rules[0].clients"
    assert line in started.stderr and line in checked.stderr
    assert "refusing to start" in started.stderr
    assert not (tmp_path / "state").exists()  # nothing was touched


def test_refuses_to_start_with_a_bad_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, GOOD_POLICY, '[nftables]\non_stop = "drop"\ncolour = 1\n')
    result = run("--config", str(config))
    assert result.returncode == 2
    assert 'nftables.on_stop: want "keep" or "flush"' in result.stderr
    assert "nftables.colour: unknown key" in result.stderr


def test_list_without_a_running_daemon(tmp_path: Path, capsys: object) -> None:
    config = write_config(tmp_path, GOOD_POLICY)
    assert main(["list", "--config", str(config)]) == 3
    assert "igd-server is not running" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_format_mappings() -> None:
    rows = [
        {
            "protocol": "tcp",
            "external_port": 8080,
            "remote_host": "198.51.100.9",
            "internal_address": "192.168.1.10",
            "internal_port": 80,
            "lease_remaining": 42,
            "mechanism": "natpmp",
            "client": "192.168.1.10",
            "description": "web",
            "packets": 12,
            "bytes": 3400,
        }
    ]
    text = format_mappings(rows).splitlines()
    assert text[0].split() == [
        "PROTO",
        "EXTERNAL",
        "INTERNAL",
        "LEASE",
        "PACKETS",
        "BYTES",
        "VIA",
        "CLIENT",
        "DESCRIPTION",
    ]
    assert text[1].split() == [
        "tcp",
        "8080",
        "from",
        "198.51.100.9",
        "192.168.1.10:80",
        "42s",
        "12",
        "3400",
        "natpmp",
        "192.168.1.10",
        "web",
    ]
    assert format_mappings([]) == "no mappings"


def test_config_check_accepts_a_good_file_and_names_its_policy(tmp_path: Path) -> None:
    config = write_config(tmp_path, GOOD_POLICY)
    result = run("config", "check", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: OK (policy {tmp_path / 'policy.toml'}: 0 rules)\n"
    assert result.stderr == ""
    assert not (tmp_path / "state").exists()  # checking touches nothing


def test_config_check_lists_every_error_with_its_line_and_a_hint(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        GOOD_POLICY,
        '[nftable]\ntable = "x"\n'  # lines 8-9
        "[upnp]\nhttp_prot = 5001\nigd_version = 3\n"  # lines 10-12
        "[limits]\nburst_per_client = 0\n",  # lines 13-14
    )
    result = run("config", "check", str(config))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{config}:8: nftable: unknown section [nftable] (did you mean [nftables]?)",
        f"{config}:11: upnp.http_prot: unknown key 'http_prot' in upnp (did you mean 'http_port'?)",
        f'{config}:12: upnp.igd_version: want 1, 2 or "auto", not 3',
        f"{config}:14: limits.burst_per_client: 0 is below the minimum 1",
    ]


def test_config_check_points_at_the_bad_element_and_the_missing_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[network]\ninternal_interfaces = [\n  "br-lan",\n  7,\n]\n')
    result = run("config", "check", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}:1: network.external_interface: required key is missing",
        f"{config}:4: network.internal_interfaces: want an interface name, got integer",
    ]


def test_config_check_reports_syntax_errors_and_the_policy_files_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('[network]\nexternal_interface = "wan0\n')
    config = write_config(tmp_path, '[defaults]\naction = "alow"\n')
    result = run("config", "check", str(broken), str(config))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{broken}:2: syntax: ")
    assert lines[1].startswith(f"{tmp_path / 'policy.toml'}:2: defaults.action: unknown action")
    assert len(lines) == 2


def test_config_check_reports_a_missing_file(tmp_path: Path) -> None:
    result = run("config", "check", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    missing = f"{tmp_path / 'absent.toml'}: file: cannot read: No such file or directory"
    assert result.stderr.strip() == missing


def test_version_is_the_installed_package_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"igd-server {version('igd')}\n"
    assert igd.__version__ == version("igd")


def test_refuses_extra_external_addresses_that_are_not_ipv4(tmp_path: Path) -> None:
    config = write_config(tmp_path, GOOD_POLICY)
    extra = 'extra_external_addresses = ["198.51.100.9", "2001:db8::1", 7]\n'
    config.write_text(config.read_text().replace("[network]\n", "[network]\n" + extra, 1))
    started = run("--config", str(config))
    assert started.returncode == 2
    assert "network.extra_external_addresses: not an IPv4 address: '2001:db8::1'" in started.stderr
    assert "network.extra_external_addresses: want a string, got integer" in started.stderr
    assert "198.51.100.9" not in started.stderr


def test_help_texts_are_written_for_admins() -> None:
    top = run("--help").stdout
    assert "igd-server init /etc/igd" in top and "exit status:" in top
    policy = run("policy", "--help").stdout
    assert "docs/policy.md" in policy
    assert "add_policy_commands" not in policy and "args.handler" not in policy
    started = run("run", "--help").stdout
    assert "configuration file (default /etc/igd/config.toml)" in started
    assert "kept in memory only (no nftables table, no lease file)" in " ".join(started.split())


def test_log_level_is_a_checked_setting(tmp_path: Path) -> None:
    config = write_config(tmp_path, GOOD_POLICY, '[log]\nlevel = "loud"\n')
    result = run("config", "check", str(config))
    assert result.returncode == 1
    assert 'log.level: want "debug", "info", "warning" or "error", not \'loud\'' in result.stderr


def test_format_pinholes() -> None:
    assert format_pinholes([]) == "no pinholes"
    row = {
        "protocol": "tcp", "internal_address": "2001:db8:0:77::a", "internal_port": 8080,
        "remote": ["2001:db8:0:1::/64 port any"], "lease_remaining": 590, "mechanism": "pcp",
        "client": "2001:db8:0:77::a", "description": "game",
    }  # fmt: skip
    lines = format_pinholes([row]).splitlines()
    assert lines[0].split() == [
        "PROTO",
        "INTERNAL",
        "FROM",
        "LEASE",
        "VIA",
        "CLIENT",
        "DESCRIPTION",
    ]
    assert lines[1].split() == [
        "tcp", "[2001:db8:0:77::a]:8080", "2001:db8:0:1::/64", "port", "any", "590s", "pcp",
        "2001:db8:0:77::a", "game",
    ]  # fmt: skip


def test_config_check_wants_every_address_the_policy_names_configured(tmp_path: Path) -> None:
    policy = GOOD_POLICY + (
        '[[forwards]]\nname = "web"\nprotocols = ["tcp"]\nexternal_ports = "443"\n'
        'internal_address = "192.168.1.5"\nexternal_address = "203.0.113.9"\n'
    )
    config = write_config(tmp_path, policy)
    result = run("config", "check", str(config))
    assert result.returncode == 1
    assert result.stderr == (
        f"{tmp_path / 'policy.toml'}:3: forwards[0].external_address: 203.0.113.9 is not one"
        " of network.external_addresses in the configuration\n"
    )
    # Listed in the configuration (where it may not also be an alias of the default): OK.
    text = config.read_text().replace(
        'internal_interfaces = ["lo"]',
        'internal_interfaces = ["lo"]\nexternal_addresses = ["203.0.113.9"]',
    )
    config.write_text(text)
    assert run("config", "check", str(config)).returncode == 0
    config.write_text(
        text.replace(
            "external_addresses", 'extra_external_addresses = ["203.0.113.9"]\nexternal_addresses'
        )
    )
    result = run("config", "check", str(config))
    assert "is also the default address or one of its aliases" in result.stderr
