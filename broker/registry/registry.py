"""DeviceRegistry: the shared device-state shadow every endpoint uses.

All state lives in memory on the reactor thread; reads are synchronous.
Each write changes memory at once (so versions and the change sequence are
assigned in call order), notifies observers, and returns a Deferred that
fires once the store has made the change durable.

The class is assembled from one mixin per concern: observers.py (who
hears of changes), updates.py (state writes), provisioning.py (devices,
keys, sessions, tokens) and admin_reload.py (broker-admin's changes);
this module holds the state, loading, lifecycle and reads.
"""

import os
from bisect import bisect_left, bisect_right
from collections import Counter

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from broker.globs import glob_match

from .admin_reload import AdminReload
from .feed import ChangeFeed, Subscriptions
from .history import EMPTY_HISTORY
from .model import Device, DeviceView, KeyShapes
from .observers import KeyWatch, Observers
from .provisioning import NAME_RE, Provisioning, check_name
from .restart import continue_cursors, move_out
from .secrets import TokenTable
from .settings import RegistrySettings
from .updates import StateUpdates
from .values import Validator

__all__ = ["DeviceRegistry", "KeyWatch", "NAME_RE", "check_name"]

_GLOB_CHARS = frozenset("*?[")


class DeviceRegistry(Observers, StateUpdates, Provisioning, AdminReload):
    """Devices, their reported/desired state, the change feed and observers."""

    log = Logger()
    #: the change feed's type (SharedRegistry's takes late entries in order).
    feed_type = ChangeFeed
    #: other processes write this registry too (SharedRegistry): what this one
    #: holds of a device (its live session, its record) may be behind theirs.
    shared = False

    def __init__(self, store, *, clock=None, settings=None, random_bytes=os.urandom):
        if clock is None:
            from twisted.internet import reactor as clock
        self._store = store
        self._clock = clock
        self.settings = settings = settings or RegistrySettings()
        self._random_bytes = random_bytes
        self._validator = Validator(settings)
        self._shapes = KeyShapes()
        self._by_name = {}
        self._by_number = {}
        self._names = []          # sorted; insort/del are memmoves, fine for provisioning
        self._subs = Subscriptions()
        self._tokens = TokenTable()
        #: token changes made in memory (an admin reload of the token table
        #: reads it again if one was made while it read).
        self._token_changes = 0
        #: device number -> [last stored secret, rotations pending] (rotate_key).
        self._rotations = {}
        self._key_watches = []
        self._desired_watches = []
        self._poll = None
        self._polling = False
        #: counters of notable events (exported as broker_registry_events_total);
        #: a store that counts events of its own (failed commits) shares them.
        shared = getattr(store, "counters", None)
        self.counters = shared if isinstance(shared, Counter) else Counter()
        #: the global change sequence: cursor of the latest change.
        self.cursor = 0
        #: devices whose online flag is set (kept current by every change of it).
        self.online_count = 0
        self._load(store.load())

    # -- loading -------------------------------------------------------------

    def _load(self, loaded):
        devices = self._load_records(loaded)
        tombstones = list(loaded.tombstones)
        # Durable before anything is announced (restart.py). Dead ranges go
        # once the stored horizon covers them (the prune below is not durable
        # yet); loaded entries inside one, broker-admin's, and after an
        # unclean stop every device (with a new version) move above the
        # restart's cursor.
        top = max([loaded.sequence, loaded.horizon] + [d.cursor for d in devices]
                  + [t[0] for t in tombstones])
        start, dead = continue_cursors(loaded, top, loaded.horizon)
        start, moves = move_out(devices, tombstones, dead, start, unclean=not loaded.clean)
        tombstones.sort()
        horizon = loaded.horizon
        keep = self.settings.feed_retention
        pruned = len(tombstones) > keep
        if pruned:
            horizon = max(horizon, tombstones[len(tombstones) - keep - 1][0])
            tombstones = tombstones[len(tombstones) - keep:]
        self._load_feed(devices, tombstones, horizon, start)
        self._feed.set_dead(dead)
        self._store.begin(self.cursor, dead, moves)
        if pruned:
            self._store.write(("prune", horizon))
        # Nobody is connected to a process that just started.
        for dev in devices:
            if dev.online:
                self._set_online(dev, False)

    def _load_records(self, loaded):
        """Index the loaded devices, sessions and tokens; returns the Device records."""
        devices = []
        for row in loaded.devices:
            dev = Device(row.name, row.number, row.secret, row.version, row.cursor)
            if row.state is not None:
                self._restore(dev, row.state, row.version, row.cursor)
            devices.append(dev)
            self._by_name[dev.name] = dev
            self._by_number[dev.number] = dev
        for number, record in loaded.sessions:
            dev = self._by_number.get(number)
            if dev is not None:
                dev.session = record
        self._names = sorted(self._by_name)
        self._tokens = TokenTable.from_rows(loaded.tokens)
        self._admin_seq = loaded.admin_seq
        self.online_count = sum(1 for dev in devices if dev.online)
        return devices

    def _restore(self, dev, state, version, cursor):
        """Give a loaded record its stored state (shared key tuples, history trimmed)."""
        dev.restore_state(state)
        dev.rkeys = self._shapes.intern(dev.rkeys)
        dev.dkeys = self._shapes.intern(dev.dkeys)
        size = self.settings.history_size
        dev.history = (dev.history.bounded(size, self.settings.history_bytes)
                       if size else EMPTY_HISTORY)

    def _load_feed(self, devices, tombstones, horizon, sequence):
        """A new feed of the loaded devices and tombstones, in cursor order; sets the cursor."""
        self._feed = self.feed_type(self.settings.feed_retention)
        self._feed.horizon = horizon
        entries = [(d.cursor, d) for d in devices]
        entries += [(c, DeviceView.tombstone(name, number, version, c))
                    for c, name, number, version in tombstones]
        entries.sort(key=lambda e: e[0])
        for _, entry in entries:
            self._feed.append(entry, False)
        self.cursor = max([sequence, horizon] + [c for c, _ in entries[-1:]])

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Start watching the store for admin changes; returns a Deferred."""
        if self.settings.reload_interval and self._poll is None:
            self._poll = LoopingCall(self.reload)
            self._poll.clock = self._clock
            self._poll.start(self.settings.reload_interval, now=False)
        return defer.succeed(None)

    def readiness(self):
        """None while the registry can take writes, else why not (a ReadinessCheck
        for /readyz); a local store has nothing to report here."""
        return None

    def stop(self):
        """Stop polling and close the store (pending writes are committed)."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        return self._store.close()

    # -- reads ---------------------------------------------------------------

    def device(self, name):
        """The current view of device ``name``, or None."""
        dev = self._by_name.get(name)
        return None if dev is None else DeviceView.of(dev)

    def device_by_number(self, number):
        """The current view of the device with this number, or None."""
        dev = self._by_number.get(number)
        return None if dev is None else DeviceView.of(dev)

    def __len__(self):
        return len(self._by_name)

    def devices(self, prefix_or_glob=None, after=None, limit=100):
        """Views in name order: names starting with a prefix or matching a glob, after ``after``."""
        pattern = prefix_or_glob or ""
        is_glob = bool(_GLOB_CHARS.intersection(pattern))
        prefix = pattern
        if is_glob:
            cut = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
            prefix = pattern[:cut]
            matches = glob_match(pattern)
        names = self._names
        if after is None or after < prefix:
            i = bisect_left(names, prefix)
        else:
            i = bisect_right(names, after)
        out = []
        while i < len(names) and len(out) < limit:
            name = names[i]
            i += 1
            if not name.startswith(prefix):
                break
            if is_glob and not matches(name):
                continue
            out.append(DeviceView.of(self._by_name[name]))
        return out

    def secret_for(self, device_number):
        """The 16-byte secret of a device (for SSP session keys), or None."""
        dev = self._by_number.get(device_number)
        return None if dev is None else dev.secret

    @property
    def feed_horizon(self):
        """Cursors below this (and above 0) are reset by ``changes_since``: a
        reader must not stop a page below it (feed.py)."""
        return self._feed.horizon

    def changes_since(self, cursor, limit=1000):
        """Latest state of each device changed after ``cursor``, in change order (a ChangeBatch)."""
        return self._feed.changes_since(cursor, self.cursor, max(1, limit))
