"""The policy file: its TOML schema, validation, and every issue located by line number."""

from __future__ import annotations

import difflib
import enum
import os
import re
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from typing import Any, TypeVar

from igd.model import Mechanism, Protocol
from igd.policy.locate import KeyPath, locate
from igd.ports import PortRangeError, PortSet

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)

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
    clients: tuple[IPv4Network, ...] | None = None
    internal_addresses: tuple[IPv4Network, ...] | None = None
    internal_ports: PortSet | None = None
    external_ports: PortSet | None = None
    protocols: frozenset[Protocol] | None = None
    via: frozenset[Mechanism] | None = None
    description: re.Pattern[str] | None = None
    max_lease: int | None = None
    max_mappings_per_client: int | None = None
    allow_third_party: bool = False
    line: int | None = field(default=None, compare=False)
    """Line of the rule's table header in its file, for messages."""


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem found in a policy file."""

    source: str
    line: int | None
    key: str
    """Dotted path of the offending key, e.g. "rules[2].clients" (rules count from 0)."""
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.key}: {self.message}"


class PolicyFileError(ValueError):
    """A policy file that cannot be used; `issues` holds every problem found, in file order."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


def read_file(path: str | os.PathLike[str]) -> tuple[Defaults, tuple[Rule, ...]]:
    """Read and validate a policy file; raise PolicyFileError."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise PolicyFileError(
            [PolicyIssue(source, None, "file", f"cannot read: {error.strerror or error}")]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        issue = PolicyIssue(source, line, "file", "not UTF-8 text (TOML files must be UTF-8)")
        raise PolicyFileError([issue]) from None
    return read_text(text, source)


def read_text(text: str, source: str = "<string>") -> tuple[Defaults, tuple[Rule, ...]]:
    """Parse and validate policy text, collecting every issue; raise PolicyFileError."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyFileError([_syntax_issue(error, text, source)]) from None
    reader = _Reader(source, locate(text))
    defaults, rules = reader.document(document)
    if reader.issues:
        raise PolicyFileError(sorted(reader.issues, key=lambda i: i.line or 0))
    return defaults, rules


_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _syntax_issue(error: tomllib.TOMLDecodeError, text: str, source: str) -> PolicyIssue:
    # tomllib (3.11) reports positions only inside its message: "... (at line 3, column 10)".
    message = str(error)
    found = _POSITION.search(message)
    if found is None:
        return PolicyIssue(source, None, "syntax", message)
    message = message[: found.start()]
    if found.group(1) is None:
        return PolicyIssue(source, max(1, len(text.splitlines())), "syntax", message)
    return PolicyIssue(
        source, int(found.group(1)), "syntax", f"{message} (column {found.group(2)})"
    )


# -- validation ----------------------------------------------------------------------------


