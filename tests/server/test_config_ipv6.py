"""The `[ipv6]` configuration section: defaults, values and the errors an admin sees."""

from __future__ import annotations

from ipaddress import IPv6Network
from pathlib import Path

import pytest

from igd.server.config import Config, ConfigError

BASE = '[network]\nexternal_interface = "wan0"\ninternal_interfaces = ["br-lan"]\n'


def test_ipv6_is_off_by_default() -> None:
    six = Config.parse(BASE, Path("/etc/igd/igd.toml")).ipv6
    assert not six.enabled and six.firewall == "own"
    assert (six.nftables_table, six.max_pinholes, six.lan_prefixes) == ("igd6", 16384, ())


def test_ipv6_values_are_read() -> None:
    text = BASE + (
        '[ipv6]\nenabled = true\nfirewall = "external"\ntable = "pin6"\n'
        'lan_prefixes = ["2001:db8:0:77::/64"]\nmax_pinholes = 100\n'
    )
    six = Config.parse(text, Path("/etc/igd/igd.toml")).ipv6
    assert six.enabled and six.firewall == "external" and six.nftables_table == "pin6"
    assert six.lan_prefixes == (IPv6Network("2001:db8:0:77::/64"),) and six.max_pinholes == 100


def test_ipv6_errors_name_the_key_and_line() -> None:
    text = BASE + '[ipv6]\nfirewall = "none"\nlan_prefixes = ["2001:db8::1/64"]\nenable = true\n'
    with pytest.raises(ConfigError) as caught:
        Config.parse(text, Path("igd.toml"))
    message = str(caught.value)
    for expected in ('"own" or "external"', "host bits", "did you mean 'enabled'"):
        assert expected in message, message


def test_the_old_pinhole_policy_keys_say_where_they_moved() -> None:
    text = BASE + (
        '[ipv6]\nenabled = true\nclients = ["2001:db8:0:77::/64"]\nsecure_mode = false\n'
        "min_port = 1\nmax_pinholes_per_client = 8\nmin_lifetime = 60\nmax_lifetime = 600\n"
    )
    with pytest.raises(ConfigError) as caught:
        Config.parse(text, Path("igd.toml"))
    issues = {issue.key: (issue.line, issue.message) for issue in caught.value.issues}
    assert issues["ipv6.clients"][0] == 6
    assert "an allow rule's clients" in issues["ipv6.clients"][1]
    assert "[defaults] secure_mode" in issues["ipv6.secure_mode"][1]
    assert 'internal_ports = "1024-65535"' in issues["ipv6.min_port"][1]
    assert "max_mappings_per_client" in issues["ipv6.max_pinholes_per_client"][1]
    assert "[defaults] min_lease" in issues["ipv6.min_lifetime"][1]
    assert "[defaults] max_lease" in issues["ipv6.max_lifetime"][1]
    assert all("moved to the policy file" in message for _, message in issues.values())
    assert len(caught.value.issues) == 6
