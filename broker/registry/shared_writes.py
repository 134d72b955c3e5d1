"""The write path of a SharedRegistry: proposals to Redis and its answers.

A write is computed here on a scratch copy of the device and sent as the
"change" script with the version it was computed from; Redis refuses it
("stale") if another process changed the device meanwhile, and the write
is recomputed once the replica caught up. Writes of one device from one
process are pipelined: while a batch is in flight, later writes wait and
go together in the next one (one script, one round trip). A write's
Deferred fires once the stream brought its cursor back to this process.
A write with a condition on the device's holder (shared_presence.py) goes
alone: Redis answers "moved" when another process holds the device, and
the write is dropped without failing. A call that fails is in
shared_retry.py: its writes are kept and sent again, never applied twice.

A reply is also where Redis losing data shows (shared.py): a data set
marker that is not the one this process loaded (the store fails the call
and tells the registry), a cursor this process already applied, for a
change its replica does not have, or a device Redis no longer has (or has
at a lower version) while the change sequence is behind this process's
cursor. Once it showed, every write fails at once with StoreError.
"""

from collections import deque

import cbor2
from twisted.internet import defer

from . import errors
from .database import encode_state
from .model import Device, UpdateResult
from .provisioning import SessionConflict
from .redis_layout import encode_record
from .shared_retry import RETRY_DELAY, Attempt, SharedRetries
from .shared_stream import FLAG_CLAIM, FLAG_DESIRED
from .values import FrozenMap


class _Op:
    """One queued write of a device (``d`` is None once a failed call
    answered it: the write is kept to be sent again, see _failed)."""

    __slots__ = ("kind", "patch", "events", "expected", "token", "record", "cond", "d",
                 "index", "error", "reserve")

    def __init__(self, kind, patch=None, events=(), expected=None, token=None, record=None,
                 cond=None, reserve=None):
        self.kind = kind
        self.patch = patch
        self.events = events
        self.expected = expected
        self.token = token
        self.record = record
        self.cond = cond       # holder condition ("=X" or "~X", see redis_scripts.CHANGE)
        self.reserve = reserve  # record condition ("n" or "=R", see redis_scripts.CHANGE)
        self.d = defer.Deferred()
        self.index = None
        self.error = None


def _error_value(failure):
    """A failed write's error as a value (batch answers)."""
    return failure.value


def _refusal(failure):
    """A refused update as a value (batch answers); a store failure stays a failure."""
    if failure.check(errors.RegistryError) and not failure.check(errors.StoreError):
        return failure.value
    return failure


def _first_error(failure):
    failure.trap(defer.FirstError)
    return failure.value.subFailure


def _record_check(record, op):
    """The record's id, reservation and condition as the CHANGE script compares them."""
    if record is None:
        return ("", "", "")
    return (f"{record.session_id:016x}", f"{record.seq_reservation:016x}", op.reserve or "")


def _copy(dev):
    scratch = Device(dev.name, dev.number, dev.secret, dev.version, dev.cursor)
    for slot in Device.__slots__:
        setattr(scratch, slot, getattr(dev, slot))
    return scratch


