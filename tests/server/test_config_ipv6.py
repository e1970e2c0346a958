"""The `[ipv6]` configuration section: defaults, values and the errors an admin sees."""

from __future__ import annotations

from ipaddress import IPv6Network
from pathlib import Path

import pytest

from igd.server.config import Config, ConfigError

BASE = '[network]\nexternal_interface = "wan0"\ninternal_interfaces = ["br-lan"]\n'


def test_ipv6_is_off_by_default_with_secure_defaults() -> None:
    six = Config.parse(BASE, Path("/etc/igd/igd.toml")).ipv6
    assert not six.enabled and six.firewall == "own" and six.secure_mode
    assert (six.nftables_table, six.min_port, six.max_pinholes_per_client) == ("igd6", 1024, 64)


def test_ipv6_values_are_read() -> None:
    text = BASE + (
        '[ipv6]\nenabled = true\nfirewall = "external"\ntable = "pin6"\n'
        'lan_prefixes = ["2001:db8:0:77::/64"]\nclients = ["2001:db8:0:77::/80"]\n'
        "secure_mode = false\nmin_port = 1\nmax_pinholes_per_client = 8\n"
    )
    six = Config.parse(text, Path("/etc/igd/igd.toml")).ipv6
    assert six.enabled and six.firewall == "external" and six.nftables_table == "pin6"
    assert six.lan_prefixes == (IPv6Network("2001:db8:0:77::/64"),)
    assert six.clients == (IPv6Network("2001:db8:0:77::/80"),) and not six.secure_mode


def test_ipv6_errors_name_the_key_and_line() -> None:
    text = BASE + (
        '[ipv6]\nfirewall = "none"\nlan_prefixes = ["2001:db8::1/64"]\n'
        "min_lifetime = 600\nmax_lifetime = 300\nsecure = true\n"
    )
    with pytest.raises(ConfigError) as caught:
        Config.parse(text, Path("igd.toml"))
    message = str(caught.value)
    for expected in ('"own" or "external"', "host bits", "above max_lifetime", "secure_mode"):
        assert expected in message, message
