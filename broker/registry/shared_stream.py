"""The Redis change stream, applied to a SharedRegistry's replica.

Every process's changes arrive here in cursor order (RedisStore.follow
reads them off the reactor thread). Applying an entry is what makes a
change visible in this process: versions, the feed, observers, and the
Deferreds of this process's own writes waiting for their cursor.

Why lazily: every process applies every process's changes, so decoding
them all would make each worker's cost per update grow with the number of
workers. Another process's change of reported state (flags say desired is
untouched) only sets the device's version, cursor, feed place and online
flag here; its state stays a raw blob until something reads the device
(a view, the feed, a write of it, an observer being notified), which
decodes it once. Session records of other processes stay raw until this
process needs one (a device's session arrives here). Redis still decides
versions (the Lua check), so nothing about conflicts depends on this.
"""

from bisect import bisect_right

from . import errors
from .feed import ChangeFeed
from .database import decode_state
from .model import Device, DeviceView
from .redis_layout import decode_events
from .secrets import TokenTable

#: stream flag: the change may have changed ``desired`` (decode at once:
#: desired watchers must hear it). Bit 1 is the new ``online``.
FLAG_DESIRED = 2
#: stream flag: the writer claims the device, it holds its session now
#: (shared_presence.py).
FLAG_CLAIM = 4

#: the Device slots a raw state stands for (``online`` is kept from the flags).
_LAZY = ("rkeys", "rvals", "rtimes", "dkeys", "dvals", "dtimes",
         "last_heard", "address", "rtt", "session_id", "history")
_LAZY_SET = frozenset(_LAZY)
_FACTS = ("last_heard", "address", "rtt", "session_id")
_get = object.__getattribute__


def lazy_device_type(registry):
    """A Device class whose missing state slots decode the pending raw state of
    ``registry`` on first read (same layout, so ``__class__`` can switch)."""
    class LazyDevice(Device):
        __slots__ = ()

        def __getattr__(self, name):
            if name in _LAZY_SET and registry._materialize(self):
                return getattr(self, name)
            raise AttributeError(name)
    return LazyDevice


