"""The daemon's configuration file (TOML); every key is documented in docs/configuration.md."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address, IPv6Network
from pathlib import Path
from typing import Any

from igd.policy.reader import (
    Bad,
    FileError,
    Reader,
    boolean,
    integer,
    kind,
    parse_toml,
    read_path,
    string,
)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Bad(f"want a number, got {kind(value)}")
    if value <= 0:
        raise Bad(f"{value} is not above 0")
    return float(value)


def _address(value: object) -> IPv4Address:
    text = string(value)
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise Bad(f"not an IPv4 address: {text!r}") from None


def _addresses(value: object) -> tuple[IPv4Address, ...]:
    if not isinstance(value, list):
        raise Bad(f'want an array of IPv4 addresses, e.g. ["198.51.100.7"], got {kind(value)}')
    problems: list[tuple[str, int | None]] = []
    found: list[IPv4Address] = []
    for index, item in enumerate(value):
        try:
            found.append(_address(item))
        except Bad as bad:
            problems.append((str(bad), index))
    if problems:
        error = Bad(problems[0][0])
        error.problems = problems
        raise error
    return tuple(dict.fromkeys(found))


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise Bad(f'want a non-empty array of interface names, e.g. ["br-lan"], got {kind(value)}')
    problems: list[tuple[str, int | None]] = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            problems.append((f"want an interface name, got {kind(item)}", index))
    if problems:
        error = Bad(problems[0][0])
        error.problems = problems
        raise error
    return tuple(value)


ADMIN_PORT = 9351
"""The admin listener's default port (console and /metrics), on 127.0.0.1."""


def _listen(value: object) -> tuple[IPv4Address, int]:
    text = string(value)
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise Bad(f'want "ADDRESS:PORT", e.g. "127.0.0.1:{ADMIN_PORT}", not {text!r}')
    return _address(host), int(port)


def _host_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Bad(f'want an array of host names, e.g. ["router.lan"], got {kind(value)}')
    return tuple(v.lower() for v in value)


def _prefixes(value: object) -> tuple[IPv6Network, ...]:
    if not isinstance(value, list):
        raise Bad(f'want an array of IPv6 prefixes, e.g. ["2001:db8:0:77::/64"], got {kind(value)}')
    problems: list[tuple[str, int | None]] = []
    found: list[IPv6Network] = []
    for index, item in enumerate(value):
        try:
            found.append(IPv6Network(string(item)))
        except Bad as bad:
            problems.append((str(bad), index))
        except ValueError:
            problems.append((f"not an IPv6 prefix (host bits must be zero): {item!r}", index))
    if problems:
        error = Bad(problems[0][0])
        error.problems = problems
        raise error
    return tuple(dict.fromkeys(found))


def _choice(*choices: object) -> Callable[[object], Any]:
    names = [f'"{c}"' if isinstance(c, str) else str(c) for c in choices]
    wanted = f"{', '.join(names[:-1])} or {names[-1]}"

    def convert(value: object) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise Bad(f"want {wanted}, not {value!r}")
        return value

    return convert


_Key = tuple[Callable[[Any], Any], Any]
_REQUIRED = object()

# Section -> key -> (converter, default); _REQUIRED marks a required key.
_SCHEMA: dict[str, dict[str, _Key]] = {
    "network": {
        "external_interface": (string, _REQUIRED),
        "internal_interfaces": (_names, _REQUIRED),
        "external_address": (_address, None),
        "extra_external_addresses": (_addresses, ()),
        "external_addresses": (_addresses, ()),
        "allow_private_external": (boolean, False),
        "address_poll_interval": (_number, 2.0),
        "wait_for_interfaces": (boolean, False),
        "hairpin": (boolean, True),
    },
    "state": {"directory": (string, "/var/lib/igd")},
    "policy": {"file": (string, "/etc/igd/policy.toml")},
    "natpmp": {"enabled": (boolean, True)},
    "pcp": {
        "enabled": (boolean, True),
        "max_filters": (integer(1, 64), 8),
        "max_description": (integer(0, 1016), 128),
    },
    "upnp": {
        "enabled": (boolean, True),
        "http_port": (integer(1, 65535), 5000),
        "igd_version": (_choice(1, 2, "auto"), "auto"),
    },
    "nftables": {
        "table": (string, "igd"),
        "on_stop": (_choice("keep", "flush"), "keep"),
        "counters": (boolean, True),
    },
    "limits": {
        "requests_per_second_per_client": (_number, 500.0),
        "burst_per_client": (integer(1), 1000),
    },
    "control": {"socket": (string, None)},
    "log": {
        "level": (_choice("debug", "info", "warning", "error"), "info"),
        "audit_file": (string, None),
        "audit_max_bytes": (integer(0), 0),
        "audit_keep": (integer(1, 1000), 5),
    },
    "upstream": {
        "mode": (_choice("off", "auto", "pcp", "natpmp", "upnp"), "off"),
        "gateway": (_address, None),
        "reply_wait": (_number, 2.0),
        "lifetime": (integer(30, 86400), 3600),
        "check_interval": (_number, 30.0),
        "max_mappings": (integer(1, 131072), 10000),
    },
    "admin": {
        "enabled": (boolean, False),
        "listen": (_listen, (IPv4Address("127.0.0.1"), ADMIN_PORT)),
        "password_hash": (string, None),
        "names": (_host_names, ()),
    },
    "ipv6": {
        "enabled": (boolean, False),
        "firewall": (_choice("own", "external"), "own"),
        "table": (string, "igd6"),
        "lan_prefixes": (_prefixes, ()),
        "max_pinholes": (integer(1, 1_000_000), 16384),
    },
}

