"""The devices of failed SQLite commits, written again (sqlite_store.py).

A commit that fails (disk full, I/O error) fails its Deferreds, but the
registry in memory keeps the changes, as a device's next write would carry
them anyway. A device that writes nothing more (it went offline during the
outage, or a dashboard's desired write failed) would stay behind on disk
for good; so the devices whose states a failed commit held are written
again, as they are then, with their session records: by the next
successful commit that writes them, or after RETRY_DELAY (one timer for the
store, doubling while storage keeps failing), and once more at close (also
those of a commit that fails while the store closes). A
session record queued meanwhile takes its device's state into its commit:
the record must never be durable before the state it acknowledges.

A device whose last try fails too is given up: its change stays unstored.
The store's close says so (CloseReport, close_report.py), and the broker's
last line names those devices instead of claiming a committed store.
"""

from collections import Counter

from .close_report import CloseReport

#: CloseReport stays importable from here (sqlite_store.py).
__all__ = ["CloseReport", "Group", "UnsavedDevices", "RETRY_DELAY", "RETRY_DELAY_MAX"]

#: seconds before the devices of a failed commit are written again, when no
#: other commit has written them meanwhile.
RETRY_DELAY = 1.0
#: the delay doubles with each failed commit, up to this; a commit that
#: succeeds brings it back to RETRY_DELAY.
RETRY_DELAY_MAX = 30.0


class Group:
    """The states of several devices written with one Deferred (``write_states``)."""

    __slots__ = ("devs", "cursors")

    def __init__(self, devs):
        self.devs = devs
        self.cursors = [dev.cursor for dev in devs]


def _devices(ops):
    """The Devices whose states the queued writes ``ops`` write as they are."""
    for op in ops:
        if type(op) is Group:
            yield from op.devs
        elif type(op) is not tuple:
            yield op


class UnsavedDevices:
    """Devices of failed commits, and the one timer that writes them again."""

    def __init__(self, clock, rewrite, counters=None):
        self._clock = clock
        self._counters = counters if counters is not None else Counter()
        self._rewrite = rewrite      # called with the Devices to queue again
        self._devices = {}           # device number -> Device
        self._timer = None
        self._delay = RETRY_DELAY
        self._closed = False
        self._tried = set()          # devices given their last try (closing)
        self._given_up = {}          # device number -> Device whose last try failed
        #: commits that failed, and devices written again after one.
        self.failed_commits = 0
        self.rewritten_devices = 0
        #: the error of the last failed commit, or None.
        self.last_error = None

    def __bool__(self):
        return bool(self._devices)

    def failed(self, ops, error=None):
        """A commit of ``ops`` failed (with ``error``): keep its devices, arm the timer."""
        self.failed_commits += 1
        if error is not None:
            self.last_error = getattr(error, "message", None) or str(error)
        self._counters["store_commit_failed"] += 1
        unsaved = self._devices
        for dev in _devices(ops):
            unsaved[dev.number] = dev
        if self._closed:
            self._last_try()
        elif unsaved and self._timer is None:
            self._timer = self._clock.callLater(self._delay, self.flush)
        self._delay = min(self._delay * 2, RETRY_DELAY_MAX)

    def saved(self, ops):
        """A commit of ``ops`` succeeded: forget the devices it wrote as they are."""
        self._delay = RETRY_DELAY
        unsaved, given_up = self._devices, self._given_up
        if not unsaved and not given_up:
            return
        for dev in _devices(ops):
            unsaved.pop(dev.number, None)
            # (given up after a failed commit, then stored by a later one of the close)
            given_up.pop(dev.number, None)
        if not unsaved:
            self.cancel()

    def recorded(self, ops):
        """Take out the unsaved devices a queued session record names: their
        states must go in its commit (a record durable before the state it
        acknowledges would let a crash lose that state)."""
        unsaved = self._devices
        found = []
        for op in ops:
            if type(op) is tuple and op[0] in ("session", "sessions"):
                for number in (op[1],) if op[0] == "session" else op[1]:
                    dev = unsaved.pop(number, None)
                    if dev is not None and dev.cursor:
                        found.append(dev)
        if not unsaved:
            self.cancel()
        return found

    def flush(self, skip=()):
        """Queue every unsaved device again (a removed one, cursor 0, has no row;
        those in ``skip`` are dropped); returns them."""
        self._timer = None
        devs = [dev for dev in self._devices.values() if dev.cursor and dev.number not in skip]
        self._devices.clear()
        if devs:
            self.rewritten_devices += len(devs)
            self._counters["store_devices_rewritten"] += len(devs)
            self._rewrite(devs)
        return devs

    def close(self):
        """The store closes: queue the unsaved devices a last time, arm no timer.
        A commit failing after this (one under way, or the last try) gives its
        devices their last try then, each device one at most."""
        self.cancel()
        self._closed = True
        self._last_try()

    def _last_try(self):
        tried = self._tried
        for number, dev in self._devices.items():
            if number in tried and dev.cursor:      # (cursor 0: removed, nothing to store)
                self._given_up[number] = dev
        tried.update(dev.number for dev in self.flush(tried))

    def unstored(self):
        """Names (sorted) of the devices whose last try failed: their changes
        are not stored, and are lost when the broker exits."""
        return sorted(dev.name for dev in self._given_up.values())

    def cancel(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
