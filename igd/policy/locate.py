"""Where keys sit in TOML text: tomllib reports no positions, so this re-reads the text."""

from __future__ import annotations

import re
from bisect import bisect_right

KeyPath = tuple[str | int, ...]
"""Where a value sits in a document: ("rules", 2, "clients", 0) is rules[2].clients[0]."""


def locate(text: str) -> dict[KeyPath, int]:
    """Line (from 1) of every table header, key and array element in valid TOML text."""
    scanner = _Scanner(text)
    try:
        scanner.document()
    except (IndexError, ValueError):
        # Meant for text tomllib accepted; on anything else keep what was found so far.
        pass
    return scanner.lines


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}#\r\n]|$")


class _Scanner:
    """A position-only TOML reader: it records where things are and skips over values."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._counts: dict[KeyPath, int] = {}
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def document(self) -> None:
        table: KeyPath = ()
        while True:
            self._blank(newlines=True)
            if self.pos >= len(self.text):
                return
            start = self.pos
            if self.text.startswith("[[", start):
                self.pos += 2
                name = self._key()
                self._expect("]]")
                index = self._counts.get(name, 0)
                self._counts[name] = index + 1
                table = (*name, index)
                self._mark(name, start)
                self._mark(table, start)
            elif self.text[start] == "[":
                self.pos += 1
                table = self._key()
                self._expect("]")
                self._mark(table, start)
            else:
                self._key_value(table)

    def _key_value(self, table: KeyPath) -> None:
        start = self.pos
        path = (*table, *self._key())
        self._expect("=")
        for end in range(len(table) + 1, len(path) + 1):
            self._mark(path[:end], start)
        self._blank(newlines=False)
        self._value(path)

    def _key(self) -> KeyPath:
        parts: list[str] = []
        while True:
            self._blank(newlines=False)
            char = self.text[self.pos]
            if char in "\"'":
                begin = self.pos + 1
                self._string()
                parts.append(self.text[begin : self.pos - 1])
            else:
                found = _BARE_KEY.match(self.text, self.pos)
                if found is None:
                    raise ValueError(f"no key at offset {self.pos}")
                parts.append(found.group())
                self.pos = found.end()
            self._blank(newlines=False)
            if self.text[self.pos] != ".":
                return tuple(parts)
            self.pos += 1

    def _value(self, path: KeyPath) -> None:
        char = self.text[self.pos]
        if char == "[":
            self.pos += 1
            index = 0
            while True:
                self._blank(newlines=True)
                if self.text[self.pos] == "]":
                    self.pos += 1
                    return
                self._mark((*path, index), self.pos)
                self._value((*path, index))
                index += 1
                self._blank(newlines=True)
                if self.text[self.pos] == ",":
                    self.pos += 1
        elif char == "{":
            self.pos += 1
            while True:
                self._blank(newlines=True)
                if self.text[self.pos] == "}":
                    self.pos += 1
                    return
                self._key_value(path)
                self._blank(newlines=True)
                if self.text[self.pos] == ",":
                    self.pos += 1
        elif char in "\"'":
            self._string()
        else:
            end = _SCALAR_END.search(self.text, self.pos)
            assert end is not None  # the pattern matches at the end of text at the latest
            if end.start() == self.pos:
                raise ValueError(f"no value at offset {self.pos}")
            self.pos = end.start()

    def _string(self) -> None:
        text, pos = self.text, self.pos
        quote = text[pos]
        if text.startswith(quote * 3, pos):
            end = pos + 3
            while not text.startswith(quote * 3, end):
                end += 2 if quote == '"' and text[end] == "\\" else 1
            # Up to two quotes may sit right before the closing delimiter (TOML 1.0).
            extra = 0
            while extra < 2 and text.startswith(quote, end + 3 + extra):
                extra += 1
            self.pos = end + 3 + extra
            return
        end = pos + 1
        while text[end] != quote:
            if text[end] == "\n":
                raise ValueError(f"unterminated string at offset {pos}")
            end += 2 if quote == '"' and text[end] == "\\" else 1
        self.pos = end + 1

    def _blank(self, *, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t" or (newlines and char in "\r\n"):
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _expect(self, token: str) -> None:
        self._blank(newlines=False)
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r} at offset {self.pos}")
        self.pos += len(token)

    def _mark(self, path: KeyPath, pos: int) -> None:
        self.lines.setdefault(path, bisect_right(self._starts, pos))