_MOVED_IPV6_KEYS = {
    "clients": "list the prefixes in an allow rule's clients",
    "secure_mode": "use [defaults] secure_mode, and allow_third_party on a rule",
    "min_port": 'give the allow rule internal_ports = "1024-65535"',
    "max_pinholes_per_client": "use max_mappings_per_client ([defaults] or the rule), which"
    " counts a client's pinholes apart from its mappings",
    "min_lifetime": "use [defaults] min_lease",
    "max_lifetime": "use [defaults] max_lease, or max_lease on the rule",
}
"""[ipv6] keys that were pinhole policy: the policy file's rules decide pinholes now."""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The `[upstream]` section (igd/server/upstream.py): double NAT mirroring."""

    mode: str = "off"
    """off, auto (only behind a private, shared or reserved external address), or a
    mechanism: pcp, natpmp, upnp."""
    address: IPv4Address | None = None
    """The upstream gateway (key `gateway`); None: the default route's."""
    reply_wait: float = 2.0
    """How long a NAT-PMP/PCP reply waits for the upstream mapping."""
    lifetime: int = 3600
    """The upstream lease asked for (renewed on its own schedule)."""
    check_interval: float = 30.0
    """How often the upstream is probed: noticed gone, restarted (epoch), back."""
    max_mappings: int = 10000
    """Upstream mappings held at most (one per mirrored port, each a renewal timer, about
    6 kB); grants past it stay local, answered with the local endpoint and logged. The
    default is the policy's default `max_mappings`, so every local mapping can be mirrored."""


_IPV6_FIELDS = {"table": "nftables_table"}


@dataclass(frozen=True, slots=True)
class Ipv6Config:
    """The `[ipv6]` section: pinholes through the gateway's IPv6 firewall (RFC 6092)."""

    enabled: bool = False
    firewall: str = "own"
    """"own": the daemon's table drops unsolicited inbound flows to the LAN prefixes;
    "external": the admin's firewall does, and accepts what the daemon marks."""
    nftables_table: str = "igd6"
    """The `table` key: the daemon's own `ip6` table."""
    lan_prefixes: tuple[IPv6Network, ...] = ()
    """Empty: the global prefixes on the internal interfaces, followed as they change."""
    max_pinholes: int = 16384
    """The kernel table's bound on all pinholes, whatever the policy's quotas."""


def _moved_ipv6_keys(reader: Reader, table: dict[str, Any]) -> dict[str, Any]:
    """An issue naming the policy-file equivalent of each moved [ipv6] key; the rest."""
    for key in table.keys() & _MOVED_IPV6_KEYS.keys():
        reader.issue(
            ("ipv6", key),
            "moved to the policy file, whose rules decide pinholes like mappings:"
            f" {_MOVED_IPV6_KEYS[key]} (docs/policy.md#ipv6-pinholes)",
        )
    return {key: value for key, value in table.items() if key not in _MOVED_IPV6_KEYS}


class ConfigError(FileError):
    """The configuration file is invalid; `issues` holds every problem, in file order."""


