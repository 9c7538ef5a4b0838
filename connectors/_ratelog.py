"""Logging that a flood of bad input cannot turn into a flood of log lines.

A client that sends ten thousand malformed requests should cost the log a few lines, not
megabytes: :class:`RateLimitedLog` writes one line per distinct reason per interval and
reports how many similar lines it held back with the next one it writes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RateLimitedLog"]

_NUMBERS = re.compile(r"\d+")


class RateLimitedLog:
    """Writes at most one line per reason per ``interval`` seconds to ``logger``.

    The reason is the message with its numbers blanked out (so "frame over 1000 bytes" and
    "frame over 2000 bytes" count as one), cut to 100 characters. At most ``max_reasons`` are
    remembered; once that many are in the current interval, further new reasons share one
    slot, so the table stays bounded whatever producers send.

    Args:
        logger: Where the lines go.
        interval: Seconds between two lines for the same reason.
        max_reasons: Distinct reasons tracked per interval.
        clock: A monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        max_reasons: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._max_reasons = max_reasons
        self._clock = clock
        # reason -> [time of its last line, lines held back since]
        self._reasons: dict[str, list[float]] = {}

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        """Logs ``msg % args`` unless a line with the same reason was written recently.

        ``exc_info`` adds the traceback (only to the lines actually written).
        """
        if not self._logger.isEnabledFor(level):
            return
        now = self._clock()
        text = msg % args if args else msg
        # Client input quoted in a reason may hold lone surrogates, which no log file takes.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        reason = _NUMBERS.sub("N", text)[:100]
        if reason not in self._reasons and len(self._reasons) >= self._max_reasons:
            self._forget_before(now - self._interval)
            if len(self._reasons) >= self._max_reasons:
                reason = "(other reasons)"
        entry = self._reasons.get(reason)
        if entry is not None and now - entry[0] < self._interval:
            entry[1] += 1
            return
        held = int(entry[1]) if entry is not None else 0
        self._reasons[reason] = [now, 0]
        if held:
            text += f" ({held} similar line(s) suppressed in the last {self._interval:g} s)"
        self._logger.log(level, "%s", text, exc_info=exc_info)

    def _forget_before(self, cutoff: float) -> None:
        """Drops reasons quiet for an interval (their held-back count goes unreported)."""
        for reason in [r for r, (t, _) in self._reasons.items() if t < cutoff]:
            del self._reasons[reason]
