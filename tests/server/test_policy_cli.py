"""`igd-server policy check|explain`: what an admin sees, and the exit statuses scripts rely on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from igd.server.policy_cli import add_policy_commands, main

POLICIES = Path(__file__).parent.parent.parent / "policies"
HOME = str(POLICIES / "home.toml")


def explain(*extra: str, policy: str = HOME) -> list[str]:
    return [
        "policy",
        "explain",
        "--policy",
        policy,
        "--client",
        "192.168.1.20",
        "--protocol",
        "tcp",
        "--via",
        "natpmp",
        *extra,
    ]


def test_check_reports_ok_with_the_rule_count(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(path) for path in POLICIES.glob("*.toml"))
    assert main(["policy", "check", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{HOME}: OK (3 rules)" in out
    assert len(out) == len(files)


def test_check_lists_every_error_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[defaults]\naction = "permit"\n\n[[rules]]\nname = "lan"\naction = "allow"\n'
        'clients = ["192.168.1.0/33"]\n'
    )
    assert main(["policy", "check", str(bad), HOME]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f'{bad}:2: defaults.action: unknown action \'permit\' (want "allow" or "deny")',
        f"{bad}:7: rules[0].clients: '192.168.1.0/33' is not an IPv4 or IPv6 address or network",
    ]
    assert captured.out == f"{HOME}: OK (3 rules)\n"


def test_check_warns_about_third_party_without_internal_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loose = tmp_path / "loose.toml"
    loose.write_text(
        '[[rules]]\nname = "lan"\naction = "allow"\nallow_third_party = true\n\n'
        '[[rules]]\nname = "cctv"\naction = "allow"\nallow_third_party = true\n'
        'internal_addresses = ["192.168.1.50"]\n'
    )
    assert main(["policy", "check", str(loose)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{loose}: OK (2 rules)\n"
    assert captured.err.splitlines() == [
        f"{loose}:1: rules[0].allow_third_party: warning: allow_third_party without"
        " internal_addresses lets the rule's clients map ports to any LAN host; list the hosts"
        " in internal_addresses"
    ]


def test_check_reports_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["policy", "check", str(missing)]) == 1
    assert capsys.readouterr().err == f"{missing}: file: cannot read: No such file or directory\n"


def test_explain_allow_shows_rule_lease_ports_and_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(explain("--internal-port", "8080", "--external-port", "80", "--lifetime", "30"))
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "ALLOW  tcp 192.168.1.20:8080 for 192.168.1.20 via natpmp, external port 80 (suggested)"
    )
    assert lines[1] == f"rule:           LAN high ports to self ({HOME}:40)"
    assert lines[2] == "lease:          120 s (requested 30 s)"
    assert lines[3] == "external ports: 1024-65535"
    assert lines[4] == "suggested port: 80 is not allowed; the gateway picks another allowed port"
    assert lines[5].startswith("restrictions:   lease lengthened from 30 s to 120 s")
    assert "by deny rule 'privileged external ports'" in lines[6]


def test_explain_allow_honours_a_suggested_port_inside_the_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(explain("--internal-port", "8080", "--external-port", "8080")) == 0
    assert "suggested port: 8080 is honoured if it is free" in capsys.readouterr().out


def test_explain_deny_shows_reason_rule_and_detail(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(explain("--internal-port", "8080", "--external-port", "80", "--exact"))
    assert status == 1
    assert capsys.readouterr().out.splitlines() == [
        "DENY   tcp 192.168.1.20:8080 for 192.168.1.20 via natpmp, external port 80 (exact)",
        f"rule:           privileged external ports ({HOME}:31)",
        "reason:         policy-denied",
        "detail:         external port 80 is denied",
    ]


def test_explain_default_deny_names_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(explain("--internal-port", "80")) == 1
    out = capsys.readouterr().out
    assert f"rule:           defaults ({HOME} [defaults])" in out
    assert "no rule matches" in out


def test_explain_third_party(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(explain("--internal-port", "8080", "--internal-address", "192.168.1.30"))
    assert status == 1
    out = capsys.readouterr().out
    assert "reason:         third-party-denied" in out
    assert "192.168.1.30:8080 for 192.168.1.20" in out


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(explain("--internal-port", "8080", "--external-port", "80", "--json")) == 0
    allow = json.loads(capsys.readouterr().out)
    assert allow == {
        "decision": "allow",
        "rule": "LAN high ports to self",
        "rule_line": 40,
        "policy": HOME,
        "lifetime": 7200,
        "requested_lifetime": 7200,
        "external_ports": "1024-65535",
        "suggested_port": 80,
        "suggested_port_honoured": False,
        "restrictions": [
            "external ports limited to 1024-65535 by deny rule 'privileged external ports'",
            "suggested external port 80 is not allowed; the gateway assigns another",
        ],
        "remote_sources": None,
        "external_addresses": ["default"],
    }
    assert main(explain("--internal-port", "445", "--json")) == 1
    deny = json.loads(capsys.readouterr().out)
    assert deny["decision"] == "deny"
    assert (deny["rule"], deny["rule_line"], deny["reason"]) == (
        "dangerous services",
        24,
        "policy-denied",
    )


def test_explain_with_a_broken_policy_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[defaults]\nmax_lease = -1\n")
    assert main(explain("--internal-port", "8080", policy=str(bad))) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"{bad}:2: defaults.max_lease: -1 is below the minimum 1\n"


@pytest.mark.parametrize(
    "wrong",
    [
        ["--internal-port", "0"],
        ["--internal-port", "8080", "--external-port", "70000"],
        ["--internal-port", "8080", "--lifetime", "0"],
        ["--internal-port", "8080", "--internal-address", "lan-host"],
        ["--internal-port", "8080", "--exact"],
        ["--internal-port", "8080", "--renewal"],
    ],
)
def test_explain_usage_errors_exit_2(wrong: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(explain(*wrong)) == 2
    assert "error:" in capsys.readouterr().err


def test_commands_plug_into_the_daemons_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="igd-server")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run")
    add_policy_commands(commands)
    args = parser.parse_args(["policy", "check", HOME])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == f"{HOME}: OK (3 rules)\n"
    assert not hasattr(parser.parse_args(["run"]), "handler")


def test_explain_shows_the_sources_a_rule_admits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        '[[rules]]\nname = "partners"\naction = "allow"\nremote_hosts = ["198.51.100.0/24"]\n'
    )
    args = ["policy", "explain", "--policy", str(policy), "--client", "192.168.1.20"]
    args += ["--protocol", "tcp", "--via", "pcp", "--internal-port", "8080"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "remote sources: 198.51.100.0/24\n" in out
    assert "remote sources limited to 198.51.100.0/24 by rule 'partners'" in out
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["remote_sources"] == ["198.51.100.0/24"]


def test_check_counts_forwards_and_warns_of_one_that_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        '[[forwards]]\nname = "old"\nprotocols = ["tcp"]\nexternal_ports = "8000"\n'
        'internal_address = "192.168.1.5"\nuntil = 2020-01-01T00:00:00Z\n'
    )
    assert main(["policy", "check", str(policy)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{policy}: OK (0 rules, 1 forward)\n"
    assert captured.err == (
        f"{policy}:6: forwards[0].until: warning: forward 'old' ended at 2020-01-01T00:00:00Z;"
        " it is not installed\n"
    )


SIX = """
[defaults]
action = "deny"
max_lease = 3600

