"""The change feed and the observer table.

The feed is an index "device -> its last cursor" kept as an append-only log
sorted by cursor (an ``array`` of cursors beside a list of records). When a
device changes again its older entry goes stale; ``changes_since`` skips
stale entries, so a reader gets each changed device once, at its latest
state. The log is compacted when stale entries outnumber live ones, which
keeps it within twice the number of devices (16 bytes an entry).
"""

from array import array
from bisect import bisect_right
from collections import deque
from fnmatch import translate
import re

from twisted.logger import Logger

from .model import ChangeBatch, DeviceView

#: compaction never runs for fewer stale entries than this.
MIN_COMPACT = 1024
_GLOB_CHARS = frozenset("*?[")


class ChangeFeed:
    """Cursor-ordered log of device records and removal tombstones."""

    __slots__ = ("_cursors", "_entries", "_stale", "_tombstones", "horizon", "retention",
                 "_dead_lows", "_dead_highs")

    def __init__(self, retention=100_000):
        self._cursors = array("q")
        self._entries = []
        self._stale = 0
        self._tombstones = deque()
        #: cursors below this (and above 0) cannot be served any more.
        self.horizon = 0
        self.retention = retention
        # dead cursor ranges (restart.py): sorted, disjoint, ends excluded
        self._dead_lows = ()
        self._dead_highs = ()

    def __len__(self):
        return len(self._entries)

    def append(self, entry, replaced):
        """Log ``entry`` (a Device, or a tombstone DeviceView) at ``entry.cursor``.

        ``replaced`` says an older entry of this device is now stale.
        """
        self._cursors.append(entry.cursor)
        self._entries.append(entry)
        if replaced:
            self._stale += 1
            if self._stale > MIN_COMPACT and self._stale > len(self._entries) // 2:
                self._compact()
        if type(entry) is DeviceView:
            self._tombstones.append(entry.cursor)
            while len(self._tombstones) > self.retention:
                self.horizon = self._tombstones.popleft()
                self._stale += 1

    def set_dead(self, ranges):
        """Cursors strictly inside these sorted, disjoint ``(low, high)`` ranges
        were never durably issued (restart.py): they get a reset."""
        self._dead_lows = tuple(low for low, _ in ranges)
        self._dead_highs = tuple(high for _, high in ranges)

    def _dead(self, cursor):
        """True if ``cursor`` lies strictly inside a dead range."""
        i = bisect_right(self._dead_highs, cursor)
        return i < len(self._dead_lows) and self._dead_lows[i] < cursor

    def stale(self):
        """Note that one logged entry went stale without a new one (device removed)."""
        self._stale += 1

    def _live(self, cursor, entry):
        return entry.cursor == cursor and (type(entry) is not DeviceView or cursor > self.horizon)

    def _compact(self):
        live = [(c, e) for c, e in zip(self._cursors, self._entries) if self._live(c, e)]
        self._cursors = array("q", (c for c, _ in live))
        self._entries = [e for _, e in live]
        self._stale = 0

    def changes_since(self, cursor, current, limit, view=DeviceView.of):
        """Latest views of devices changed after ``cursor`` (see DeviceRegistry.changes_since)."""
        reset = (cursor < 0 or cursor > current or 0 < cursor < self.horizon
                 or self._dead(cursor))
        if reset:
            cursor = 0
        cursors, entries = self._cursors, self._entries
        i = bisect_right(cursors, cursor)
        n = len(entries)
        out = []
        last = cursor
        # A page never ends below the horizon: from there the next request
        # would be reset to this same page, forever. So a snapshot holds at
        # least every device unchanged since the horizon, whatever the limit.
        horizon = self.horizon
        while i < n and (len(out) < limit or last < horizon):
            c, e = cursors[i], entries[i]
            if self._live(c, e):
                out.append(e if type(e) is DeviceView else view(e))
                last = c
            i += 1
        while i < n and not self._live(cursors[i], entries[i]):
            i += 1
        more = i < n
        if not more:
            last = max(last, current)
        if reset:
            out = [e for e in out if not e.removed]
        return ChangeBatch(out, last, more, reset)