class SharedWrites(SharedRetries):
    """SharedRegistry's write half (a mixin: see shared.py)."""

    __slots__ = ()

    # -- proposals -------------------------------------------------------------

    def update_reported(self, name, patch, events=(), token=None):
        """Merge a patch into ``reported`` (by name or device number); durable via Redis."""
        dev = self._lookup(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name, token=token))
        try:
            patch = self._validator.patch(patch)
            if events:
                events = self._check_events(events)
        except errors.RegistryError as e:
            return defer.fail(self._refused(e, token))
        kind = "reported" if patch or events else "barrier"
        return self._enqueue(dev, _Op(kind, patch, events, token=token))

    def update_desired(self, name, patch, expected_version=None, token=None):
        """Merge a patch into ``desired``; ``expected_version`` is checked by Redis."""
        dev = self._lookup(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name, token=token))
        try:
            patch = self._validator.patch(patch)
        except errors.RegistryError as e:
            return defer.fail(self._refused(e, token))
        if not patch and expected_version is None:
            return self._enqueue(dev, _Op("barrier", token=token))
        return self._enqueue(dev, _Op("desired", patch, expected=expected_version, token=token))

    def save_session(self, device_number, record):
        """Keep a SessionRecord (here at once, in Redis with the device's next batch)."""
        dev = self._by_number.get(device_number)
        if dev is None:
            return defer.fail(errors.UnknownDevice(device_number))
        dev.session = record
        return self._enqueue(dev, _Op("session", record=record))

    def reserve_session(self, device_number, record, expected):
        """As DeviceRegistry.reserve_session, checked by Redis (the replica here
        may lag): the record is written only if Redis holds this session's
        record with reservation ``expected`` (None: no record of this session
        or a newer one), else SessionConflict. It goes alone, and a call that
        failed is not sent again (its caller asks again, from the
        reservation it confirmed: an outcome in doubt then conflicts)."""
        dev = self._by_number.get(device_number)
        if dev is None:
            return defer.fail(errors.UnknownDevice(device_number))
        dev.session = record
        cond = "n" if expected is None else f"={expected:016x}"
        return self._enqueue(dev, _Op("session", record=record, reserve=cond))

    def update_reported_many(self, updates):
        """As DeviceRegistry.update_reported_many: each update rides on its
        device's next batch (one script call per device); a refused one is
        answered as a value in its place, a store failure fails them all."""
        return defer.gatherResults([self.update_reported(*update).addErrback(_refusal)
                                    for update in updates], consumeErrors=True
                                   ).addErrback(_first_error)

    def save_sessions(self, records):
        """As DeviceRegistry.save_sessions: each record rides on its device's
        next batch (one script call per device), so each succeeds or fails
        on its own; a failure is answered as a value in its place."""
        return defer.gatherResults([self.save_session(*record).addErrback(_error_value)
                                    for record in records])

    # -- batching per device -----------------------------------------------------

    def _enqueue(self, dev, op):
        if self._lost is not None:
            op.d.errback(self._lost_error())
            return op.d
        queue = self._queues.get(dev.number)
        if queue is None:
            queue = self._queues[dev.number] = deque()
        queue.append(op)
        if dev.number not in self._busy:
            self._schedule(dev.number)
        return op.d

    def _schedule(self, number):
        """Send the queued writes of device ``number`` at the end of this reactor turn."""
        self._ready[number] = None
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self):
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        ready, self._ready = self._ready, {}
        for number in ready:
            if number in self._busy or not self._queues.get(number):
                continue
            dev = self._by_number.get(number)
            if dev is None:
                self._attempts.pop(number, None)
                for op in self._queues.pop(number):
                    if op.d is not None:
                        op.d.errback(errors.UnknownDevice(number, token=op.token))
                continue
            self._send(dev, self._queues[number])

    def _mark_ready(self, number):
        self._busy.pop(number, None)
        if self._queues.get(number):
            self._schedule(number)

    def _send(self, dev, queue):
        attempt = self._attempts.get(dev.number)
        ops = self._retry_ops(dev, queue, attempt) if attempt is not None else None
        if ops is None:
            if not queue:       # (a retry found already applied)
                self._queues.pop(dev.number, None)
                return
            attempt = None
            ops = []
            while queue:
                head = queue[0]
                alone = (head.expected is not None or head.cond is not None
                         or head.reserve is not None)
                if alone and ops:
                    break
                ops.append(queue.popleft())
                if alone:
                    break
        if not queue:
            del self._queues[dev.number]
        scratch = _copy(dev)
        now = self._clock.seconds()
        states = []
        record = record_op = None
        for op in ops:
            if op.kind == "session":
                record, record_op = op.record, op
            elif op.kind != "barrier":
                try:
                    if self._change(scratch, op, now):
                        op.index = len(states) // 3
                        flags = int(scratch.online) | (FLAG_DESIRED if op.kind == "desired" else
                                                       FLAG_CLAIM if op.kind == "claim" else 0)
                        state = scratch.state()
                        if attempt is None:
                            # (A retry's states may come back as the failed call's.)
                            self._own_states[(dev.number, scratch.version)] = state
                        states += (encode_state(state),
                                   cbor2.dumps(op.events) if op.events else b"", flags)
                except errors.RegistryError as e:
                    op.error = self._refused(e, op.token)
        if not states and record is None and ops[0].expected is None:
            self._settle(dev, ops, 0, None)
            self._mark_ready(dev.number)
            return
        if states:
            if attempt is None:
                attempt = self._attempts[dev.number] = Attempt(dev.version, ops)
            attempt.stamps.append(now)
        store = self._store
        cond = ops[0].cond or ""
        args = [dev.version, "" if ops[0].expected is None else ops[0].expected, dev.number,
                self.origin, store.options.stream_length, len(states) // 3, *states,
                b"" if record is None else encode_record(record), cond,
                *_record_check(record, record_op)]
        # Every key the script may touch (redis_scripts.CHANGE): our held set,
        # and the one of the holder a reaping condition names.
        held = self._held_key
        keys = [store.device_key(dev.number), store.key_seq, store.key_feed, held,
                store.held_key(cond[1:]) if cond[:1] == "=" else held]
        self._busy[dev.number] = "reply"
        kind = "state" if states else "session" if record is not None else "version_check"
        store.write((kind, "change", keys, args)
                    ).addCallbacks(self._replied, self._failed,
                                   callbackArgs=(dev.number, ops, dev.version),
                                   errbackArgs=(dev.number, ops, dev.version))

    def _change(self, dev, op, now):
        """Apply one op to a scratch copy; True if it makes a new version."""
        kind = op.kind
        if kind == "claim":
            # This process holds the device's session now (even if it was online elsewhere).
            dev.online = True
            kind, data = "connection", op.patch
        elif kind == "connection":
            if dev.online == op.patch["online"]:
                return False
            dev.online = op.patch["online"]
            data = op.patch
        elif kind == "reported":
            if op.patch:
                self._merge_reported(dev, op.patch, now)
            if op.events:
                data = FrozenMap({"patch": FrozenMap(op.patch), "events": op.events})
                if not op.patch:
                    kind, data = "events", op.events
            else:
                data = FrozenMap(op.patch)
        else:
            if not op.patch:
                return False
            self._merge_desired(dev, op.patch, now)
            data = FrozenMap(op.patch)
        dev.version += 1
        self._remember(dev, 0, now, kind, data)   # its cursor is known once Redis took it
        return True

    # -- Redis's answer ------------------------------------------------------------

    def _replied(self, reply, number, ops, base, checked=False):
        status, first, version = reply[:3]
        refused = reply[3] if len(reply) > 3 else None
        dev = self._by_number.get(number)
        if self._lost is None and dev is not None:
            if status == "ok" and 0 < first <= self.cursor and dev.version <= base:
                # The stream applies changes in cursor order, so past cursor
                # ``first`` the replica would have this change: Redis's sequence
                # went back, and handed out ``first`` a second time.
                self._sequence_went_back(first, self.cursor)
            elif not checked and (status == "missing" or (status == "stale" and version < base)):
                # Removed by another process meanwhile, or Redis lost data: its
                # sequence tells. (The device stays busy until then.)
                self._check_sequence().addBoth(
                    lambda _: self._replied(reply, number, ops, base, True))
                return
            elif status == "stale" and version < base:
                # A device's version never goes back (numbers are never reused):
                # Redis lost data even if its sequence grew past ours again.
                self._redis_lost(f"device {dev.name} is at version {version} in Redis, "
                                 f"behind version {base} this broker process already had")
        if self._lost is not None:
            self._refuse(number, ops, base)
            return
        name = dev.name if dev is not None else number
        attempt = self._attempts.get(number)
        if attempt is not None and (attempt.base != base or attempt.ops is not ops):
            attempt = None
        if attempt is not None and (status != "stale" or not attempt.failed):
            del self._attempts[number]   # answered: this call was applied, or not at all
            attempt = None
        if status == "ok":
            self._retry_delay = RETRY_DELAY     # Redis answers: retry rounds start over
            self._top = max(self._top, first + version - base - 1)
            if version > base and (ops[0].cond or " ")[0] == "=":
                self.counters["presence_reaped"] += 1
            if refused is not None:
                self._record_refused(dev, ops, refused)
            self._settle(dev, ops, first, base)
            last = max((first + op.index for op in ops if op.index is not None), default=0)
            if last and last > self.cursor:
                self._busy[number] = last
            else:
                self._mark_ready(number)
            return
        self._forget_own(number, ops, base)
        if status == "moved":
            # Another process holds the device: this connection change no longer applies.
            self.counters["connection_moved"] += 1
            for op in ops:
                if op.d is not None:
                    op.d.callback(UpdateResult(name, dev.version if dev else version,
                                               dev.cursor if dev else 0, op.token))
            self._mark_ready(number)
            return
        if status == "stale":
            self.counters["retried_stale"] += 1
            queue = self._queues.setdefault(number, deque())
            for op in reversed(ops):
                op.index = op.error = None
                queue.appendleft(op)
            if attempt is not None and attempt.applied is not None:
                self._conclude(number, attempt)
            # else still in doubt: the replica catching up brings version base + 1.
            if dev is not None and dev.version < version:
                self._busy[number] = ("v", version)
            else:
                self._mark_ready(number)
            return
        for op in ops:
            if op.d is None:
                continue
            if status == "conflict" and op.expected is not None:
                self.counters["rejected_version_conflict"] += 1
                op.d.errback(errors.VersionConflict(name, op.expected, version, token=op.token))
            else:
                op.d.errback(errors.UnknownDevice(name, token=op.token))
        self._mark_ready(number)

    def _record_refused(self, dev, ops, stored):
        """Redis kept its record (another process's, or higher): the replica
        takes it (this process's own record must not stay here in its place,
        the next resume reads it) and the batch's record writes fail."""
        if dev is not None:
            dev.session = stored or None
        self.counters["session_records_refused"] += 1
        number = dev.number if dev is not None else None
        for op in ops:
            if op.kind == "session" and op.error is None:
                op.error = SessionConflict(number, "Redis holds a newer record of the device")

    def _forget_own(self, number, ops, base):
        """Drop the states kept for a batch Redis did not take (shared_stream._apply_state)."""
        for op in ops:
            if op.index is not None:
                self._own_states.pop((number, base + op.index + 1), None)

    def _settle(self, dev, ops, first, base):
        """Fire or park each op's Deferred once its change is applied here."""
        name = dev.name if dev is not None else None
        last = None
        for op in ops:
            if op.error is not None:
                if op.d is not None:
                    op.d.errback(op.error)
            elif op.index is not None:
                cursor = first + op.index
                last = (cursor, base + op.index + 1)
                if op.d is not None:
                    self._park(cursor, op.d, UpdateResult(name, last[1], cursor, op.token))
        for op in ops:
            if op.d is not None and op.error is None and op.index is None:
                if op.kind == "session":
                    result = op.record
                elif last is not None:
                    result = UpdateResult(name, last[1], last[0], op.token)
                else:
                    result = UpdateResult(name, dev.version, dev.cursor, op.token)
                self._park(last[0] if last else 0, op.d, result)

    def _wait(self, cursor, d, result):
        """Fire ``d`` with ``result`` once cursor ``cursor`` (from a provisioning
        script's reply) is applied here. One already applied was this change's
        (the stream came before the reply) or, if Redis's sequence is behind
        this process's cursor, a second one: Redis lost data (shared.py)."""
        if self._lost is None and 0 < cursor <= self.cursor:
            self._check_sequence().addBoth(lambda _: self._park(cursor, d, result))
        else:
            self._park(cursor, d, result)

    def _park(self, cursor, d, result):
        if self._lost is not None:
            d.errback(self._lost_error())
        elif cursor <= self.cursor:
            d.callback(result)
        else:
            self._waiters.append((cursor, d, result))
