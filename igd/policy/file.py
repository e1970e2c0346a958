"""The policy file: its TOML schema, validation, and every issue located by line number."""

from __future__ import annotations

import enum
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, TypeVar

from igd.model import Mechanism, Protocol
from igd.policy.locate import KeyPath
from igd.policy.reader import (
    Bad,
    FileError,
    FileIssue,
    Reader,
    at_least,
    boolean,
    integer,
    kind,
    parse_toml,
    read_path,
)
from igd.ports import PortRangeError, PortSet

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)

Network = IPv4Network | IPv6Network
"""A rule's address criterion: IPv4 ones match mappings, IPv6 ones pinholes."""

DEFAULTS_NAME = "defaults"
"""The rule name a decision carries when no rule matched; reserved in the file."""


class Action(enum.StrEnum):
    """What a rule, or the default, does with a request."""

    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Defaults:
    """The [defaults] table: what applies when no rule says otherwise."""

    action: Action = Action.DENY
    secure_mode: bool = True
    max_lease: int = 86400
    min_lease: int = 120
    max_mappings_per_client: int = 64
    max_mappings: int = 10000


@dataclass(frozen=True, slots=True)
class Rule:
    """One [[rules]] entry; a criterion left as None matches anything."""

    name: str
    action: Action
    clients: tuple[Network, ...] | None = None
    internal_addresses: tuple[Network, ...] | None = None
    internal_ports: PortSet | None = None
    external_ports: PortSet | None = None
    protocols: frozenset[Protocol] | None = None
    via: frozenset[Mechanism] | None = None
    description: re.Pattern[str] | None = None
    max_lease: int | None = None
    max_mappings_per_client: int | None = None
    allow_third_party: bool = False
    remote_hosts: tuple[Network, ...] | None = None
    """Mappings (IPv4 sources) and pinholes (IPv6 sources) this rule grants admit traffic
    only from these sources (None: any)."""
    external_addresses: tuple[IPv4Address | None, ...] | None = None
    """External addresses mappings this rule grants may use, the first unless the client
    asks for another of them (None in it, or the key left out: the default address)."""
    line: int | None = field(default=None, compare=False)
    """Line of the rule's table header in its file, for messages."""


@dataclass(frozen=True, slots=True)
class Forward:
    """One [[forwards]] entry: a static mapping the admin declares (docs/policy.md)."""

    name: str
    protocols: frozenset[Protocol]
    first_port: int
    last_port: int
    """External ports first..last, mapped 1:1 onto internal_port onwards."""
    internal_address: IPv4Address
    internal_port: int
    remote_hosts: tuple[IPv4Network, ...] | None = None
    until: float | None = None
    """Wall-clock end (POSIX seconds) of temporary access; None: no end."""
    owner: str = ""
    purpose: str = ""
    external_address: IPv4Address | None = None
    """One of network.external_addresses; None: the default external address."""
    line: int | None = field(default=None, compare=False)
    until_line: int | None = field(default=None, compare=False)

    def ports(self) -> range:
        """The external ports."""
        return range(self.first_port, self.last_port + 1)


MAX_FORWARD_PORTS = 1024
"""Largest external port range one forward may hold (each port is a table entry)."""
MAX_REMOTE_HOSTS = 64
"""Most sources a forward or rule may list: the kernel keeps at most this many FILTERs per
mapping (nft_payload.MAX_FILTERS)."""
# RFC 6887 §11.3: the port-mapping service's own ports are never mapped.
_SERVICE_PORTS = range(5350, 5352)


PolicyIssue = FileIssue
"""One problem found in a policy file."""


class PolicyFileError(FileError):
    """A policy file that cannot be used; `issues` holds every problem found, in file order."""


@dataclass(frozen=True, slots=True)
class PolicyParts:
    """What a policy file holds."""

    defaults: Defaults
    rules: tuple[Rule, ...]
    forwards: tuple[Forward, ...] = ()


