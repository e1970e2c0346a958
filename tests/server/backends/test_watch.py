"""Reading nf_tables notifications (pure): which transactions removed something of ours."""

from __future__ import annotations

import struct

from igd.server.backends.watch import Event, Transactions, parse_events


def attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def message(kind: int, family: int, *attrs: bytes) -> bytes:
    body = bytes((family, 0, 0, 0)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | kind, 0, 0, 0) + body


def commit(pid: int, name: str = "nft") -> bytes:
    return message(15, 0, attr(1, b"\0\0\0\1"), attr(2, pid.to_bytes(4, "big")),
                   attr(3, name.encode() + b"\0"))  # fmt: skip


def test_deletions_and_commits_are_read_and_everything_else_skipped() -> None:
    data = (
        message(2, 2, attr(1, b"igd\0"))  # DELTABLE ip igd
        + message(14, 2, attr(1, b"igd\0"), attr(2, b"portmap\0"))  # DELSETELEM
        + message(12, 2, attr(1, b"igd\0"))  # NEWSETELEM: not a deletion
        + struct.pack("=IHHII", 20, (1 << 8) | 2, 0, 0, 0)
        + b"\0" * 4  # another subsystem
        + commit(4242)
    )
    assert list(parse_events(data)) == [
        Event("table", 2, "igd"),
        Event("element", 2, "igd"),
        Event("commit", pid=4242, process="nft"),
    ]
    assert list(parse_events(data[:-3])) == list(parse_events(data))[:2]  # truncated tail


def test_only_foreign_commits_that_touched_our_table_are_reported() -> None:
    seen = Transactions("igd", own={7})
    ours = Event("element", 2, "igd")
    assert seen.feed(ours) is None
    assert seen.feed(Event("commit", pid=7)) is None  # our own thread
    assert seen.feed(Event("table", 2, "other")) is None
    assert seen.feed(Event("table", 10, "igd")) is None  # inet igd: not our family
    assert seen.feed(Event("commit", pid=99)) is None  # touched nothing of ours
    assert seen.feed(ours) is None
    assert seen.feed(Event("table", 2, "igd")) is None
    assert seen.feed(Event("commit", pid=99, process="fw4")) == "the table deleted by fw4 (pid 99)"
    assert seen.feed(Event("rule", 2, "igd")) is None
    assert seen.feed(Event("commit", pid=5)) == "rule deleted by unknown (pid 5)"
