"""The daemon's log lines: the fast paths write exactly what logging itself would."""

import logging
from ipaddress import IPv4Address

from igd.server.systemd import OneLineFormatter

A = IPv4Address("192.168.1.10")


def test_the_fast_log_line_is_the_one_logging_makes() -> None:
    for timestamps in (True, False):
        for priority in (True, False):
            fast = OneLineFormatter(timestamps=timestamps, priority=priority)
            plain = logging.Formatter(fast._fmt)
            for message, args in (("granted %s %d", ("natpmp", 3)), ("100%% of %r", ("x",))):
                record = logging.LogRecord("igd.gateway", logging.INFO, "f", 1, message, args, None)
                expected = plain.format(record)
                assert fast.format(record) == (f"<6>{expected}" if priority else expected)


def test_the_quick_info_line_is_the_one_logging_makes() -> None:
    import asyncio
    import io

    from igd.server import systemd

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logger_class = logging.getLoggerClass()
    loggers = {
        logger: type(logger)
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    }
    stream = io.StringIO()
    try:
        systemd.setup_logging(logging.INFO, stream)
        log = logging.getLogger("igd.gateway")
        assert isinstance(log, systemd.QuickLogger)
        args = ("granted", "natpmp", A, 6000, "r1", "")

        async def both() -> None:
            log.info("%s %s %s -> %d (rule %r%s)", *args)  # the quick path
            log.info("%s %s %s -> %d (rule %r%s)", *args, stacklevel=1)  # logging's own

        asyncio.run(both())
        quick, plain = stream.getvalue().splitlines()
        # The timestamps may differ by a millisecond: compare what follows them.
        assert quick.split(" ", 2)[2] == plain.split(" ", 2)[2]
        assert quick.split(" ", 2)[2] == (
            "INFO igd.gateway: granted natpmp 192.168.1.10 -> 6000 (rule 'r1')"
        )
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        # setup_logging switched every logger, and the class of new ones, to QuickLogger.
        logging.setLoggerClass(logger_class)
        for logger, kind in loggers.items():
            logger.__class__ = kind
