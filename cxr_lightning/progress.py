"""Progress lines for a log file: ``demo images: 320/648 (49%), 11 s, eta 12 s``.

Rich's bars draw on a terminal and leave nothing in a file (nohup, SLURM, CI). These are plain
log records, throttled in time so that a long loop writes a few lines and a short one none but
its last, and they go wherever logging goes."""
from __future__ import annotations

import logging
import time


def duration(seconds: float) -> str:
    """``41 s``, ``1m22s``, ``2h05m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """``advance(n)`` as work is done; a line at most every ``every`` seconds, and ``done()`` ends
    with one when the loop took longer than ``quiet_below`` seconds (short loops stay silent)."""

    def __init__(self, what: str, total: int, log: logging.Logger, every: float = 10.0,
                 quiet_below: float = 5.0) -> None:
        self.what, self.total, self.log = what, int(total), log
        self.every, self.quiet_below = every, quiet_below
        self.count = 0
        self.start = self._last = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.count += int(n)
        now = time.perf_counter()
        if now - self._last >= self.every and self.count < self.total:
            self._last = now
            self._line(now)

    def done(self) -> None:
        now = time.perf_counter()
        if now - self.start >= self.quiet_below:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        share = self.count / self.total if self.total else 1.0
        eta = f", eta {duration(elapsed / share - elapsed)}" if 0 < share < 1 else ""
        self.log.info("%s: %d/%d (%.0f%%), %s%s", self.what, self.count, self.total, 100 * share,
                      duration(elapsed), eta)