class Subscription:
    """One observer: call ``cancel()`` to stop it."""

    __slots__ = ("_table", "patterns", "callback", "active")

    def __init__(self, table, patterns, callback):
        self._table = table
        self.patterns = patterns
        self.callback = callback
        self.active = True

    def cancel(self):
        """Stop calling the callback; harmless to call twice."""
        if self.active:
            self.active = False
            self._table._remove(self)


class Subscriptions:
    """Observers by exact device name or fnmatch glob pattern.

    Exact names are a dict lookup. Globs are indexed by their literal
    prefix (the text before the first ``* ? [``), and one subscription's
    globs with the same prefix share one compiled matcher: a change of
    ``name`` looks up each prefix length in use and tests only the
    subscriptions whose globs could match it, one matcher each. So its
    cost does not grow with the number of globs a subscription holds
    (a dashboard holds up to ``max_subscriptions``).
    """

    log = Logger()

    def __init__(self):
        self._exact = {}
        #: literal prefix -> {subscription: match function of its globs with that prefix}
        self._globs = {}
        #: distinct lengths of the prefixes in ``_globs``, ascending.
        self._lengths = ()
        #: False while nobody observes anything: writers skip notify() then.
        self.watching = False
        #: observer callbacks that raised (counted, logged, never propagated).
        self.errors = 0

    def add(self, patterns, callback):
        if isinstance(patterns, str):
            patterns = [patterns]
        sub = Subscription(self, tuple(dict.fromkeys(patterns)), callback)
        for prefix, globs in _by_prefix(sub.patterns).items():
            self._globs.setdefault(prefix, {})[sub] = _glob_matcher(globs)
        for pattern in sub.patterns:
            if not _GLOB_CHARS.intersection(pattern):
                self._exact.setdefault(pattern, []).append(sub)
        self._changed()
        return sub

    def _remove(self, sub):
        for pattern in sub.patterns:
            subs = self._exact.get(pattern)
            if subs is not None and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self._exact[pattern]
        for prefix in _by_prefix(sub.patterns):
            bucket = self._globs.get(prefix)
            if bucket is not None:
                bucket.pop(sub, None)
                if not bucket:
                    del self._globs[prefix]
        self._changed()

    def _changed(self):
        self._lengths = tuple(sorted({len(prefix) for prefix in self._globs}))
        self.watching = bool(self._exact or self._globs)

    def matching(self, name):
        """Distinct active subscriptions observing ``name``."""
        exact = self._exact.get(name, ())
        if not self._globs:
            return list(exact)
        found = dict.fromkeys(exact)
        globs = self._globs
        size = len(name)
        for length in self._lengths:
            if length > size:
                break
            bucket = globs.get(name[:length])
            if bucket is not None:
                for sub, match in bucket.items():
                    if sub not in found and match(name) is not None:
                        found[sub] = None
        return list(found)

    def count(self, name):
        """How many observers watch the device ``name``."""
        return len(self.matching(name))

    def notify(self, name, make_view):
        """Call every observer of ``name`` with one shared view (built only if needed)."""
        if name not in self._exact and not self._globs:
            return
        subs = self.matching(name)
        if not subs:
            return
        view = make_view()
        for sub in subs:
            if not sub.active:
                continue
            try:
                sub.callback(view)
            except Exception:
                self.errors += 1
                self.log.failure("observer of {name} raised", name=name)


def _by_prefix(patterns):
    """The glob patterns among ``patterns``, grouped by literal prefix."""
    groups = {}
    for pattern in patterns:
        chars = _GLOB_CHARS.intersection(pattern)
        if chars:
            prefix = pattern[:min(pattern.index(c) for c in chars)]
            groups.setdefault(prefix, []).append(pattern)
    return groups


def _glob_matcher(globs):
    """One match function for several globs (a whole, case-sensitive match of any)."""
    return re.compile("|".join(translate(glob) for glob in globs)).match
