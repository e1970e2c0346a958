"""Port ranges: immutable sets of ports held as sorted, disjoint, inclusive intervals."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_ITEM = re.compile(r"^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$")


class PortRangeError(ValueError):
    """A port range text that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class PortSet:
    """A set of ports 0..65535, e.g. parsed from "21, 23, 137-139, 1024-65535"."""

    intervals: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> PortSet:
        """Parse a comma-separated list of ports and lo-hi ranges; raise PortRangeError."""
        if not text.strip():
            raise PortRangeError("empty port range")
        spans = []
        for item in text.split(","):
            m = _ITEM.match(item)
            if m is None:
                raise PortRangeError(f"malformed port range {item.strip()!r} (want N or N-M)")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi > 65535:
                raise PortRangeError(f"port {hi} is above 65535")
            if lo > hi:
                raise PortRangeError(f"range {lo}-{hi} runs backwards")
            spans.append((lo, hi))
        return cls.of(spans)

    @classmethod
    def of(cls, spans: Iterable[tuple[int, int]]) -> PortSet:
        """Normalise any intervals into a PortSet (merging overlaps and neighbours)."""
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return cls(tuple(merged))

    @classmethod
    def full(cls) -> PortSet:
        """Every port 1..65535 (port 0 is never a real mapping)."""
        return cls(((1, 65535),))

    def __contains__(self, port: object) -> bool:
        if not isinstance(port, int):
            return False
        # A plain loop, no generator: the policy asks this for every request.
        for lo, hi in self.intervals:
            if port <= hi:
                return port >= lo  # sorted and disjoint: no later interval holds it
        return False

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.intervals)

    def __bool__(self) -> bool:
        return bool(self.intervals)

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self.intervals:
            yield from range(lo, hi + 1)

    def nth(self, index: int) -> int:
        """The index-th smallest port (0-based); O(number of intervals)."""
        for lo, hi in self.intervals:
            width = hi - lo + 1
            if index < width:
                return lo + index
            index -= width
        raise IndexError("port index out of range")

    def subtract(self, other: PortSet) -> PortSet:
        """Ports in self but not in other."""
        result: list[tuple[int, int]] = []
        for lo, hi in self.intervals:
            start = lo
            for olo, ohi in other.intervals:
                if ohi < start or olo > hi:
                    continue
                if olo > start:
                    result.append((start, olo - 1))
                start = max(start, ohi + 1)
                if start > hi:
                    break
            if start <= hi:
                result.append((start, hi))
        return PortSet(tuple(result))

    def intersect(self, other: PortSet) -> PortSet:
        """Ports in both sets."""
        return self.subtract(self.subtract(other))

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.intervals)
