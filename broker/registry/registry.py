"""DeviceRegistry: the shared device-state shadow every endpoint uses.

All state lives in memory on the reactor thread; reads are synchronous.
Each write changes memory at once (so versions and the change sequence are
assigned in call order), notifies observers, and returns a Deferred that
fires once the store has made the change durable.
"""

import os
import re
from bisect import bisect_left, bisect_right, insort
from collections import Counter

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import errors
from .feed import ChangeFeed, Subscriptions
from .model import (EMPTY, Device, DeviceView, KeyShapes,
                    Provisioned, TokenInfo, UpdateResult, merge_map, replace_numbers)
from .secrets import ROLES, TokenTable, hash_token, new_device_number, new_secret, new_token
from .settings import RegistrySettings
from .values import FrozenMap, Validator, map_size, value_size

#: device names: letters, digits, ``. _ -``, starting with a letter or digit.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_GLOB_CHARS = frozenset("*?[")


def _frozen(data):
    return FrozenMap(data)


def _refusal(failure):
    """A refused update as a value (batch answers); a store failure stays a failure."""
    if failure.check(errors.RegistryError) and not failure.check(errors.StoreError):
        return failure.value
    return failure


def _first_error(failure):
    failure.trap(defer.FirstError)
    return failure.value.subFailure


def check_name(name):
    """Raise InvalidName unless ``name`` is a valid device name."""
    if not isinstance(name, str) or not name.isascii() or NAME_RE.match(name) is None:
        raise errors.InvalidName(
            f"invalid device name {name!r}: 1-64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit")
    return name


class KeyWatch:
    """Handle of a ``watch_keys`` callback."""

    __slots__ = ("_list", "callback")

    def __init__(self, watchers, callback):
        self._list = watchers
        self.callback = callback

    def cancel(self):
        if self in self._list:
            self._list.remove(self)