class RawView:
    """What observers get for a change applied raw: name, device number, version
    and cursor at once; reading anything else decodes (once) the state the
    change carried, so an observer that only wants the name (a long-poll hub
    following every device) costs no decoding, and one that reads the state
    gets exactly this change's, whatever happened to the device since."""

    __slots__ = ("name", "device_number", "version", "cursor", "_build", "_view")
    removed = False

    def __init__(self, name, device_number, version, cursor, build):
        self.name = name
        self.device_number = device_number
        self.version = version
        self.cursor = cursor
        self._build = build

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.view(), attr)

    def __repr__(self):
        return f"RawView of {self.view()!r}"

    def view(self):
        """The DeviceView this stands for (decoded on first use)."""
        try:
            return _get(self, "_view")
        except AttributeError:
            self._view = self._build()
            return self._view


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
        """Apply stream entries (every process's changes, in cursor order);
        none once Redis lost data (shared.py): the replica stays as it was."""
        for entry in entries:
            if self._lost is not None:
                self.counters["stream_ignored"] += 1
                continue
            kind = entry[0]
            try:
                if kind == "s":
                    self._apply_state(*entry[1:8])
                    if entry[7] is not None:
                        self._track_holder(entry[1], entry[6], entry[7])
                    if entry[8] is not None:
                        self._apply_record(entry[1], entry[8], entry[6])
                elif kind == "r":
                    self._apply_record(*entry[1:])
                elif kind == "a":
                    self._apply_add(*entry[1:7])
                elif kind == "x":
                    self._apply_remove(*entry[1:5])
                elif kind == "k":
                    self._apply_secret(*entry[1:])
                elif kind == "t":
                    if entry[1] != self.origin:
                        self._tokens_changed()
                elif kind == "g":
                    if entry[1].sequence < self.cursor:
                        self._sequence_went_back(entry[1].sequence, self.cursor)
                    else:
                        self._resync(entry[1])
                elif kind == "lost":
                    self._sequence_went_back(entry[1], max(entry[2], self.cursor))
                elif kind == "gone":
                    self._incarnation_lost(entry[1])
            except (errors.RegistryError, ValueError, TypeError):
                self.log.failure("applying a change-stream entry failed: {kind}", kind=kind)
        self._top = max(self._top, self.cursor)
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.cursor:
            _, d, result = waiters.popleft()
            d.callback(result)
        self._note_progress()

    def _resync(self, loaded):
        """Catch up with the registry as Redis holds it (``loaded``), after
        stream entries were trimmed before this process read them: each device
        Redis has newer is applied (observers hear it), new ones are added,
        removed ones removed; later entries of the stream apply as usual."""
        self.counters["stream_resync"] += 1
        self.log.warn("caught up with Redis after a change-stream gap: {count} devices",
                      count=len(loaded.devices))
        rows = {row.number: row for row in loaded.devices}
        tombs = {number: (cursor, version) for cursor, _, number, version in loaded.tombstones}
        for number, dev in list(self._by_number.items()):
            if number not in rows or rows[number].name != dev.name:
                cursor, version = tombs.get(number, (loaded.sequence, dev.version + 1))
                self._apply_remove(number, version, cursor, dev.name)
        records = dict(loaded.sessions)
        for row in loaded.devices:
            dev = self._by_number.get(row.number)
            if dev is None:
                self._apply_add(row.number, row.version, row.cursor, row.name, row.secret,
                                row.state)
                dev = self._by_number.get(row.number)
                if dev is not None and row.number in records:
                    dev.session = records[row.number]
                continue
            if row.version > dev.version:
                self._materialize(dev)
                self._apply_decoded(dev, row.version, row.cursor, row.state, ())
            if row.number in records and row.number not in self._held:
                # Also a record written alone (no new version): a session that
                # lands here must start above its sequence-number reservation.
                dev.session = records[row.number]
            if dev.secret != row.secret:
                dev.secret = row.secret
                self._keys_changed(row.number)
        # Writes in doubt whose stream entry was trimmed: the history decides.
        for number, attempt in list(self._attempts.items()):
            dev = self._by_number.get(number)
            if dev is not None and attempt.applied is None and dev.version > attempt.base:
                self._verdict(number, attempt, self._judged_by_history(dev, attempt))
        # States this process sent whose entries were trimmed never come back.
        self._own_states = {key: state for key, state in self._own_states.items()
                            if key[0] in rows and key[1] > rows[key[0]].version}
        self._advance(loaded.sequence)
        self._resync_tokens(loaded)
        self._resync_held(getattr(loaded, "holders", None))

    def _resync_tokens(self, loaded):
        """The tokens as the catch-up snapshot holds them (entries of token changes
        may be among those trimmed: a revocation must not be lost), if it holds
        every token write of this process (redis_store.RedisStore._snapshot);
        else they are read again."""
        taken = getattr(loaded, "token_writes", None)
        if taken is None or taken != getattr(self._store, "token_writes", None):
            self._tokens_changed()
            return
        self._tokens = TokenTable.from_rows(loaded.tokens)
        self._token_changes += 1    # a re-read in flight may predate the snapshot
        self.counters["admin_token"] += 1

    def _resync_held(self, holders):
        """After a catch-up, let go of each device this process holds the session
        of that Redis shows held by another process (``holders``: number -> the
        holder Redis names, None if unknown) or offline. Unlike the stream's
        offline entry (``_track_holder``), a snapshot cannot tell "taken for
        dead" from "claimed by another process, then offline there": claiming
        the second kind would show a device online with no session. The
        device's next datagram here claims it again (its connection facts,
        written with "only if I or nobody hold it"). A claim of ours still on
        its way is left to land."""
        for number in list(self._held):
            dev = self._by_number.get(number)
            if dev is None or self._claim_pending(number):
                continue
            holder = holders.get(number) if holders is not None else None
            if not dev.online or (holder is not None and holder != self.origin):
                self._held.discard(number)
                self._left.add(number)

    def _apply_record(self, number, record, origin):
        dev = self._by_number.get(number)
        if dev is not None and origin != self.origin:
            dev.session = record    # raw bytes: session_record() decodes when needed

    def _advance(self, cursor):
        if cursor > self.cursor:
            self.cursor = cursor

    def _apply_state(self, number, version, cursor, blob, events, origin, flags):
        dev = self._by_number.get(number)
        self._advance(cursor)
        attempt = self._attempts.get(number)
        if attempt is not None and attempt.applied is None and version == attempt.base + 1:
            # Who took the version after the base of writes this process sent.
            self._verdict(number, attempt, origin == self.origin)
        # This process's own change: the state it sent is still here, no decoding.
        state = self._own_states.pop((number, version), None) if origin == self.origin else None
        if dev is None or version <= dev.version:
            return
        if state is not None or flags is None or flags & FLAG_DESIRED:
            self._apply_decoded(dev, version, cursor, state or decode_state(blob),
                                decode_events(events))
        else:
            self._defer(dev, version, cursor, blob, bool(flags & 1))
            self._applied(dev, version, cursor,
                          lambda: RawView(dev.name, number, version, cursor,
                                          lambda: self._raw_view(dev, blob, version, cursor,
                                                                 events)))

    def _apply_decoded(self, dev, version, cursor, state, events):
        old_desired = (dev.dkeys, dev.dvals)
        facts = (dev.last_heard, dev.address, dev.rtt, dev.session_id)
        was_online = dev.online
        self._restore(dev, state, version, cursor)
        self.online_count += dev.online - was_online
        if facts[0] is not None and (dev.last_heard is None or facts[0] > dev.last_heard):
            dev.last_heard, dev.address, dev.rtt, dev.session_id = facts
        self._applied(dev, version, cursor, lambda: DeviceView.of(dev, events))
        if (dev.dkeys, dev.dvals) != old_desired:
            self._desired_changed(dev)

    def _applied(self, dev, version, cursor, make_view):
        replaced = dev.cursor > 0
        dev.version = version
        dev.cursor = cursor
        self._feed.place(dev, replaced)
        self.counters["applied"] += 1
        self._subs.notify(dev.name, make_view)
        busy = self._busy.get(dev.number)
        if (type(busy) is int and cursor >= busy) or (type(busy) is tuple and version >= busy[1]):
            self._mark_ready(dev.number)

    # -- raw states, decoded on first read ----------------------------------------

    def _defer(self, dev, version, cursor, blob, online):
        """Keep ``blob`` as the device's state without decoding it (module docstring)."""
        pending = self._pending.get(dev.number)
        if pending is None:
            old = tuple(getattr(dev, slot) for slot in _LAZY)
            for slot in _LAZY:
                delattr(dev, slot)
            dev.__class__ = self._lazy_type
            self._pending[dev.number] = [blob, version, cursor, old]
        else:
            pending[0], pending[1], pending[2] = blob, version, cursor
        self.online_count += online - dev.online
        dev.online = online
        self.counters["applied_lazily"] += 1

    def _raw_view(self, dev, blob, version, cursor, events):
        """The DeviceView of one raw change, decoded apart from the device."""
        scratch = Device(dev.name, dev.number, dev.secret, version, cursor)
        try:
            self._restore(scratch, decode_state(blob), version, cursor)
        except errors.StoreError:
            self.log.failure("damaged device state on the change stream: {number}",
                             number=dev.number)
        return DeviceView.of(scratch, decode_events(events))

    def _materialize(self, dev):
        """Decode the pending raw state of ``dev``; False if it has none."""
        pending = self._pending.pop(dev.number, None)
        if pending is None:
            return False
        blob, version, cursor, old = pending
        values = list(old)
        for i, slot in enumerate(_LAZY):
            try:
                values[i] = _get(dev, slot)     # set here since (connection facts)
            except AttributeError:
                pass
        dev.__class__ = Device
        for slot, value in zip(_LAZY, values):
            setattr(dev, slot, value)
        try:
            state = decode_state(blob)
        except errors.StoreError:
            self.log.failure("damaged device state on the change stream: {number}",
                             number=dev.number)
            return True
        online = dev.online
        facts = (dev.last_heard, dev.address, dev.rtt, dev.session_id)
        self._restore(dev, state, version, cursor)
        dev.online = online     # counted when the flags arrived
        if facts[0] is not None and (dev.last_heard is None or facts[0] > dev.last_heard):
            dev.last_heard, dev.address, dev.rtt, dev.session_id = facts
        return True

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
        self._materialize(dev)
        self._forget(dev)
        if number in self._held:
            self._held.discard(number)
            self._left.add(number)      # dropped from our set in Redis (shared_presence)
        tomb = DeviceView.tombstone(name, number, version, cursor)
        self._feed.place(tomb, False)
        self._removed(tomb)
        self._attempts.pop(number, None)
        for op in self._queues.pop(number, ()):
            if op.d is not None:
                op.d.errback(errors.UnknownDevice(name, token=op.token))

    def _apply_secret(self, number, secret, origin):
        dev = self._by_number.get(number)
        if dev is not None and origin != self.origin and dev.secret != secret:
            dev.secret = secret
            self._keys_changed(number)
