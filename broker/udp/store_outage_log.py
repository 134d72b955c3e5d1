"""Store failures in the log: a few lines for an outage, not one per failed write.

While the store is down (Redis unreachable, a failing SQLite disk) every
write of every device fails, and each device's resent report is written
again: a line (let alone a traceback) per failure would be thousands a
second for a large fleet, and would bury the one line that says why.
A store may also fail only some writes (one Redis shard down, one
device's writes failing among many): failures and successes then
alternate, and must not make a start and an end line per failure.

So an outage begins with its first failure; its first StoreError is
logged once, with the store's reason; while writes keep failing, one
summary line at most per ``interval``, naming the first few failing
devices; it ends with one line once a write lands ``interval`` seconds
or more after the last failure.  Time is read when a write reports (no
timer), so the end line comes with the first success after that quiet
time, and says when the last failure was.  The failures stay counted one
by one by the caller (``store_failures``).
"""

from __future__ import annotations

import time

from twisted.logger import Logger, LogLevel

from broker.registry.errors import StoreError

__all__ = ["StoreOutageLog", "STORE_OUTAGE_LOG_INTERVAL", "NAMED_DEVICES"]

#: Seconds between two summary lines of one outage, and the time without
#: a failure that ends it.
STORE_OUTAGE_LOG_INTERVAL = 10.0

#: Failing devices named in one line; failures of others are only counted.
NAMED_DEVICES = 20


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

    __slots__ = ("_now", "interval", "_since", "_last", "_summary_at", "_total", "_window",
                 "_landed", "_names", "_others", "_reason", "_warned", "_tracebacks")

    def __init__(self, now=time.monotonic, interval: float = STORE_OUTAGE_LOG_INTERVAL) -> None:
        self._now = now
        self.interval = interval
        self._since = None          # when the outage began (None: no outage)
        self._last = 0.0            # when its last failure came
        self._summary_at = 0.0      # when its last line was logged
        self._total = 0             # failures since the outage began
        self._window = 0            # failures since the last line
        self._landed = 0            # writes landed since the last line
        self._names: dict = {}      # the first NAMED_DEVICES devices failing since the last line
        self._others = 0            # failures since the last line of no named device
        self._reason = ""
        self._warned = False        # whether the outage's first StoreError was logged
        self._tracebacks: set = set()   # exception types logged with a traceback

    @property
    def failing(self) -> bool:
        """Whether an outage is on (a failure less than ``interval`` before the last success)."""
        return self._since is not None

    def failed(self, failure, what: str, name=None) -> None:
        """A write (``what`` of device ``name``) was not durable because of ``failure``."""
        now = self._now()
        expected = failure.check(StoreError) is not None
        self._reason = reason = failure.getErrorMessage()
        if self._since is None:
            self._since = self._summary_at = now
            self._total = 0
            self._warned = False
            self._tracebacks.clear()
            self._new_window(now)
        self._last = now
        self._total += 1
        if expected and not self._warned:
            self._warned = True
            self.log.warn("store writes failing, nothing is acknowledged until they "
                          "land ({subject} not durable): {reason}; further failures "
                          "are summed up every {interval:g} s",
                          subject=_subject(what, name), reason=reason,
                          interval=self.interval)
            self._new_window(now)
        else:
            self._window += 1
            if name is not None and (name in self._names or len(self._names) < NAMED_DEVICES):
                self._names[name] = None
            else:
                self._others += 1
            if now - self._summary_at >= self.interval:
                self.log.warn("{count} store writes failed in the last {seconds:.0f} s "
                              "({devices}; {landed} writes landed; {total} failures since "
                              "the outage began {duration:.0f} s ago): {reason}",
                              count=self._window, seconds=now - self._summary_at,
                              devices=self._devices(), landed=self._landed,
                              total=self._total, duration=now - self._since, reason=reason)
                self._new_window(now)
        if not expected and failure.type not in self._tracebacks:
            self._tracebacks.add(failure.type)
            self.log.failure("{subject} not durable: nothing is acknowledged", failure,
                             level=LogLevel.error, subject=_subject(what, name))

    def succeeded(self) -> None:
        """A write landed: ends an outage (one line) if none failed for ``interval``."""
        if self._since is None:
            return
        now = self._now()
        if now - self._last < self.interval:
            self._landed += 1
            return
        unlogged = (f"; {self._window} since the last line: {self._devices()}"
                    if self._window else "")
        self.log.info("store writes succeed again, none failed in the last {quiet:.1f} s: "
                      "{total} failures in the {duration:.1f} s from the outage's first to "
                      "its last{unlogged} (last reason: {reason})",
                      quiet=now - self._last, total=self._total, duration=self._last - self._since,
                      unlogged=unlogged, reason=self._reason)
        self._since = None
        self._total = 0
        self._new_window(now)
        self._tracebacks.clear()

    def _new_window(self, now: float) -> None:
        self._summary_at = now
        self._window = self._landed = self._others = 0
        self._names = {}

    def _devices(self) -> str:
        """The devices failing since the last line: the first few by name, the rest counted."""
        parts = []
        if self._names:
            parts.append("devices " + ", ".join(self._names))
        if self._others:
            parts.append(f"{self._others} other writes")
        return " and ".join(parts)