class DeviceRegistry:
    """Devices, their reported/desired state, the change feed and observers."""

    log = Logger()

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
        self._key_watches = []
        self._desired_watches = []
        self._poll = None
        self._polling = False
        #: counters of notable events (the lead wires them to metrics).
        self.counters = Counter()
        #: the global change sequence: cursor of the latest change.
        self.cursor = 0
        self._load(store.load())

    # -- lifecycle ---------------------------------------------------------

    def _load(self, loaded):
        history = self.settings.history_size
        devices = []
        for row in loaded.devices:
            dev = Device(row.name, row.number, row.secret, row.version, row.cursor)
            if row.state is not None:
                dev.restore_state(row.state)
                dev.rkeys = self._shapes.intern(dev.rkeys)
                dev.dkeys = self._shapes.intern(dev.dkeys)
                dev.history = dev.history[-history:] if history else EMPTY
            devices.append(dev)
            self._by_name[dev.name] = dev
            self._by_number[dev.number] = dev
        for number, record in loaded.sessions:
            dev = self._by_number.get(number)
            if dev is not None:
                dev.session = record
        self._names = sorted(self._by_name)
        for token_id, digest, role, created_at in loaded.tokens:
            self._tokens.add(token_id, digest, role, created_at)
        self._admin_seq = loaded.admin_seq
        tombstones = sorted(loaded.tombstones)
        horizon = loaded.horizon
        keep = self.settings.feed_retention
        if len(tombstones) > keep:
            horizon = max(horizon, tombstones[len(tombstones) - keep - 1][0])
            tombstones = tombstones[len(tombstones) - keep:]
            self._store.write(("prune", horizon))
        self._feed = ChangeFeed(keep)
        self._feed.horizon = horizon
        entries = [(d.cursor, d) for d in devices]
        entries += [(c, DeviceView.tombstone(name, number, version, c))
                    for c, name, number, version in tombstones]
        entries.sort(key=lambda e: e[0])
        for _, entry in entries:
            self._feed.append(entry, False)
        self.cursor = max([loaded.sequence, horizon] + [c for c, _ in entries[-1:]])
        # Nobody is connected to a process that just started.
        for dev in devices:
            if dev.online:
                self._set_online(dev, False)

    def start(self):
        """Start watching the store for admin changes; returns a Deferred."""
        if self.settings.reload_interval and self._poll is None:
            self._poll = LoopingCall(self.reload)
            self._poll.clock = self._clock
            self._poll.start(self.settings.reload_interval, now=False)
        return defer.succeed(None)

    def stop(self):
        """Stop polling and close the store (pending writes are committed)."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        return self._store.close()

    # -- reads -------------------------------------------------------------

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
            from fnmatch import fnmatchcase
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
            if is_glob and not fnmatchcase(name, pattern):
                continue
            out.append(DeviceView.of(self._by_name[name]))
        return out

    def secret_for(self, device_number):
        """The 16-byte secret of a device (for SSP session keys), or None."""
        dev = self._by_number.get(device_number)
        return None if dev is None else dev.secret

    def changes_since(self, cursor, limit=1000):
        """Latest state of each device changed after ``cursor``, in change order (a ChangeBatch)."""
        return self._feed.changes_since(cursor, self.cursor, max(1, limit))

    # -- observers ---------------------------------------------------------

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

    # -- the change machinery ----------------------------------------------

    def _bump(self, dev, kind, data, now):
        """Give ``dev`` its next version and the next global cursor."""
        replaced = dev.cursor > 0
        dev.version += 1
        self.cursor += 1
        dev.cursor = self.cursor
        self._feed.append(dev, replaced)
        size = self.settings.history_size
        if size:
            if type(data) is dict:
                data = FrozenMap(data)
            dev.history = (dev.history + ((dev.version, dev.cursor, now, kind, data),))[-size:]

    def _persist(self, dev, result):
        return self._store.write(("state", dev.version, dev.cursor, dev.state(), dev.number), result)

    # -- writes ------------------------------------------------------------

    def update_reported(self, name, patch, events=(), token=None):
        """Merge a patch into ``reported`` (null deletes); Deferred[UpdateResult] once durable.

        ``name`` may also be the device number (an int), as for set_connection.
        """
        dev = self._by_number.get(name) if type(name) is int else self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name, token=token))
        try:
            events = self._apply_reported(dev, patch, events, token)
        except errors.RegistryError as e:
            return defer.fail(e)
        if events is None:
            return self._store.barrier(UpdateResult(dev.name, dev.version, dev.cursor, token))
        d = self._store.write_state(dev, token)
        if self._subs.watching:
            self._subs.notify(dev.name, lambda: DeviceView.of(dev, events))
        return d

    def update_reported_many(self, updates):
        """Apply many reported updates with ONE Deferred for all of them.

        ``updates``: ``(name_or_number, patch)``, ``(.., patch, events)`` or
        ``(.., patch, events, token)`` tuples. Each is applied (validated,
        versioned, observed) exactly as ``update_reported`` would, and all
        accepted ones are written in one store transaction. Fires once they
        are durable with a list in the same order: the UpdateResult of each
        accepted update, or the RegistryError (not raised) of a refused one;
        errbacks (StoreError) if the store failed. For callers that gather
        the reports of a reactor turn (the UDP endpoint): no Deferred per write.
        """
        if type(self).update_reported is not DeviceRegistry.update_reported:
            # A subclass with its own write path (SharedRegistry): one by one.
            return defer.gatherResults([self.update_reported(*u).addErrback(_refusal)
                                        for u in updates], consumeErrors=True
                                       ).addErrback(_first_error)
        out = []
        changed = []
        by_name, by_number = self._by_name, self._by_number
        for update in updates:
            name, patch = update[0], update[1]
            events = update[2] if len(update) > 2 else ()
            token = update[3] if len(update) > 3 else None
            dev = by_number.get(name) if type(name) is int else by_name.get(name)
            if dev is None:
                out.append(errors.UnknownDevice(name, token=token))
                continue
            try:
                events = self._apply_reported(dev, patch, events, token)
            except errors.RegistryError as e:
                out.append(e)
                continue
            if events is not None:
                changed.append(dev)
                if self._subs.watching:
                    self._subs.notify(dev.name, lambda: DeviceView.of(dev, events))
            out.append(UpdateResult(dev.name, dev.version, dev.cursor, token))
        if not changed:
            return self._store.barrier(out)
        return self._store.write_states(changed, out)

    def _apply_reported(self, dev, patch, events, token):
        """Apply one reported update to ``dev`` in memory (version, feed, history).

        Returns the checked events (a tuple, maybe empty), or None if nothing
        changed; raises RegistryError (counted, carrying ``token``).
        """
        now = self._clock.seconds()
        if not events and type(patch) is dict and 0 < len(patch) <= self._validator.max_keys:
            # The common update (known keys, numbers replacing numbers) is
            # checked and merged in one pass; anything else takes the full path.
            fast = replace_numbers(self._shapes, dev.rkeys, dev.rvals, dev.rtimes, patch, now)
            if fast is not None:
                dev.rvals, dev.rtimes = fast
                if self.settings.history_size:
                    pos = self._shapes.positions(dev.rkeys)
                    patch = {dev.rkeys[pos[k]]: v for k, v in patch.items()}   # interned keys
                self._bump(dev, "reported", patch, now)
                return EMPTY
        try:
            patch = self._validator.patch(patch)
            events = self._check_events(events) if events else EMPTY
            if patch:
                keys, vals, times, grow = merge_map(self._shapes, dev.rkeys, dev.rvals,
                                                    dev.rtimes, patch, now)
                if grow and map_size(keys, vals) > self.settings.max_state_bytes:
                    raise errors.StateTooLarge(
                        f"reported state of {dev.name!r} would exceed "
                        f"{self.settings.max_state_bytes} bytes")
        except errors.RegistryError as e:
            e.token = token
            self.counters["rejected_" + e.code] += 1
            raise
        if patch:
            dev.rkeys, dev.rvals, dev.rtimes = keys, vals, times
            if events:
                self._bump(dev, "reported", _frozen({"patch": _frozen(patch), "events": events}), now)
            else:
                self._bump(dev, "reported", patch, now)
        elif events:
            self._bump(dev, "events", events, now)
        else:
            return None
        return events

    def _changed(self, dev, token, events=EMPTY):
        """Queue the durable write of a changed device, then tell its observers."""
        d = self._store.write_state(dev, token)
        if self._subs.watching:
            self._subs.notify(dev.name, lambda: DeviceView.of(dev, events))
        return d

    def _check_events(self, events):
        if not isinstance(events, (list, tuple)):
            raise errors.InvalidValue("events must be a list")
        if len(events) > self.settings.max_events:
            raise errors.InvalidValue(f"at most {self.settings.max_events} events per update")
        checked = tuple(self._validator.value(e, 1, "events") for e in events)
        for e in checked:
            if value_size(e) > self.settings.max_state_bytes:
                raise errors.StateTooLarge(
                    f"an event exceeds {self.settings.max_state_bytes} bytes")
        return checked

    def update_desired(self, name, patch, expected_version=None, token=None):
        """Merge a patch into ``desired``, refused with VersionConflict if
        ``expected_version`` is given and differs; Deferred[UpdateResult] once durable."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name, token=token))
        if expected_version is not None and expected_version != dev.version:
            self.counters["rejected_version_conflict"] += 1
            return defer.fail(errors.VersionConflict(name, expected_version, dev.version, token=token))
        try:
            patch = self._validator.patch(patch)
        except errors.RegistryError as e:
            e.token = token
            self.counters["rejected_" + e.code] += 1
            return defer.fail(e)
        if not patch:
            return self._store.barrier(UpdateResult(name, dev.version, dev.cursor, token))
        now = self._clock.seconds()
        keys, vals, times, grow = merge_map(self._shapes, dev.dkeys, dev.dvals, dev.dtimes,
                                            patch, now)
        if grow and map_size(keys, vals) > self.settings.max_state_bytes:
            self.counters["rejected_state_too_large"] += 1
            return defer.fail(errors.StateTooLarge(
                f"desired state of {name!r} would exceed {self.settings.max_state_bytes} bytes",
                token=token))
        dev.dkeys, dev.dvals, dev.dtimes = keys, vals, times
        self._bump(dev, "desired", patch, now)
        d = self._changed(dev, token)
        if self._desired_watches:
            desired = FrozenMap(zip(keys, vals))
            for watch in list(self._desired_watches):
                try:
                    watch.callback(dev.number, desired)
                except Exception:
                    self.log.failure("desired watcher raised for device {number}",
                                     number=dev.number)
        return d

    def set_connection(self, name, *, online, last_heard=None, address=None, rtt=None,
                       session_id=None):
        """Record connection facts of a device (by name, or by number if an int).

        Only a flip of ``online`` is a change (version, cursor, observers,
        a durable write whose Deferred is returned); the other facts update
        in place. ``last_heard`` defaults to the clock's time (epoch seconds).
        """
        dev = self._by_number.get(name) if isinstance(name, int) else self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        dev.last_heard = self._clock.seconds() if last_heard is None else last_heard
        if address is not None:
            dev.address = address
        if rtt is not None:
            dev.rtt = rtt
        if session_id is not None:
            dev.session_id = session_id
        if bool(online) == dev.online:
            return defer.succeed(UpdateResult(dev.name, dev.version, dev.cursor))
        return self._set_online(dev, bool(online))

    def _set_online(self, dev, online):
        dev.online = online
        self._bump(dev, "connection", {"online": online}, self._clock.seconds())
        d = self._persist(dev, UpdateResult(dev.name, dev.version, dev.cursor))
        self._subs.notify(dev.name, lambda: DeviceView.of(dev))
        return d

    # -- provisioning ------------------------------------------------------

    def add_device(self, name):
        """Provision a device: Deferred[Provisioned] (number and secret) once durable."""
        try:
            check_name(name)
        except errors.InvalidName as e:
            return defer.fail(e)
        if name in self._by_name:
            return defer.fail(errors.DeviceExists(name))
        number = new_device_number(self._random_bytes)
        while number in self._by_number:
            number = new_device_number(self._random_bytes)
        dev = Device(name, number, new_secret(self._random_bytes))
        self._insert(dev)
        self._bump(dev, "created", None, self._clock.seconds())
        d = self._store.write(("add", number, name, dev.secret, dev.version, dev.cursor, dev.state()),
                              Provisioned(name, number, dev.secret))
        self._subs.notify(name, lambda: DeviceView.of(dev))
        return d

    def _insert(self, dev):
        self._by_name[dev.name] = dev
        self._by_number[dev.number] = dev
        insort(self._names, dev.name)

    def remove_device(self, name):
        """Remove a device, its state and session; Deferred once durable."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        return self._remove(dev)

    def _remove(self, dev):
        del self._by_name[dev.name]
        del self._by_number[dev.number]
        i = bisect_left(self._names, dev.name)
        if i < len(self._names) and self._names[i] == dev.name:
            del self._names[i]
        if dev.cursor > 0:
            self._feed.stale()
        dev.cursor = 0
        self.cursor += 1
        tomb = DeviceView.tombstone(dev.name, dev.number, dev.version + 1, self.cursor)
        self._feed.append(tomb, False)
        d = self._store.write(("remove", dev.number, dev.name, tomb.version, tomb.cursor),
                              UpdateResult(dev.name, tomb.version, tomb.cursor))
        self._subs.notify(dev.name, lambda: tomb)
        self._keys_changed(dev.number)
        return d

    def rotate_key(self, name):
        """Give a device a new secret (live sessions end): Deferred[Provisioned] once durable."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        dev.secret = new_secret(self._random_bytes)
        d = self._store.write(("secret", dev.number, dev.secret),
                              Provisioned(name, dev.number, dev.secret))
        self._keys_changed(dev.number)
        return d

    # -- SSP session persistence ------------------------------------------

    def session_record(self, device_number):
        """The saved SessionRecord of a device, or None."""
        dev = self._by_number.get(device_number)
        return None if dev is None else dev.session

    def save_session(self, device_number, record):
        """Keep a SessionRecord; Deferred once durable."""
        dev = self._by_number.get(device_number)
        if dev is None:
            return defer.fail(errors.UnknownDevice(device_number))
        dev.session = record
        return self._store.write(("session", device_number, record), record)

    # -- access tokens -----------------------------------------------------

    def add_token(self, role):
        """A new dashboard token: Deferred[(token_id, token_text)] once durable; the text is shown once."""
        if role not in ROLES:
            return defer.fail(errors.InvalidValue(f"token role must be one of {', '.join(ROLES)}"))
        token_id, text = new_token(self._random_bytes)
        while token_id in self._tokens:
            token_id, text = new_token(self._random_bytes)
        digest = hash_token(text)
        now = self._clock.seconds()
        self._tokens.add(token_id, digest, role, now)
        return self._store.write(("token_add", token_id, digest, role, now), (token_id, text))

    def check_token(self, token_text):
        """The role (``read`` or ``write``) of a valid token, or None."""
        return self._tokens.check(token_text)

    def revoke_token(self, token_id):
        """Forget a token; Deferred once durable."""
        if not self._tokens.remove(token_id):
            return defer.fail(errors.UnknownToken(f"unknown token {token_id!r}"))
        return self._store.write(("token_del", token_id), token_id)

    def tokens(self):
        """Every token as TokenInfo (id, role, creation time), never its text."""
        return [TokenInfo(tid, role, created) for tid, (_, role, created) in self._tokens.items()]

    # -- changes made by broker-admin in the shared database ---------------

    @defer.inlineCallbacks
    def reload(self):
        """Apply devices and tokens another process (broker-admin) changed in the store."""
        if self._polling:
            return
        self._polling = True
        try:
            entries = yield self._store.admin_changes(self._admin_seq)
            for seq, op, name, number in entries:
                yield self._apply_admin(op, name, number)
                self._admin_seq = max(self._admin_seq, seq)
        except errors.StoreError:
            self.log.failure("reading admin changes failed")
        finally:
            self._polling = False

    @defer.inlineCallbacks
    def _apply_admin(self, op, name, number):
        self.counters["admin_" + op] += 1
        if op == "token":
            rows = yield self._store.fetch_tokens()
            table = TokenTable()
            for token_id, digest, role, created_at in rows:
                table.add(token_id, digest, role, created_at)
            self._tokens = table
            return
        dev = self._by_number.get(number)
        if op == "device_remove":
            if dev is not None and dev.name == name:
                yield self._remove(dev)
            return
        row = yield self._store.fetch_device(number)
        if row is None:
            return
        if op == "device_key" and dev is not None:
            dev.secret = row.secret
            self._keys_changed(number)
        elif op == "device_add" and dev is None and row.name not in self._by_name:
            dev = Device(row.name, row.number, row.secret, row.version)
            if row.state is not None:
                dev.restore_state(row.state)
            self._insert(dev)
            dev.cursor = 0
            self._bump(dev, "created", None, self._clock.seconds())
            self._persist(dev, None)
            self._subs.notify(dev.name, lambda: DeviceView.of(dev))