@dataclass(frozen=True, slots=True)
class Config:
    """Validated daemon settings."""

    source: Path
    external_interface: str
    internal_interfaces: tuple[str, ...]
    external_address: IPv4Address | None
    extra_external_addresses: tuple[IPv4Address, ...]
    """Further addresses whose inbound packets mappings apply to (besides the interface's)."""
    external_addresses: tuple[IPv4Address, ...]
    """Further public addresses with mappings of their own (a forward's external_address, a
    rule's external_addresses, a PCP client's suggestion); not the default address."""
    allow_private_external: bool
    address_poll_interval: float
    wait_for_interfaces: bool
    """Wait at start for missing interfaces and addresses instead of refusing to start."""
    state_directory: Path
    policy_file: Path
    natpmp_enabled: bool
    pcp_enabled: bool
    pcp_max_filters: int
    pcp_max_description: int
    upnp_enabled: bool
    upnp_http_port: int
    upnp_igd_version: int | None
    """1 or 2; None is "auto" (v2, and v1 for v1 searches and known v1-only clients)."""
    nftables_table: str
    flush_on_stop: bool
    requests_per_second_per_client: float
    burst_per_client: int
    control_socket: Path
    log_level: str
    hairpin: bool = True
    """LAN hosts reach mappings through the external address (NAT loopback)."""
    traffic_counters: bool = True
    """Count packets and bytes per mapping in the kernel."""
    upstream: UpstreamSettings = UpstreamSettings()
    admin_enabled: bool = False
    """Whether the admin listener (web console and /metrics, igd/server/admin/) runs."""
    admin_listen: tuple[IPv4Address, int] = (IPv4Address("127.0.0.1"), ADMIN_PORT)
    admin_password_hash: str | None = None
    """`igd-server admin hash-password` output; required unless the listener is loopback."""
    admin_names: tuple[str, ...] = ()
    """Host names the console may be reached by besides its address (DNS rebinding guard)."""
    ipv6: Ipv6Config = field(default_factory=Ipv6Config)
    audit_file: Path | None = None
    """The audit log (JSON lines, igd/server/audit.py); None: no audit log."""
    audit_max_bytes: int = 0
    audit_keep: int = 5

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Config:
        """Read and validate a configuration file; raise ConfigError listing every problem."""
        return cls.parse(read_path(path, ConfigError), Path(path))

    @classmethod
    def parse(cls, text: str, source: Path) -> Config:
        """Validate configuration text read from `source` (relative paths start at its folder)."""
        document = parse_toml(text, str(source), ConfigError)
        reader = Reader(str(source), text)
        reader.unknown_sections(document, _SCHEMA)
        values: dict[str, dict[str, Any]] = {}
        for section, keys in _SCHEMA.items():
            table = reader.section(document, section)
            if section == "ipv6":
                table = _moved_ipv6_keys(reader, table)
            reader.unknown_keys((section,), table, keys)
            reader.required(table, (section,), [k for k, (_, d) in keys.items() if d is _REQUIRED])
            values[section] = {
                key: reader.value(table, (section,), key, convert, default)
                for key, (convert, default) in keys.items()
            }
        net = values["network"]
        internal = net["internal_interfaces"]
        if isinstance(internal, tuple) and net["external_interface"] in internal:
            reader.issue(
                ("network", "internal_interfaces"), "must not include the external interface"
            )
        further = net["external_addresses"]
        if isinstance(further, tuple):
            aliases = net["extra_external_addresses"]
            for address in further:
                if address == net["external_address"] or (
                    isinstance(aliases, tuple) and address in aliases
                ):
                    reader.issue(
                        ("network", "external_addresses"),
                        f"{address} is also the default address or one of its aliases"
                        " (external_address, extra_external_addresses)",
                    )
            if len(set(further)) != len(further):
                reader.issue(("network", "external_addresses"), "lists an address twice")
        admin = values["admin"]
        listen = admin["listen"]
        if isinstance(listen, tuple) and not listen[0].is_loopback and not admin["password_hash"]:
            reader.issue(
                ("admin", "listen"),
                "a listener off loopback needs [admin] password_hash"
                " (make one with `igd-server admin hash-password`)",
            )
        six = values["ipv6"]
        reader.raise_issues(ConfigError)
        base = source.parent
        state = base / values["state"]["directory"]
        control = values["control"]["socket"]
        upnp, limits, audit = values["upnp"], values["limits"], values["log"]
        return cls(
            source=source,
            external_interface=net["external_interface"],
            internal_interfaces=net["internal_interfaces"],
            external_address=net["external_address"],
            extra_external_addresses=net["extra_external_addresses"],
            external_addresses=net["external_addresses"],
            allow_private_external=net["allow_private_external"],
            address_poll_interval=net["address_poll_interval"],
            wait_for_interfaces=net["wait_for_interfaces"],
            state_directory=state,
            policy_file=base / values["policy"]["file"],
            natpmp_enabled=values["natpmp"]["enabled"],
            pcp_enabled=values["pcp"]["enabled"],
            pcp_max_filters=values["pcp"]["max_filters"],
            pcp_max_description=values["pcp"]["max_description"],
            upnp_enabled=upnp["enabled"],
            upnp_http_port=upnp["http_port"],
            upnp_igd_version=upnp["igd_version"] if upnp["igd_version"] != "auto" else None,
            nftables_table=values["nftables"]["table"],
            flush_on_stop=values["nftables"]["on_stop"] == "flush",
            requests_per_second_per_client=limits["requests_per_second_per_client"],
            burst_per_client=limits["burst_per_client"],
            control_socket=base / control if control else state / "control.sock",
            log_level=values["log"]["level"],
            hairpin=net["hairpin"],
            traffic_counters=values["nftables"]["counters"],
            upstream=UpstreamSettings(
                mode=values["upstream"]["mode"],
                address=values["upstream"]["gateway"],
                reply_wait=values["upstream"]["reply_wait"],
                lifetime=values["upstream"]["lifetime"],
                check_interval=values["upstream"]["check_interval"],
                max_mappings=values["upstream"]["max_mappings"],
            ),
            admin_enabled=admin["enabled"],
            admin_listen=admin["listen"],
            admin_password_hash=admin["password_hash"],
            admin_names=admin["names"],
            ipv6=Ipv6Config(**{_IPV6_FIELDS.get(k, k): v for k, v in six.items()}),
            audit_file=base / audit["audit_file"] if audit["audit_file"] else None,
            audit_max_bytes=audit["audit_max_bytes"],
            audit_keep=audit["audit_keep"],
        )
