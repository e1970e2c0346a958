"""Living under a service manager: sd_notify readiness messages and log lines for journald.

No dependency: the notify protocol is one datagram on the Unix socket named by $NOTIFY_SOCKET
(sd_notify(3)); journald reads a `<priority>` prefix on each line of a stream (SyslogLevelPrefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from typing import TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# syslog(3) priorities for journald's "<N>" line prefix.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def notify(*fields: str) -> bool:
    """Send `READY=1`-style fields to the service manager; False when none listens."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    """Tell the manager the daemon serves (after the kernel was reconciled)."""
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """Tell the manager a reload began; `ready` ends it."""
    # MONOTONIC_USEC lets Type=notify-reload managers (systemd 253+) match the reload.
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now}")


def stopping() -> bool:
    """Tell the manager the daemon is stopping."""
    return notify("STOPPING=1")


def journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is connected to journald ($JOURNAL_STREAM names its device:inode)."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    if not wanted:
        return False
    with contextlib.suppress(OSError, ValueError, AttributeError):
        info = os.fstat(stream.fileno())
        return wanted == f"{info.st_dev}:{info.st_ino}"
    return False


class OneLineFormatter(logging.Formatter):
    """Every record on one line: continuation lines and tracebacks joined with ` | `."""

    def __init__(self, *, timestamps: bool, priority: bool) -> None:
        stamp = "%(asctime)s " if timestamps else ""
        level = "" if priority else "%(levelname)s "
        super().__init__(f"{stamp}{level}%(name)s: %(message)s")
        self.timestamps = timestamps
        self.priority = priority
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line, with journald's priority prefix when asked."""
        if record.exc_info or record.exc_text or record.stack_info:
            text = super().format(record)
        else:
            # The same line logging.Formatter makes, without its style machinery and with
            # the strftime done once a second: a grant's INFO line is on the hot path.
            message = record.message = record.getMessage()
            head = f"{record.name}: " if self.priority else f"{record.levelname} {record.name}: "
            if self.timestamps:
                head = f"{self.formatTime(record)} {head}"
            text = head + message
        if "\n" in text or "\r" in text:
            text = " | ".join(line.strip() for line in text.splitlines() if line)
        if self.priority:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's default time text (local time, milliseconds after a comma), its
        strftime cached for the current second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        record.asctime = text = f"{self._stamp},{int(record.msecs):03d}"  # default_msec_format
        return text


class TurnHandler(logging.StreamHandler[TextIO]):
    """Writes the lines logged during one turn of the running event loop with one write, at
    the start of the next turn; a record logged outside the loop's thread (or with no loop)
    is written at once, after any lines still waiting. Under load a turn grants up to a
    hundred mappings, each with its line: one write(2) instead of one each. A `kill -9`
    loses at most the lines of the turn it interrupts (the commits are already durable)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record's line for the end of this loop turn (or write it now)."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._waiting.append(line)
        if loop is None:
            self.flush()
        elif len(self._waiting) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the waiting lines."""
        with self.lock if self.lock is not None else contextlib.nullcontext():
            lines, self._waiting = self._waiting, []
            if not lines:
                return
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except Exception:
                # Where the records are gone, as StreamHandler does for one.
                sys.stderr.write(f"--- logging failed to write {len(lines)} lines ---\n")


def setup_logging(level: int, stream: TextIO | None = None) -> None:
    """Log to stderr, one line per record; no timestamps when systemd adds its own."""
    stream = sys.stderr if stream is None else stream
    journal = journal_stream(stream)
    # Under systemd (INVOCATION_ID) whatever collects the output stamps each line already.
    managed = journal or bool(os.environ.get("INVOCATION_ID"))
    # The line carries none of these, and finding the caller walks the stack on every
    # record (the logging HOWTO's "Optimization"): a grant's line cost about a third less.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TurnHandler(stream)
    handler.setFormatter(OneLineFormatter(timestamps=not managed, priority=journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