def read_file(path: str | os.PathLike[str]) -> PolicyParts:
    """Read and validate a policy file; raise PolicyFileError."""
    return read_text(read_path(path, PolicyFileError), os.fspath(path))


def read_text(text: str, source: str = "<string>") -> PolicyParts:
    """Parse and validate policy text, collecting every issue; raise PolicyFileError."""
    document = parse_toml(text, source, PolicyFileError)
    reader = _Reader(source, text)
    parts = reader.document(document)
    reader.raise_issues(PolicyFileError)
    return parts


# -- validation ----------------------------------------------------------------------------


_DEFAULT_KEYS = (
    "action",
    "secure_mode",
    "max_lease",
    "min_lease",
    "max_mappings_per_client",
    "max_mappings",
)
_RULE_KEYS = (
    "name",
    "action",
    "clients",
    "internal_addresses",
    "internal_ports",
    "external_ports",
    "protocols",
    "via",
    "description",
    "max_lease",
    "max_mappings_per_client",
    "allow_third_party",
    "remote_hosts",
    "external_addresses",
)
_FORWARD_KEYS = (
    "name",
    "protocols",
    "external_ports",
    "internal_address",
    "internal_port",
    "remote_hosts",
    "until",
    "owner",
    "purpose",
    "external_address",
)
_TOP_KEYS = ("defaults", "rules", "forwards")


