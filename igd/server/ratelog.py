"""Rate-limited logging for what the network can make happen at will (bad datagrams, bad
requests, refusals): one line per interval, carrying how many were left unsaid."""

from __future__ import annotations

import logging

LOG_INTERVAL = 60.0  # seconds between two lines of one kind


class RateLimitedLog:
    """One kind of event: counted always, logged at most once per `interval` seconds."""

    def __init__(
        self, logger: logging.Logger, level: int, *, interval: float = LOG_INTERVAL
    ) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.count = 0
        """Events noted since start (logged or not)."""
        self._quiet_until = float("-inf")
        self._unsaid = 0

    def note(self, now: float, message: str, *args: object) -> None:
        """Count one event; log it unless a line of this kind went out within the interval."""
        self.count += 1
        if now < self._quiet_until:
            self._unsaid += 1
            return
        if self._unsaid:
            message += " (and %d more like it since the previous such line)"
            args = (*args, self._unsaid)
        self.logger.log(self.level, message, *args)
        self._unsaid = 0
        self._quiet_until = now + self.interval
