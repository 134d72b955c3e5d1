"""Who hears of registry changes: subscriptions by name or glob, and the
light watchers (keys, desired maps) that need no DeviceView built."""

from .values import FrozenMap


class KeyWatch:
    """Handle of a ``watch_keys`` or ``watch_desired`` callback."""

    __slots__ = ("_list", "callback")

    def __init__(self, watchers, callback):
        self._list = watchers
        self.callback = callback

    def cancel(self):
        if self in self._list:
            self._list.remove(self)


class Observers:
    """DeviceRegistry's observer half (a mixin: the registry holds the state).

    Needs ``_subs`` (feed.Subscriptions), ``_key_watches``,
    ``_desired_watches`` (lists), ``_by_number`` and ``log``.
    """

    __slots__ = ()

    def subscribe(self, patterns, callback):
        """Call ``callback(view)`` on every change of a device matching a name or glob."""
        return self._subs.add(patterns, callback)

    def observer_count(self, name):
        """How many subscriptions observe device ``name``."""
        return self._subs.count(name)

    def watch_keys(self, callback):
        """Call ``callback(device_number)`` when a device is removed or its key rotates."""
        watch = KeyWatch(self._key_watches, callback)
        self._key_watches.append(watch)
        return watch

    def watch_desired(self, callback):
        """Call ``callback(device_number, desired)`` after every change of a device's
        desired map (no view built: for the UDP endpoint, instead of observing ``*``)."""
        watch = KeyWatch(self._desired_watches, callback)
        self._desired_watches.append(watch)
        return watch

    def desired_of(self, device_number):
        """The desired map of a device (no view built), or None."""
        dev = self._by_number.get(device_number)
        return None if dev is None else FrozenMap(zip(dev.dkeys, dev.dvals))

    def _keys_changed(self, number):
        for watch in list(self._key_watches):
            try:
                watch.callback(number)
            except Exception:
                self.log.failure("key watcher raised for device {number}", number=number)

    def _desired_changed(self, dev):
        """Tell the desired watchers (if any) the new desired map of ``dev``."""
        if not self._desired_watches:
            return
        desired = FrozenMap(zip(dev.dkeys, dev.dvals))
        for watch in list(self._desired_watches):
            try:
                watch.callback(dev.number, desired)
            except Exception:
                self.log.failure("desired watcher raised for device {number}", number=dev.number)