class _Reader(Reader):
    """Turns a parsed TOML document into Defaults and Rules, recording issues as it goes."""

    def document(self, document: dict[str, Any]) -> PolicyParts:
        self.unknown_keys((), document, _TOP_KEYS)
        defaults = self.defaults(self.section(document, "defaults"))
        entries = document.get("rules", [])
        if not isinstance(entries, list):
            self.issue(("rules",), f"want an array of tables ([[rules]]), got {kind(entries)}")
            entries = []
        rules: list[Rule] = []
        first_use: dict[str, int | None] = {}
        for index, entry in enumerate(entries):
            path: KeyPath = ("rules", index)
            if not isinstance(entry, dict):
                self.issue(path, f"want a table, got {kind(entry)}")
                continue
            rule = self.rule(path, entry, defaults)
            if rule.name in first_use:
                line = first_use[rule.name]
                earlier = f" (first used on line {line})" if line is not None else ""
                self.issue((*path, "name"), f"duplicate rule name {rule.name!r}{earlier}")
            elif rule.name:
                first_use[rule.name] = self.line_of((*path, "name"))
            rules.append(rule)
        return PolicyParts(defaults, tuple(rules), self.forwards(document))

    def forwards(self, document: dict[str, Any]) -> tuple[Forward, ...]:
        entries = document.get("forwards", [])
        if not isinstance(entries, list):
            wanted = "want an array of tables ([[forwards]])"
            self.issue(("forwards",), f"{wanted}, got {kind(entries)}")
            return ()
        forwards: list[Forward] = []
        names: dict[str, int | None] = {}
        ports: dict[tuple[IPv4Address | None, Protocol, int], Forward] = {}
        for index, entry in enumerate(entries):
            path: KeyPath = ("forwards", index)
            if not isinstance(entry, dict):
                self.issue(path, f"want a table, got {kind(entry)}")
                continue
            forward = self.forward(path, entry)
            if forward is None:
                continue
            if forward.name in names:
                line = names[forward.name]
                earlier = f" (first used on line {line})" if line is not None else ""
                self.issue((*path, "name"), f"duplicate forward name {forward.name!r}{earlier}")
                continue
            names[forward.name] = self.line_of((*path, "name"))
            clash = next(
                (
                    (forward.external_address, protocol, port)
                    for protocol in sorted(forward.protocols)
                    for port in forward.ports()
                    if (forward.external_address, protocol, port) in ports
                ),
                None,
            )
            if clash is not None:
                other = ports[clash]
                self.issue(
                    (*path, "external_ports"),
                    f"{clash[1]} port {clash[2]}{_on(clash[0])} is already forwarded by"
                    f" {other.name!r}"
                    f" (line {other.line})",
                )
                continue
            ports.update(
                ((forward.external_address, p, n), forward)
                for p in forward.protocols
                for n in forward.ports()
            )
            forwards.append(forward)
        return tuple(forwards)

    def forward(self, path: KeyPath, table: dict[str, Any]) -> Forward | None:
        self.unknown_keys(path, table, _FORWARD_KEYS)
        self.required(table, path, ("name", "protocols", "external_ports", "internal_address"))
        before = len(self.issues)
        name = self.value(table, path, "name", _name, "")
        nothing: frozenset[Protocol] = frozenset()
        protocols = self.value(table, path, "protocols", _members(Protocol), nothing)
        external = self.value(table, path, "external_ports", _port_range, (0, 0))
        address = self.value(table, path, "internal_address", _address, IPv4Address(0))
        internal = self.value(table, path, "internal_port", integer(1, 65535), external[0])
        remote_hosts = self.value(table, path, "remote_hosts", _remote_hosts4, None)
        until = self.value(table, path, "until", _instant, None)
        owner = self.value(table, path, "owner", _text, "")
        purpose = self.value(table, path, "purpose", _text, "")
        external_address = self.value(table, path, "external_address", _address, None)
        if external[0] and internal + (external[1] - external[0]) > 65535:
            self.issue(
                (*path, "internal_port"),
                f"internal ports {internal}-{internal + external[1] - external[0]} run past 65535"
                " (the external range maps 1:1 onto internal ports from internal_port)",
            )
        if Protocol.UDP in protocols and any(p in _SERVICE_PORTS for p in range(*_span(external))):
            # RFC 6887 §11.3: the port-mapping service's own ports are never mapped.
            self.issue(
                (*path, "external_ports"), "UDP 5350-5351 are the port-mapping service's own ports"
            )
        if len(self.issues) > before:
            return None
        return Forward(
            name=name,
            protocols=protocols,
            first_port=external[0],
            last_port=external[1],
            internal_address=address,
            internal_port=internal,
            remote_hosts=remote_hosts,
            until=until,
            owner=owner,
            purpose=purpose,
            external_address=external_address,
            line=self.lines.get(path),
            until_line=self.lines.get((*path, "until")),
        )

    def defaults(self, table: dict[str, Any]) -> Defaults:
        path: KeyPath = ("defaults",)
        self.unknown_keys(path, table, _DEFAULT_KEYS)
        base = Defaults()
        defaults = Defaults(
            action=self.value(table, path, "action", _action, base.action),
            secure_mode=self.value(table, path, "secure_mode", boolean, base.secure_mode),
            max_lease=self.value(table, path, "max_lease", at_least(1), base.max_lease),
            min_lease=self.value(table, path, "min_lease", at_least(1), base.min_lease),
            max_mappings_per_client=self.value(
                table, path, "max_mappings_per_client", at_least(0), base.max_mappings_per_client
            ),
            max_mappings=self.value(table, path, "max_mappings", at_least(0), base.max_mappings),
        )
        if (
            self.valid(table, path, "min_lease")
            and self.sound("max_lease")
            and defaults.min_lease > defaults.max_lease
        ):
            self.issue(
                (*path, "min_lease"),
                f"min_lease {defaults.min_lease} is above max_lease {defaults.max_lease}",
            )
            self.failed.add((*path, "min_lease"))
        return defaults

    def rule(self, path: KeyPath, table: dict[str, Any], defaults: Defaults) -> Rule:
        self.unknown_keys(path, table, _RULE_KEYS)
        self.required(table, path, ("name", "action"))
        rule = Rule(
            name=self.value(table, path, "name", _name, ""),
            action=self.value(table, path, "action", _action, Action.DENY),
            clients=self.value(table, path, "clients", _networks, None),
            internal_addresses=self.value(table, path, "internal_addresses", _networks, None),
            internal_ports=self.value(table, path, "internal_ports", _ports, None),
            external_ports=self.value(table, path, "external_ports", _ports, None),
            protocols=self.value(table, path, "protocols", _members(Protocol), None),
            via=self.value(table, path, "via", _members(Mechanism), None),
            description=self.value(table, path, "description", _regex, None),
            max_lease=self.value(table, path, "max_lease", at_least(1), None),
            max_mappings_per_client=self.value(
                table, path, "max_mappings_per_client", at_least(0), None
            ),
            allow_third_party=self.value(table, path, "allow_third_party", boolean, False),
            remote_hosts=self.value(table, path, "remote_hosts", _remote_hosts, None),
            external_addresses=self.value(
                table, path, "external_addresses", _external_addresses, None
            ),
            line=self.lines.get(path),
        )
        if rule.max_lease is not None and self.valid(table, path, "max_lease"):
            # A rule can only tighten the default; a longer lease would silently do nothing.
            if rule.max_lease > defaults.max_lease and self.sound("max_lease"):
                self.issue(
                    (*path, "max_lease"),
                    f"{rule.max_lease} is above defaults.max_lease {defaults.max_lease}"
                    " (a rule can only shorten leases)",
                )
            elif rule.max_lease < defaults.min_lease and self.sound("min_lease"):
                self.issue(
                    (*path, "max_lease"),
                    f"{rule.max_lease} is below defaults.min_lease {defaults.min_lease}",
                )
        return rule

    def sound(self, key: str) -> bool:
        """Whether a [defaults] value is usable for cross-checks (absent counts as usable)."""
        return ("defaults", key) not in self.failed


