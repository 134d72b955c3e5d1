"""Store failures in the log: one line for an outage, not one per failed write.

While the store is down (Redis unreachable, a failing SQLite disk) every
write of every device fails, and each device's resent report is written
again: a line (let alone a traceback) per failure would be thousands a
second for a large fleet, and would bury the one line that says why.
So the first failure of an outage is logged once, with the store's
reason; while writes keep failing, one summary line at most per
``interval``; the first write that lands again ends the outage with one
line.  Time is read when a failure comes (no timer).  The failures stay
counted one by one by the caller (``store_failures``).
"""

from __future__ import annotations

import time

from twisted.logger import Logger, LogLevel

from broker.registry.errors import StoreError

__all__ = ["StoreOutageLog", "STORE_OUTAGE_LOG_INTERVAL"]

#: Seconds between two summary lines of one outage.
STORE_OUTAGE_LOG_INTERVAL = 10.0


def _subject(what: str, name) -> str:
    return what if name is None else f"{what} of {name}"


class StoreOutageLog:
    """The log lines of store write failures on one endpoint.

    ``now`` is a monotonic time source (seconds).  A StoreError is the
    store telling why (its message is the reason, no traceback); any
    other exception is a bug somewhere and its traceback is logged, once
    per exception type and outage.
    """

    log = Logger()

    __slots__ = ("_now", "interval", "_since", "_summary_at", "_total", "_window",
                 "_reason", "_tracebacks")

    def __init__(self, now=time.monotonic, interval: float = STORE_OUTAGE_LOG_INTERVAL) -> None:
        self._now = now
        self.interval = interval
        self._since = None          # when the outage began (None: writes succeed)
        self._summary_at = 0.0      # when the last line of this outage was logged
        self._total = 0             # failures since the outage began
        self._window = 0            # failures since the last line
        self._reason = ""
        self._tracebacks: set = set()   # exception types logged with a traceback

    @property
    def failing(self) -> bool:
        """Whether the last write to report failed (an outage is on)."""
        return self._since is not None

    def failed(self, failure, what: str, name=None) -> None:
        """A write (``what`` of device ``name``) was not durable because of ``failure``."""
        now = self._now()
        expected = failure.check(StoreError) is not None
        self._reason = reason = failure.getErrorMessage()
        if self._since is None:
            self._since = self._summary_at = now
            self._total, self._window = 1, 0
            self._tracebacks.clear()
            if expected:
                self.log.warn("store writes failing, nothing is acknowledged until they "
                              "land ({subject} not durable): {reason}; further failures "
                              "are summed up every {interval:g} s",
                              subject=_subject(what, name), reason=reason,
                              interval=self.interval)
        else:
            self._total += 1
            self._window += 1
            if now - self._summary_at >= self.interval:
                self.log.warn("{count} store writes failed in the last {seconds:.0f} s "
                              "({total} since the outage began {duration:.0f} s ago): {reason}",
                              count=self._window, seconds=now - self._summary_at,
                              total=self._total, duration=now - self._since, reason=reason)
                self._summary_at, self._window = now, 0
        if not expected and failure.type not in self._tracebacks:
            self._tracebacks.add(failure.type)
            self.log.failure("{subject} not durable: nothing is acknowledged", failure,
                             level=LogLevel.error, subject=_subject(what, name))

    def succeeded(self) -> None:
        """A write landed: ends an outage (one line)."""
        if self._since is None:
            return
        now = self._now()
        self.log.info("store writes succeed again after {total} failures in {duration:.1f} s "
                      "(last reason: {reason})", total=self._total,
                      duration=now - self._since, reason=self._reason)
        self._since = None
        self._total = self._window = 0
        self._tracebacks.clear()