class _Bad(Exception):
    """A value that fails validation: messages, each with the list index it is about or None."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, int | None]] = [(message, index)]


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
)
_TOP_KEYS = ("defaults", "rules")


class _Reader:
    """Turns a parsed TOML document into Defaults and Rules, recording issues as it goes."""

    def __init__(self, source: str, lines: dict[KeyPath, int]) -> None:
        self.source = source
        self.lines = lines
        self.issues: list[PolicyIssue] = []
        self.failed: set[KeyPath] = set()

    def document(self, document: dict[str, Any]) -> tuple[Defaults, tuple[Rule, ...]]:
        self.unknown_keys((), document, _TOP_KEYS)
        table = document.get("defaults", {})
        if not isinstance(table, dict):
            self.issue(("defaults",), f"want a table ([defaults]), got {_kind(table)}")
            table = {}
        defaults = self.defaults(table)
        entries = document.get("rules", [])
        if not isinstance(entries, list):
            self.issue(("rules",), f"want an array of tables ([[rules]]), got {_kind(entries)}")
            entries = []
        rules: list[Rule] = []
        first_use: dict[str, int | None] = {}
        for index, entry in enumerate(entries):
            path: KeyPath = ("rules", index)
            if not isinstance(entry, dict):
                self.issue(path, f"want a table, got {_kind(entry)}")
                continue
            rule = self.rule(path, entry, defaults)
            if rule.name in first_use:
                line = first_use[rule.name]
                earlier = f" (first used on line {line})" if line is not None else ""
                self.issue((*path, "name"), f"duplicate rule name {rule.name!r}{earlier}")
            elif rule.name:
                first_use[rule.name] = self.line_of((*path, "name"))
            rules.append(rule)
        return defaults, tuple(rules)

    def defaults(self, table: dict[str, Any]) -> Defaults:
        path: KeyPath = ("defaults",)
        self.unknown_keys(path, table, _DEFAULT_KEYS)
        base = Defaults()
        defaults = Defaults(
            action=self.value(table, path, "action", _action, base.action),
            secure_mode=self.value(table, path, "secure_mode", _boolean, base.secure_mode),
            max_lease=self.value(table, path, "max_lease", _at_least(1), base.max_lease),
            min_lease=self.value(table, path, "min_lease", _at_least(1), base.min_lease),
            max_mappings_per_client=self.value(
                table, path, "max_mappings_per_client", _at_least(0), base.max_mappings_per_client
            ),
            max_mappings=self.value(table, path, "max_mappings", _at_least(0), base.max_mappings),
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
        for required in ("name", "action"):
            if required not in table:
                self.issue((*path, required), "required key is missing")
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
            max_lease=self.value(table, path, "max_lease", _at_least(1), None),
            max_mappings_per_client=self.value(
                table, path, "max_mappings_per_client", _at_least(0), None
            ),
            allow_third_party=self.value(table, path, "allow_third_party", _boolean, False),
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

    def value(
        self,
        table: dict[str, Any],
        path: KeyPath,
        key: str,
        convert: Callable[[Any], _T],
        default: _T,
    ) -> _T:
        """Convert table[key], or record an issue and return the default."""
        if key not in table:
            return default
        try:
            return convert(table[key])
        except _Bad as bad:
            for message, index in bad.problems:
                at = (*path, key) if index is None else (*path, key, index)
                self.issue((*path, key), message, at=at)
            self.failed.add((*path, key))
            return default

    def valid(self, table: dict[str, Any], path: KeyPath, key: str) -> bool:
        """Whether the key is present and converted cleanly (cross-checks need both)."""
        return key in table and (*path, key) not in self.failed

    def sound(self, key: str) -> bool:
        """Whether a [defaults] value is usable for cross-checks (absent counts as usable)."""
        return ("defaults", key) not in self.failed

    def unknown_keys(self, path: KeyPath, table: Mapping[str, Any], known: Iterable[str]) -> None:
        known = tuple(known)
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                where = _dotted(path) or "the top level"
                self.issue((*path, key), f"unknown key {key!r} in {where}{hint}")

    def issue(self, path: KeyPath, message: str, *, at: KeyPath | None = None) -> None:
        line = self.line_of(at or path)
        self.issues.append(PolicyIssue(self.source, line, _dotted(path), message))

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the value at path, else of its nearest enclosing key or table header."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


def _dotted(path: KeyPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _action(value: object) -> Action:
    if not isinstance(value, str):
        raise _Bad(f'want "allow" or "deny", got {_kind(value)}')
    try:
        return Action(value.lower())
    except ValueError:
        raise _Bad(f'unknown action {value!r} (want "allow" or "deny")') from None


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"want true or false, got {_kind(value)}")
    return value


def _at_least(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"want an integer, got {_kind(value)}")
        if value < minimum:
            raise _Bad(f"{value} is below the minimum {minimum}")
        return value

    return convert


def _name(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"want a string, got {_kind(value)}")
    if not value.strip():
        raise _Bad("rule name is empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        # Names go into log lines and protocol error texts: keep them on one line.
        raise _Bad("rule name holds control characters")
    if value == DEFAULTS_NAME:
        raise _Bad(f"{DEFAULTS_NAME!r} is reserved for decisions made by [defaults]")
    return value


def _elements(value: object, example: str, convert: Callable[[str], _T]) -> list[_T]:
    """Convert an array of strings, reporting every bad element, not just the first."""
    if not isinstance(value, list):
        raise _Bad(f"want an array of strings, e.g. [{example}], got {_kind(value)}")
    if not value:
        raise _Bad("empty array matches nothing; leave the key out to match anything")
    converted: list[_T] = []
    problems: list[tuple[str, int | None]] = []
    for index, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise _Bad(f"want a string, got {_kind(item)}")
            converted.append(convert(item))
        except _Bad as bad:
            problems += [(message, index) for message, _ in bad.problems]
    if problems:
        error = _Bad(problems[0][0])
        error.problems = problems
        raise error
    return converted


def _networks(value: object) -> tuple[IPv4Network, ...]:
    return tuple(_elements(value, '"192.168.1.0/24"', _network))


def _network(text: str) -> IPv4Network:
    try:
        network = ip_network(text.strip(), strict=False)
    except ValueError:
        raise _Bad(f"{text!r} is not an IPv4 address or network") from None
    if not isinstance(network, IPv4Network):
        raise _Bad(f"{text!r} is IPv6; the gateway maps IPv4 only")
    host = text.strip().split("/")[0]
    if network.network_address != IPv4Address(host):
        # Host bits set is ambiguous in an access list: the network or the one host?
        raise _Bad(
            f"{text!r} has host bits set; write '{network}' for the network"
            f" or '{host}/32' for the host"
        )
    return network


def _ports(value: object) -> PortSet:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Bad(f'want a port range string such as "1024-65535", got {_kind(value)}')
    try:
        return PortSet.parse(value)
    except PortRangeError as error:
        raise _Bad(str(error)) from None


def _members(kind: type[_E]) -> Callable[[object], frozenset[_E]]:
    choices = ", ".join(str(member.value) for member in kind)

    def member(text: str) -> _E:
        try:
            return kind(text.lower())
        except ValueError:
            raise _Bad(f"unknown value {text!r} (want one of: {choices})") from None

    def convert(value: object) -> frozenset[_E]:
        return frozenset(_elements(value, f'"{next(iter(kind)).value}"', member))

    return convert


def _regex(value: object) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise _Bad(f"want a regular expression string, got {_kind(value)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise _Bad(f"bad regular expression: {error}") from None
    if caught:
        # re warns where a future Python will read the pattern differently (nested sets).
        raise _Bad(f"ambiguous regular expression: {caught[0].message} (escape '[' as '\\[')")
    return pattern
