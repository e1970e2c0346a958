"""The daemon's configuration file (TOML); every key is documented in docs/configuration.md."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

# Section -> key -> (type, default); a default of ... marks a required key.
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "network": {
        "external_interface": (str, ...),
        "internal_interfaces": (list, ...),
        "external_address": (str, None),
        "extra_external_addresses": (list, []),
        "allow_private_external": (bool, False),
        "address_poll_interval": ((int, float), 2.0),
    },
    "state": {"directory": (str, "/var/lib/igd")},
    "policy": {"file": (str, "/etc/igd/policy.toml")},
    "natpmp": {"enabled": (bool, True)},
    "pcp": {"enabled": (bool, True), "max_filters": (int, 8), "max_description": (int, 128)},
    "upnp": {
        "enabled": (bool, True),
        "http_port": (int, 5000),
        "igd_version": ((int, str), "auto"),
    },
    "nftables": {"table": (str, "igd"), "on_stop": (str, "keep")},
    "limits": {
        "requests_per_second_per_client": ((int, float), 500),
        "burst_per_client": (int, 1000),
    },
    "control": {"socket": (str, None)},
}


class ConfigError(ValueError):
    """The configuration file is invalid; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__("\n".join(f"{source}: {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Config:
    """Validated daemon settings."""

    source: Path
    external_interface: str
    internal_interfaces: tuple[str, ...]
    external_address: IPv4Address | None
    extra_external_addresses: tuple[IPv4Address, ...]
    """Further addresses whose inbound packets mappings apply to (besides the interface's)."""
    allow_private_external: bool
    address_poll_interval: float
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

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read and validate a configuration file; raise ConfigError listing every problem."""
        source = Path(path)
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(str(source), [f"cannot read: {error.strerror}"]) from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(str(source), [f"not valid TOML: {error}"]) from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> Config:
        """Validate parsed TOML."""
        problems: list[str] = []
        values: dict[str, dict[str, Any]] = {}
        for section in data:
            if section not in _SCHEMA:
                problems.append(f"unknown section [{section}]")
        for section, keys in _SCHEMA.items():
            given = data.get(section, {})
            if not isinstance(given, dict):
                problems.append(f"[{section}] must be a table")
                given = {}
            values[section] = {}
            for key in given:
                if key not in keys:
                    problems.append(f"{section}.{key}: unknown key")
            for key, (kind, default) in keys.items():
                if key not in given:
                    if default is ...:
                        problems.append(f"{section}.{key}: required")
                    values[section][key] = default
                    continue
                value = given[key]
                if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                    problems.append(f"{section}.{key}: wrong type {type(value).__name__}")
                    value = default
                values[section][key] = value
        net = values["network"]
        external_address = None
        if net["external_address"] is not None:
            try:
                external_address = IPv4Address(net["external_address"])
            except ipaddress.AddressValueError:
                problems.append(
                    f"network.external_address: not an IPv4 address: {net['external_address']!r}"
                )
        extra: list[IPv4Address] = []
        for text in net["extra_external_addresses"]:
            try:
                if not isinstance(text, str):
                    raise ipaddress.AddressValueError(text)
                extra.append(IPv4Address(text))
            except ipaddress.AddressValueError:
                problems.append(f"network.extra_external_addresses: not an IPv4 address: {text!r}")
        internal = net["internal_interfaces"]
        if internal is not ... and (
            not internal or not all(isinstance(name, str) and name for name in internal)
        ):
            problems.append("network.internal_interfaces: want a non-empty list of names")
        if net["external_interface"] in (internal if isinstance(internal, list) else []):
            problems.append("network.internal_interfaces: must not include the external interface")
        on_stop = values["nftables"]["on_stop"]
        if on_stop not in ("keep", "flush"):
            problems.append(f'nftables.on_stop: want "keep" or "flush", not {on_stop!r}')
        port = values["upnp"]["http_port"]
        if not 1 <= port <= 65535:
            problems.append(f"upnp.http_port: {port} is not a port")
        igd_version = values["upnp"]["igd_version"]
        if igd_version not in (1, 2, "auto"):
            problems.append(f'upnp.igd_version: want 1, 2 or "auto", not {igd_version!r}')
        if not 1 <= values["pcp"]["max_filters"] <= 64:
            problems.append("pcp.max_filters: want 1 to 64")
        if not 0 <= values["pcp"]["max_description"] <= 1016:
            problems.append("pcp.max_description: want 0 to 1016 octets")
        limits = values["limits"]
        if limits["requests_per_second_per_client"] <= 0 or limits["burst_per_client"] < 1:
            problems.append("limits: rates and bursts must be positive")
        if problems:
            raise ConfigError(str(source), problems)
        base = source.parent
        state = base / values["state"]["directory"]
        control = values["control"]["socket"]
        return cls(
            source=source,
            external_interface=net["external_interface"],
            internal_interfaces=tuple(internal),
            external_address=external_address,
            extra_external_addresses=tuple(dict.fromkeys(extra)),
            allow_private_external=net["allow_private_external"],
            address_poll_interval=float(net["address_poll_interval"]),
            state_directory=state,
            policy_file=base / values["policy"]["file"],
            natpmp_enabled=values["natpmp"]["enabled"],
            pcp_enabled=values["pcp"]["enabled"],
            pcp_max_filters=values["pcp"]["max_filters"],
            pcp_max_description=values["pcp"]["max_description"],
            upnp_enabled=values["upnp"]["enabled"],
            upnp_http_port=port,
            upnp_igd_version=igd_version if isinstance(igd_version, int) else None,
            nftables_table=values["nftables"]["table"],
            flush_on_stop=on_stop == "flush",
            requests_per_second_per_client=float(limits["requests_per_second_per_client"]),
            burst_per_client=limits["burst_per_client"],
            control_socket=base / control if control else state / "control.sock",
        )