def _action(value: object) -> Action:
    if not isinstance(value, str):
        raise Bad(f'want "allow" or "deny", got {kind(value)}')
    try:
        return Action(value.lower())
    except ValueError:
        raise Bad(f'unknown action {value!r} (want "allow" or "deny")') from None


def _name(value: object) -> str:
    if not isinstance(value, str):
        raise Bad(f"want a string, got {kind(value)}")
    if not value.strip():
        raise Bad("rule name is empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        # Names go into log lines and protocol error texts: keep them on one line.
        raise Bad("rule name holds control characters")
    if value == DEFAULTS_NAME:
        raise Bad(f"{DEFAULTS_NAME!r} is reserved for decisions made by [defaults]")
    return value


def _elements(value: object, example: str, convert: Callable[[str], _T]) -> list[_T]:
    """Convert an array of strings, reporting every bad element, not just the first."""
    if not isinstance(value, list):
        raise Bad(f"want an array of strings, e.g. [{example}], got {kind(value)}")
    if not value:
        raise Bad("empty array matches nothing; leave the key out to match anything")
    converted: list[_T] = []
    problems: list[tuple[str, int | None]] = []
    for index, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise Bad(f"want a string, got {kind(item)}")
            converted.append(convert(item))
        except Bad as bad:
            problems += [(message, index) for message, _ in bad.problems]
    if problems:
        error = Bad(problems[0][0])
        error.problems = problems
        raise error
    return converted


def _networks(value: object) -> tuple[Network, ...]:
    return tuple(_elements(value, '"192.168.1.0/24", "2001:db8:1::/64"', _network))


def _networks4(value: object) -> tuple[IPv4Network, ...]:
    return tuple(_elements(value, '"192.168.1.0/24"', _network4))


def _network(text: str) -> Network:
    try:
        network = ip_network(text.strip(), strict=False)
    except ValueError:
        raise Bad(f"{text!r} is not an IPv4 or IPv6 address or network") from None
    host = text.strip().split("/")[0]
    if network.network_address != ip_address(host):
        # Host bits set is ambiguous in an access list: the network or the one host?
        raise Bad(
            f"{text!r} has host bits set; write '{network}' for the network"
            f" or '{host}/{network.max_prefixlen}' for the host"
        )
    return network


def _network4(text: str) -> IPv4Network:
    network = _network(text)
    if not isinstance(network, IPv4Network):
        # Forwards are IPv4 port mappings; pinholes come from PCP and UPnP over IPv6.
        raise Bad(f"{text!r} is IPv6; a forward maps IPv4 only")
    return network


def _remote_hosts(value: object) -> tuple[Network, ...]:
    return _sources(_networks(value))


def _remote_hosts4(value: object) -> tuple[IPv4Network, ...]:
    return _sources(_networks4(value))


def _sources(networks: tuple[_T, ...]) -> tuple[_T, ...]:
    """remote_hosts without repeats, refused beyond MAX_REMOTE_HOSTS."""
    if len(set(networks)) > MAX_REMOTE_HOSTS:
        raise Bad(f"{len(networks)} sources; at most {MAX_REMOTE_HOSTS} (one kernel FILTER each)")
    return tuple(dict.fromkeys(networks))


def _on(address: IPv4Address | None) -> str:
    return "" if address is None else f" of {address}"


def _external_addresses(value: object) -> tuple[IPv4Address | None, ...]:
    def convert(text: str) -> IPv4Address | None:
        return None if text.strip() == "default" else _address(text)

    found = _elements(value, '"203.0.113.9", "default"', convert)
    return tuple(dict.fromkeys(found))


def _address(value: object) -> IPv4Address:
    if not isinstance(value, str):
        raise Bad(f'want an IPv4 address string such as "192.168.1.10", got {kind(value)}')
    try:
        return IPv4Address(value.strip())
    except AddressValueError:
        raise Bad(f"{value!r} is not an IPv4 address") from None


def _port_range(value: object) -> tuple[int, int]:
    ports = _ports(value)
    if len(ports.intervals) != 1:
        raise Bad('want one port or one range N-M, e.g. "443" or "8000-8009"')
    first, last = ports.intervals[0]
    if first == 0:
        raise Bad("port 0 cannot be forwarded")
    if last - first + 1 > MAX_FORWARD_PORTS:
        raise Bad(f"{last - first + 1} ports; a forward holds at most {MAX_FORWARD_PORTS}")
    return first, last


def _span(ports: tuple[int, int]) -> tuple[int, int]:
    return ports[0], ports[1] + 1


def _instant(value: object) -> float:
    """A point in time with its offset: a TOML offset date-time or an RFC 3339 string."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("z", "Z"))
        except ValueError:
            raise Bad(f'{value!r} is not a date and time such as "2027-01-31T18:00:00Z"') from None
    if not isinstance(value, datetime):
        raise Bad(f"want a date and time such as 2027-01-31T18:00:00Z, got {kind(value)}")
    if value.tzinfo is None:
        # A local time would move with the router's time zone: say which one is meant.
        raise Bad(f"{value.isoformat()} has no UTC offset; add Z or +HH:MM")
    return value.timestamp()


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise Bad(f"want a string, got {kind(value)}")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise Bad("holds control characters")
    return value


def _ports(value: object) -> PortSet:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Bad(f'want a port range string such as "1024-65535", got {kind(value)}')
    try:
        return PortSet.parse(value)
    except PortRangeError as error:
        raise Bad(str(error)) from None


def _members(kind: type[_E]) -> Callable[[object], frozenset[_E]]:
    choices = ", ".join(str(member.value) for member in kind)

    def member(text: str) -> _E:
        try:
            return kind(text.lower())
        except ValueError:
            raise Bad(f"unknown value {text!r} (want one of: {choices})") from None

    def convert(value: object) -> frozenset[_E]:
        return frozenset(_elements(value, f'"{next(iter(kind)).value}"', member))

    return convert


def _regex(value: object) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise Bad(f"want a regular expression string, got {kind(value)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise Bad(f"bad regular expression: {error}") from None
    if caught:
        # re warns where a future Python will read the pattern differently (nested sets).
        raise Bad(f"ambiguous regular expression: {caught[0].message} (escape '[' as '\\[')")
    return pattern
