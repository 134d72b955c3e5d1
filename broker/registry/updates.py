"""State updates of DeviceRegistry: reported, desired and connection facts.

Each write changes memory at once (version and cursor assigned in call
order), tells observers, and returns the store's Deferred that fires once
the change is durable, or fails with NotDurable (applied, not stored yet:
the store's ``write_state`` makes that error itself, store.py).
The common report (known keys, numbers replacing numbers) is checked and
merged in one pass. The UDP endpoint writes the
reports of a reactor turn, and their session records, in two batches.
"""

from twisted.internet import defer

from . import errors, history
from .model import EMPTY, DeviceView, UpdateResult, merge_map, replace_numbers
from .provisioning import SessionConflict, record_refusal
from .store import gathered
from .values import FrozenMap, map_size, value_size


NotDurable = errors.NotDurable   # (broker.web imports it from here)


class StateUpdates:
    """DeviceRegistry's write half for device state (a mixin: see registry.py)."""

    __slots__ = ()

    # -- shared steps (SharedRegistry uses them too) -------------------------

    def _lookup(self, name):
        """The record of a device by name, or by number when ``name`` is an int."""
        return self._by_number.get(name) if isinstance(name, int) else self._by_name.get(name)

    def _refused(self, e, token):
        """Count a refused write and echo its token; returns the error."""
        e.token = token
        self.counters["rejected_" + e.code] += 1
        return e

    def _remember(self, dev, cursor, now, kind, data):
        """Append a history entry to ``dev`` (kept to ``history_size``)."""
        size = self.settings.history_size
        if size:
            dev.history = history.append_entry(dev.history, dev.version, cursor, now, kind,
                                               data, size, self.settings.history_bytes)

    def _merge_reported(self, dev, patch, now):
        """Merge a validated patch into ``dev.reported``; StateTooLarge leaves it as it was."""
        keys, vals, times, grow = merge_map(self._shapes, dev.rkeys, dev.rvals, dev.rtimes,
                                            patch, now, self.settings.max_items)
        self._fits(keys, vals, grow, "reported", dev.name, dev.rkeys, dev.rvals)
        dev.rkeys, dev.rvals, dev.rtimes = keys, vals, times

    def _merge_desired(self, dev, patch, now):
        """Merge a validated patch into ``dev.desired``; StateTooLarge leaves it as it was."""
        keys, vals, times, grow = merge_map(self._shapes, dev.dkeys, dev.dvals, dev.dtimes,
                                            patch, now, self.settings.max_items)
        self._fits(keys, vals, grow, "desired", dev.name, dev.dkeys, dev.dvals)
        dev.dkeys, dev.dvals, dev.dtimes = keys, vals, times

    def _fits(self, keys, vals, grow, which, name, old_keys, old_vals):
        """Refuse a merged map over a limit, unless it is no larger than the map
        it replaces: a state already over a lowered limit may still shrink."""
        if not grow:
            return
        if len(keys) > self.settings.max_keys and len(keys) > len(old_keys):
            raise errors.InvalidValue(f"{which} state of {name!r} would have more than "
                                      f"{self.settings.max_keys} keys")
        limit = self.settings.max_state_bytes
        size = map_size(keys, vals)
        if size > limit and size > map_size(old_keys, old_vals):
            raise errors.StateTooLarge(f"{which} state of {name!r} would exceed {limit} bytes")

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

    # -- the change machinery ------------------------------------------------

    def _bump(self, dev, kind, data, now):
        """Give ``dev`` its next version and the next global cursor."""
        replaced = dev.cursor > 0
        dev.version += 1
        self.cursor = cursor = self.cursor + 1
        dev.cursor = cursor
        self._feed.append(dev, replaced)
        settings = self.settings
        size = settings.history_size      # (_remember, inline: once per change)
        if size:
            dev.history = history.append_entry(dev.history, dev.version, cursor, now, kind,
                                               data, size, settings.history_bytes)

    def _persist(self, dev, result):
        return self._store.write(("state", dev.version, dev.cursor, dev.state(), dev.number), result)

    def _changed(self, dev, token, events=EMPTY):
        """Queue the durable write of a changed device, then tell its observers.

        The change is in memory from here on, whatever the store does: its
        failure is NotDurable (the store keeps the change to write it again),
        made by the store once per failed commit, not by an errback per write.
        """
        d = self._store.write_state(dev, token)
        if self._subs.watching:
            self._subs.notify(dev.name, lambda: DeviceView.of(dev, events))
        return d

    # -- reported --------------------------------------------------------------

    def update_reported(self, name, patch, events=(), token=None):
        """Merge a patch into ``reported`` (null deletes); Deferred[UpdateResult] once durable.

        ``name`` may also be the device number (an int), as for set_connection.
        """
        dev = self._lookup(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name, token=token))
        try:
            events = self._apply_reported(dev, patch, events, token)
        except errors.RegistryError as e:
            return defer.fail(e)
        if events is None:
            return self._store.barrier_for((dev,), UpdateResult(dev.name, dev.version,
                                                                dev.cursor, token))
        return self._changed(dev, token, events)

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
        out = []
        changed = []
        unchanged = []
        by_number, by_name = self._by_number, self._by_name
        apply = self._apply_reported
        subs = self._subs
        result = tuple.__new__           # UpdateResult without its __new__'s Python frame
        for update in updates:
            name = update[0]
            dev = by_number.get(name) if isinstance(name, int) else by_name.get(name)
            size = len(update)
            token = update[3] if size > 3 else None
            if dev is None:
                out.append(errors.UnknownDevice(name, token=token))
                continue
            try:
                events = apply(dev, update[1], update[2] if size > 2 else EMPTY, token)
            except errors.RegistryError as e:
                out.append(e)
                continue
            if events is not None:
                changed.append(dev)
                if subs.watching:
                    subs.notify(dev.name, lambda: DeviceView.of(dev, events))
            else:
                unchanged.append(dev)
            out.append(result(UpdateResult, (dev.name, dev.version, dev.cursor, token)))
        if not changed:
            return self._store.barrier_for(unchanged, out)
        if not unchanged:
            return self._store.write_states(changed, out)
        return gathered([self._store.write_states(changed), self._store.barrier_for(unchanged)],
                        out)

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
                # (the history keeps the patch encoded at once: its key
                # objects need not be the interned ones)
                self._bump(dev, "reported", patch, now)
                return EMPTY
        try:
            patch = self._validator.patch(patch)
            events = self._check_events(events) if events else EMPTY
            if patch:
                self._merge_reported(dev, patch, now)
        except errors.RegistryError as e:
            raise self._refused(e, token)
        if patch and events:
            self._bump(dev, "reported", FrozenMap({"patch": FrozenMap(patch), "events": events}),
                       now)
        elif patch:
            self._bump(dev, "reported", patch, now)
        elif events:
            self._bump(dev, "events", events, now)
        else:
            return None
        return events

    # -- desired ---------------------------------------------------------------

    def update_desired(self, name, patch, expected_version=None, token=None):
        """Merge a patch into ``desired``, refused with VersionConflict if
        ``expected_version`` is given and differs; Deferred[UpdateResult] once durable."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name, token=token))
        if expected_version is not None and expected_version != dev.version:
            self.counters["rejected_version_conflict"] += 1
            return defer.fail(errors.VersionConflict(name, expected_version, dev.version, token=token))
        now = self._clock.seconds()
        try:
            patch = self._validator.patch(patch)
            if patch:
                self._merge_desired(dev, patch, now)
        except errors.RegistryError as e:
            return defer.fail(self._refused(e, token))
        if not patch:
            return self._store.barrier_for((dev,), UpdateResult(name, dev.version, dev.cursor,
                                                                token))
        self._bump(dev, "desired", patch, now)
        d = self._changed(dev, token)
        self._desired_changed(dev)
        return d

    # -- connection facts --------------------------------------------------------

    def set_connection(self, name, *, online, last_heard=None, address=None, rtt=None,
                       session_id=None):
        """Record connection facts of a device (by name, or by number if an int).

        Only a flip of ``online`` is a change (version, cursor, observers,
        a durable write whose Deferred is returned); the other facts update
        in place. ``last_heard`` (epoch seconds) defaults to the clock's time
        for a device heard now, and stays as it was for one going offline
        (it went quiet then, it was not heard now).
        """
        dev = self._lookup(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        if last_heard is not None:
            dev.last_heard = last_heard
        elif online:
            dev.last_heard = self._clock.seconds()
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
        self.online_count += 1 if online else -1
        self._bump(dev, "connection", {"online": online}, self._clock.seconds())
        d = self._store.write_state(dev)    # written as it is at commit time
        self._subs.notify(dev.name, lambda: DeviceView.of(dev))
        return d

    # -- session records (the UDP endpoint's, batched) -------------------------

    def save_sessions(self, records):
        """``save_session`` of several records with ONE Deferred for all of them.

        ``records``: ``(device_number, SessionRecord)`` pairs.  Fires once
        all are durable with a list in the same order: each record, or the
        error (not raised) that kept it from being durable (UnknownDevice
        for a device the registry does not know).  Errbacks (StoreError) if
        the store failed the one write of them all.  For the UDP endpoint,
        which saves a record with every report of a reactor turn.
        """
        out = []
        numbers = []
        kept = []
        by_number = self._by_number
        for number, record in records:
            dev = by_number.get(number)
            if dev is None:
                out.append(errors.UnknownDevice(number))
                continue
            # (ssp-broker reservations: a record never lowers the stored
            # reservation nor replaces a newer session's, provisioning.py)
            refusal = record_refusal(dev.session, record)
            if refusal is not None:
                out.append(SessionConflict(number, refusal))
                continue
            dev.session = record
            numbers.append(number)
            kept.append(record)
            out.append(record)
        if not kept:
            return self._store.barrier(out)
        return self._store.write_sessions(numbers, kept, out)