[[rules]]
name = "guests"
action = "deny"
clients = ["2001:db8:0:77:8000::/65"]

[[rules]]
name = "LAN pinholes"
action = "allow"
clients = ["192.168.1.0/24", "2001:db8:0:77::/64"]
internal_ports = "1024-65535"
remote_hosts = ["2001:db8:0:1::/64"]
"""


def explain6(policy: Path, client: str, *extra: str) -> list[str]:
    return ["policy", "explain", "--policy", str(policy), "--client", client,
            "--protocol", "tcp", "--via", "pcp", "--internal-port", "8080", *extra]  # fmt: skip


def test_check_accepts_ipv6_prefixes_in_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "six.toml"
    path.write_text(SIX)
    assert main(["policy", "check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK (2 rules)\n"


def test_explain_a_pinhole_names_the_rule_and_the_lifetime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "six.toml"
    path.write_text(SIX)
    assert main(explain6(path, "2001:db8:0:77::a")) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ALLOW  pinhole tcp [2001:db8:0:77::a]:8080 for 2001:db8:0:77::a via pcp",
        f"rule:           LAN pinholes ({path}:11)",
        "lease:          3600 s (requested 7200 s)",
        "external port:  8080 (a pinhole translates nothing)",
        "remote sources: 2001:db8:0:1::/64",
        "restrictions:   lease shortened from 7200 s to 3600 s (defaults.max_lease)",
        "                remote sources limited to 2001:db8:0:1::/64 by rule 'LAN pinholes'",
    ]
    assert main(explain6(path, "2001:db8:0:77:8000::1", "--json")) == 1
    denied = json.loads(capsys.readouterr().out)
    assert (denied["decision"], denied["kind"], denied["rule"]) == ("deny", "pinhole", "guests")
    assert (denied["rule_line"], denied["reason"]) == (6, "not-allowed")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--external-port", "80"], "a pinhole's external port is its internal port"),
        (["--internal-address", "192.168.1.20"], "points at an IPv6 --internal-address"),
        (["--via", "natpmp"], "natpmp has no IPv6 pinholes"),
    ],
)
def test_explain_a_pinhole_refuses_what_a_pinhole_cannot_be(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    path = tmp_path / "six.toml"
    path.write_text(SIX)
    assert main(explain6(path, "2001:db8:0:77::a", *extra)) == 2
    assert message in capsys.readouterr().err
