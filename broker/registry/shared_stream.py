"""The Redis change stream, applied to a SharedRegistry's replica.

Every process's changes arrive here in cursor order (RedisStore.follow
decodes them off the reactor thread). Applying an entry is what makes a
change visible in this process: versions, the feed, observers, and the
Deferreds of this process's own writes waiting for their cursor.
"""

from bisect import bisect_right

from . import errors
from .feed import ChangeFeed
from .model import Device, DeviceView


class OrderedFeed(ChangeFeed):
    """A ChangeFeed that also takes an entry older than its newest one (only
    right after loading, while the stream replays changes made during the scan)."""

    __slots__ = ()

    def place(self, entry, replaced):
        if not self._cursors or entry.cursor >= self._cursors[-1]:
            self.append(entry, replaced)
            return
        i = bisect_right(self._cursors, entry.cursor)
        self._cursors.insert(i, entry.cursor)
        self._entries.insert(i, entry)
        if replaced:
            self._stale += 1


class ChangeStream:
    """SharedRegistry's stream-follower half (a mixin: see shared.py)."""

    __slots__ = ()

    def _deliver(self, entries):
        """Apply stream entries (every process's changes, in cursor order)."""
        for entry in entries:
            kind = entry[0]
            try:
                if kind == "s":
                    self._apply_state(*entry[1:6])
                elif kind == "r":
                    if entry[3] != self.origin and entry[1] in self._by_number:
                        self._by_number[entry[1]].session = entry[2]
                elif kind == "a":
                    self._apply_add(*entry[1:7])
                elif kind == "x":
                    self._apply_remove(*entry[1:5])
                elif kind == "k":
                    self._apply_secret(*entry[1:])
                elif kind == "t":
                    if entry[1] != self.origin:
                        self.reload()
            except (errors.RegistryError, ValueError, TypeError):
                self.log.failure("applying a change-stream entry failed: {kind}", kind=kind)
        self._top = max(self._top, self.cursor)
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.cursor:
            _, d, result = waiters.popleft()
            d.callback(result)

    def _advance(self, cursor):
        if cursor > self.cursor:
            self.cursor = cursor

    def _apply_state(self, number, version, cursor, state, events):
        dev = self._by_number.get(number)
        self._advance(cursor)
        if dev is None or version <= dev.version:
            return
        old_desired = (dev.dkeys, dev.dvals)
        facts = (dev.last_heard, dev.address, dev.rtt, dev.session_id)
        was_online = dev.online
        self._restore(dev, state, version, cursor)
        self.online_count += dev.online - was_online
        if facts[0] is not None and (dev.last_heard is None or facts[0] > dev.last_heard):
            dev.last_heard, dev.address, dev.rtt, dev.session_id = facts
        replaced = dev.cursor > 0
        dev.version = version
        dev.cursor = cursor
        self._feed.place(dev, replaced)
        self.counters["applied"] += 1
        self._subs.notify(dev.name, lambda: DeviceView.of(dev, events))
        if (dev.dkeys, dev.dvals) != old_desired:
            self._desired_changed(dev)
        busy = self._busy.get(number)
        if (type(busy) is int and cursor >= busy) or (type(busy) is tuple and version >= busy[1]):
            self._mark_ready(number)

    def _apply_add(self, number, version, cursor, name, secret, state):
        self._advance(cursor)
        if number in self._by_number or name in self._by_name:
            return
        dev = Device(name, number, secret, version, cursor)
        if state is not None:
            self._restore(dev, state, version, cursor)
        self._insert(dev)
        self._feed.place(dev, False)
        self._subs.notify(name, lambda: DeviceView.of(dev))

    def _apply_remove(self, number, version, cursor, name):
        self._advance(cursor)
        dev = self._by_number.get(number)
        if dev is None or dev.name != name:
            return
        self._forget(dev)
        tomb = DeviceView.tombstone(name, number, version, cursor)
        self._feed.place(tomb, False)
        self._removed(tomb)
        for op in self._queues.pop(number, ()):
            op.d.errback(errors.UnknownDevice(name, token=op.token))

    def _apply_secret(self, number, secret, origin):
        dev = self._by_number.get(number)
        if dev is not None and origin != self.origin and dev.secret != secret:
            dev.secret = secret
            self._keys_changed(number)
