"""The time budget: a global deadline, and a limit per row that stops a run that overruns it.

A stuck or slow row (an SVD sweep longer than planned, a hang) must not keep the table from being
written: ``SIGALRM`` raises :class:`RowInterrupted` in the main thread at the row's limit, which the
check reports as that row's failure, and rows left when the deadline has passed are reported as not run.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import time
from collections.abc import Iterator


class RowInterrupted(BaseException):
    """A row ran past its limit. A BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, reason: str, seconds: float):
        super().__init__(f"stopped after {seconds:.0f} s: {reason}")
        self.reason = reason


class Budget:
    """``seconds`` from ``started_at`` (epoch seconds: the shell script's start, so the install counts)."""

    def __init__(self, seconds: float, started_at: float, row_limit_s: float, min_slot_s: float):
        self.seconds, self.started_at = seconds, started_at
        self.row_limit_s, self.min_slot_s = row_limit_s, min_slot_s
        self._durations: list[float] = []

    @property
    def deadline(self) -> float:
        return self.started_at + self.seconds

    def elapsed(self) -> float:
        return time.time() - self.started_at

    def remaining(self) -> float:
        return self.deadline - time.time()

    def can_start(self) -> bool:
        """Enough time left for a typical row (the median so far, at least ``min_slot_s``)?"""
        typical = statistics.median(self._durations) if self._durations else 0.0
        return self.remaining() >= max(self.min_slot_s, typical)

    def record(self, seconds: float) -> None:
        self._durations.append(seconds)

    @contextlib.contextmanager
    def limit(self) -> Iterator[None]:
        """Run the body for at most the row limit, and never past the deadline."""
        left = self.remaining()
        seconds = max(min(self.row_limit_s, left), 0.001)
        reason = "time budget" if left <= self.row_limit_s else f"the {self.row_limit_s:g} s limit of one row"

        def on_alarm(signum, frame):
            raise RowInterrupted(reason, seconds)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
