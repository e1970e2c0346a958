"""Reading a TOML file into typed values, every problem located by file, line and key.

The policy file (`igd.policy.file`) and the daemon's configuration (`igd.server.config`) both
read through this: the same messages, line numbers and "did you mean" hints.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from igd.policy.locate import KeyPath, locate

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class FileIssue:
    """One problem found in a file."""

    source: str
    line: int | None
    key: str
    """Dotted path of the offending key, e.g. "rules[2].clients" (arrays count from 0)."""
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.key}: {self.message}"


class FileError(ValueError):
    """A file that cannot be used; `issues` holds every problem found, in file order."""

    def __init__(self, issues: list[FileIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


def read_path(path: str | os.PathLike[str], error: type[FileError]) -> str:
    """The file's text; raise `error` when it cannot be read or is not UTF-8."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as failure:
        message = f"cannot read: {failure.strerror or failure}"
        raise error([FileIssue(source, None, "file", message)]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as failure:
        line = data[: failure.start].count(b"\n") + 1
        issue = FileIssue(source, line, "file", "not UTF-8 text (TOML files must be UTF-8)")
        raise error([issue]) from None


def parse_toml(text: str, source: str, error: type[FileError]) -> dict[str, Any]:
    """The parsed document; raise `error` with the syntax error's line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as failure:
        raise error([_syntax_issue(failure, text, source)]) from None


_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _syntax_issue(error: tomllib.TOMLDecodeError, text: str, source: str) -> FileIssue:
    # tomllib (3.11) reports positions only inside its message: "... (at line 3, column 10)".
    message = str(error)
    found = _POSITION.search(message)
    if found is None:
        return FileIssue(source, None, "syntax", message)
    message = message[: found.start()]
    if found.group(1) is None:
        return FileIssue(source, max(1, len(text.splitlines())), "syntax", message)
    return FileIssue(source, int(found.group(1)), "syntax", f"{message} (column {found.group(2)})")


class Bad(Exception):
    """A value that fails validation: messages, each with the list index it is about or None."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, int | None]] = [(message, index)]


class Reader:
    """Converts values of a parsed document, recording located issues as it goes."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = locate(text)
        self.issues: list[FileIssue] = []
        self.failed: set[KeyPath] = set()

    def raise_issues(self, error: type[FileError]) -> None:
        """Raise `error` with every issue in file order, if there are any."""
        if self.issues:
            raise error(sorted(self.issues, key=lambda issue: issue.line or 0))

    def section(self, document: Mapping[str, Any], name: str) -> dict[str, Any]:
        """The top-level table `name` ({} if absent; an issue if it is not a table)."""
        value = document.get(name, {})
        if isinstance(value, dict):
            return value
        self.issue((name,), f"want a table ([{name}]), got {kind(value)}")
        return {}

    def value(
        self,
        table: Mapping[str, Any],
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
        except Bad as bad:
            for message, index in bad.problems:
                at = (*path, key) if index is None else (*path, key, index)
                self.issue((*path, key), message, at=at)
            self.failed.add((*path, key))
            return default

    def required(self, table: Mapping[str, Any], path: KeyPath, keys: Iterable[str]) -> None:
        """Record an issue for each of `keys` missing from the table."""
        for key in keys:
            if key not in table:
                self.issue((*path, key), "required key is missing")

    def valid(self, table: Mapping[str, Any], path: KeyPath, key: str) -> bool:
        """Whether the key is present and converted cleanly (cross-checks need both)."""
        return key in table and (*path, key) not in self.failed

    def unknown_keys(self, path: KeyPath, table: Mapping[str, Any], known: Iterable[str]) -> None:
        """An issue for each key not in `known`, with the closest known key as a hint."""
        known = tuple(known)
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                where = dotted(path) or "the top level"
                self.issue((*path, key), f"unknown key {key!r} in {where}{hint}")

    def unknown_sections(self, document: Mapping[str, Any], known: Iterable[str]) -> None:
        """An issue for each top-level table not in `known`, with the closest as a hint."""
        known = tuple(known)
        for name in document:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean [{close[0]}]?)" if close else ""
                self.issue((name,), f"unknown section [{name}]{hint}")

    def issue(self, path: KeyPath, message: str, *, at: KeyPath | None = None) -> None:
        """Record a problem with the key at `path`, located at `at` (default: `path`)."""
        line = self.line_of(at or path)
        self.issues.append(FileIssue(self.source, line, dotted(path), message))

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the value at path, else of its nearest enclosing key or table header."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


def dotted(path: KeyPath) -> str:
    """`("rules", 2, "clients")` as "rules[2].clients"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def kind(value: object) -> str:
    """The TOML type of a parsed value, for messages."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def boolean(value: object) -> bool:
    """A TOML boolean."""
    if not isinstance(value, bool):
        raise Bad(f"want true or false, got {kind(value)}")
    return value


def integer(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    """A converter for TOML integers from `minimum` (to `maximum`)."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(f"want an integer, got {kind(value)}")
        if value < minimum:
            raise Bad(f"{value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise Bad(f"{value} is above the maximum {maximum}")
        return value

    return convert


def at_least(minimum: int) -> Callable[[object], int]:
    """A converter for TOML integers of at least `minimum`."""
    return integer(minimum)


def string(value: object) -> str:
    """A non-empty TOML string."""
    if not isinstance(value, str):
        raise Bad(f"want a string, got {kind(value)}")
    if not value:
        raise Bad("empty string")
    return value
