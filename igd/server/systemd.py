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
from collections.abc import Mapping
from typing import Any, TextIO

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
            return self._finish(super().format(record), record.levelno)
        # The same line logging.Formatter makes, without its style machinery and with
        # the strftime done once a second: a grant's INFO line is on the hot path.
        message = record.message = record.getMessage()
        if self.timestamps:
            self.formatTime(record)
        return self._line(record.name, record.levelno, record.levelname, record, message)

    def line(self, name: str, levelno: int, created: float, message: str) -> str:
        """The line format() makes of a record with these fields and no exception."""
        return self._line(name, levelno, logging.getLevelName(levelno), created, message)

    def _line(
        self,
        name: str,
        levelno: int,
        levelname: str,
        when: logging.LogRecord | float,
        message: str,
    ) -> str:
        head = f"{name}: " if self.priority else f"{levelname} {name}: "
        if self.timestamps:
            stamp = when.asctime if isinstance(when, logging.LogRecord) else self._time(when)
            head = f"{stamp} {head}"
        return self._finish(head + message, levelno)

    def _finish(self, text: str, levelno: int) -> str:
        if "\n" in text or "\r" in text:
            text = " | ".join(line.strip() for line in text.splitlines() if line)
        if self.priority:
            return f"<{_PRIORITY.get(levelno, 6)}>{text}"
        return text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's default time text (local time, milliseconds after a comma), its
        strftime cached for the current second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        record.asctime = text = self._time(record.created, record.msecs)
        return text

    def _time(self, created: float, msecs: float | None = None) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(created))
            self._second = second
        if msecs is None:
            msecs = int((created - second) * 1000) + 0.0  # as LogRecord works it out
        return f"{self._stamp},{int(msecs):03d}"  # default_msec_format


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
        self._queue(line, loop)

    def queue(self, line: str) -> None:
        """Queue a line already formatted (QuickLogger's), as emit() queues a record's."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.lock if self.lock is not None else contextlib.nullcontext():
            self._queue(line, loop)

    def _queue(self, line: str, loop: asyncio.AbstractEventLoop | None) -> None:
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


class QuickLogger(logging.Logger):
    """A logger whose INFO calls skip the LogRecord while the daemon's TurnHandler is the
    only place a record could go (no filter, no other handler): the same line, queued the
    same way. Building the record and walking the handler machinery was half the cost of
    a grant's INFO line; anything else (keywords, a mapping argument, another handler,
    pytest's capture) takes logging's own path."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Log msg % args at INFO."""
        if not self.isEnabledFor(logging.INFO):
            return
        handler = None if kwargs else _sole_turn_handler(self)
        if handler is None or (len(args) == 1 and isinstance(args[0], Mapping)):
            super().info(msg, *args, **kwargs)
            return
        try:
            message = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            super().info(msg, *args, **kwargs)  # logging reports the bad format
            return
        formatter = handler.formatter
        assert isinstance(formatter, OneLineFormatter)
        handler.queue(formatter.line(self.name, logging.INFO, time.time(), message))


def _sole_turn_handler(logger: logging.Logger) -> TurnHandler | None:
    """The TurnHandler an INFO record of `logger` would reach, if it is all it reaches."""
    found: TurnHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if (
                found is not None
                or type(handler) is not TurnHandler
                or handler.filters
                or handler.level > logging.INFO
                or type(handler.formatter) is not OneLineFormatter
            ):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


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
    # The modules' loggers exist already (module-level getLogger): switch them over too.
    logging.setLoggerClass(QuickLogger)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if type(logger) is logging.Logger:
            logger.__class__ = QuickLogger
