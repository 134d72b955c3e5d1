"""SharedRegistry: the DeviceRegistry of one broker process among many, over Redis.

Each process keeps the whole registry in memory (reads stay synchronous)
as a replica of Redis. Redis decides: a write is proposed from the
replica (the new state is computed here, as the single-process registry
does), sent as a Lua script that checks the device's version and takes the
next cursor atomically, and applied to the replica only when it comes back
on the change stream, which every process follows in cursor order. So all
processes see the same versions, cursors and feed, observers hear of every
process's changes, and ``expected_version`` is checked against Redis.

A write's Deferred fires once Redis acknowledged it (durable in the sense
docs/scaling.md states) AND this process applied it, so a read after a
write sees it. Writes of one device from one process are pipelined in
batches: while a batch is in flight, later writes wait and go together in
the next one (one script, one round trip). If another process changed the
device meanwhile (the script answers "stale"), the batch is recomputed
once the replica caught up.
"""

import os
from bisect import bisect_right
from collections import deque

import cbor2
from twisted.internet import defer

from . import errors
from .database import encode_state
from .feed import ChangeFeed
from .model import EMPTY, ChangeBatch, Device, DeviceView, Provisioned, UpdateResult, merge_map
from .redis_store import encode_record
from .registry import DeviceRegistry, KeyWatch, check_name
from .secrets import ROLES, TokenTable, hash_token, new_device_number, new_secret, new_token
from .values import FrozenMap, map_size

#: seconds a learned top of the Redis sequence counts as fresh (future cursors).
TOP_FRESH = 1.0


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


class _Op:
    """One queued write of a device."""

    __slots__ = ("kind", "patch", "events", "expected", "token", "record", "d", "index", "error")

    def __init__(self, kind, patch=None, events=(), expected=None, token=None, record=None):
        self.kind = kind
        self.patch = patch
        self.events = events
        self.expected = expected
        self.token = token
        self.record = record
        self.d = defer.Deferred()
        self.index = None
        self.error = None


def _copy(dev):
    scratch = Device(dev.name, dev.number, dev.secret, dev.version, dev.cursor)
    for slot in Device.__slots__:
        setattr(scratch, slot, getattr(dev, slot))
    return scratch


class SharedRegistry(DeviceRegistry):
    """A DeviceRegistry over a RedisStore, shared by every broker process (module docstring)."""

    def __init__(self, store, *, clock=None, settings=None, random_bytes=os.urandom, origin=None):
        self.origin = origin or os.urandom(8).hex()
        self._queues = {}          # number -> deque of _Op
        self._busy = {}            # number -> "reply" | cursor to apply | ("v", version)
        self._ready = {}           # numbers with queued writes to send (ordered set)
        self._flush_call = None
        self._waiters = deque()    # (cursor, Deferred, result), cursors ascending
        self._desired_watches = []
        self._top = 0
        self._top_at = float("-inf")
        self._following = False
        super().__init__(store, clock=clock, settings=settings, random_bytes=random_bytes)

    # -- loading -------------------------------------------------------------

    def _load(self, loaded):
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
        for token_id, digest, role, created_at in loaded.tokens:
            self._tokens.add(token_id, digest, role, created_at)
        self._admin_seq = 0
        keep = self.settings.feed_retention
        tombstones = sorted(loaded.tombstones)[-keep:] if keep else []
        self._feed = OrderedFeed(keep)
        self._feed.horizon = loaded.horizon
        entries = [(d.cursor, d) for d in devices]
        entries += [(c, DeviceView.tombstone(name, number, version, c))
                    for c, name, number, version in tombstones]
        entries.sort(key=lambda e: e[0])
        for _, entry in entries:
            self._feed.append(entry, False)
        self.cursor = max([loaded.sequence, loaded.horizon] + [c for c, _ in entries[-1:]])
        self._top = self.cursor
        # Unlike one process, devices stored online stay online: another
        # process may hold their sessions.

    def _restore(self, dev, state, version, cursor):
        dev.restore_state(state)
        dev.rkeys = self._shapes.intern(dev.rkeys)
        dev.dkeys = self._shapes.intern(dev.dkeys)
        history = dev.history
        if history and history[-1][1] == 0:
            # Cursors of one script are consecutive: fill in the ones the
            # writer could not know when it built the state.
            history = tuple((v, cursor - (version - v), at, kind, data) if c == 0 else
                            (v, c, at, kind, data) for v, c, at, kind, data in history)
        size = self.settings.history_size
        dev.history = history[-size:] if size else EMPTY

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Follow the change stream from where loading began."""
        if not self._following:
            self._following = True
            self._store.follow(self._store.feed_start, self._deliver)
        return defer.succeed(None)

    @defer.inlineCallbacks
    def stop(self):
        """Send queued writes, wait until Redis has them, then close."""
        self._flush()
        try:
            yield self._store.barrier()
        except errors.StoreError:
            pass
        # Acknowledged by Redis, so durable, even if not applied here any more.
        waiters, self._waiters = self._waiters, deque()
        for _, d, result in waiters:
            d.callback(result)
        yield self._store.close()

    def reload(self):
        """Re-read the tokens (devices are kept current by the change stream)."""
        def apply(rows):
            table = TokenTable()
            for token_id, digest, role, created_at in rows:
                table.add(token_id, digest, role, created_at)
            self._tokens = table
            self.counters["admin_token"] += 1
        return self._store.fetch_tokens().addCallback(apply)

    # -- reads ---------------------------------------------------------------

    def changes_since(self, cursor, limit=1000):
        """As DeviceRegistry.changes_since; a cursor another process handed out
        that this replica has not reached yet waits (empty batch) instead of a reset."""
        if cursor > self.cursor:
            fresh = self._clock.seconds() - self._top_at <= TOP_FRESH
            if cursor <= self._top or not fresh:
                if cursor > self._top:
                    self._refresh_top()
                return ChangeBatch([], cursor, False, False)
        return super().changes_since(cursor, limit)

    def _refresh_top(self):
        def learned(top):
            self._top = max(self._top, top)
            self._top_at = self._clock.seconds()
        self._store.top().addCallbacks(learned, lambda failure: None)

    def desired_of(self, device_number):
        """The device's desired map (no view built), or None."""
        dev = self._by_number.get(device_number)
        return None if dev is None else FrozenMap(zip(dev.dkeys, dev.dvals))

    def watch_desired(self, callback):
        """Call ``callback(device_number, desired)`` after a change of a device's desired map."""
        watch = KeyWatch(self._desired_watches, callback)
        self._desired_watches.append(watch)
        return watch

    # -- writes: proposals ---------------------------------------------------

    def _lookup(self, name):
        return self._by_number.get(name) if isinstance(name, int) else self._by_name.get(name)

    def _rejected(self, e, token):
        e.token = token
        self.counters["rejected_" + e.code] += 1
        return defer.fail(e)

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
            return self._rejected(e, token)
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
            return self._rejected(e, token)
        if not patch and expected_version is None:
            return self._enqueue(dev, _Op("barrier", token=token))
        return self._enqueue(dev, _Op("desired", patch, expected=expected_version, token=token))

    def _set_online(self, dev, online):
        return self._enqueue(dev, _Op("connection", {"online": online}))

    def save_session(self, device_number, record):
        """Keep a SessionRecord (here at once, in Redis with the device's next batch)."""
        dev = self._by_number.get(device_number)
        if dev is None:
            return defer.fail(errors.UnknownDevice(device_number))
        dev.session = record
        return self._enqueue(dev, _Op("session", record=record))

    def _enqueue(self, dev, op):
        queue = self._queues.get(dev.number)
        if queue is None:
            queue = self._queues[dev.number] = deque()
        queue.append(op)
        if dev.number not in self._busy:
            self._ready[dev.number] = None
            if self._flush_call is None:
                self._flush_call = self._clock.callLater(0, self._flush)
        return op.d

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
                for op in self._queues.pop(number):
                    op.d.errback(errors.UnknownDevice(number, token=op.token))
                continue
            self._send(dev, self._queues[number])

    def _mark_ready(self, number):
        self._busy.pop(number, None)
        if self._queues.get(number):
            self._ready[number] = None
            if self._flush_call is None:
                self._flush_call = self._clock.callLater(0, self._flush)

    def _send(self, dev, queue):
        ops = []
        while queue:
            if queue[0].expected is not None and ops:
                break
            ops.append(queue.popleft())
            if ops[-1].expected is not None:
                break
        if not queue:
            del self._queues[dev.number]
        scratch = _copy(dev)
        now = self._clock.seconds()
        states = []
        record = None
        for op in ops:
            if op.kind == "session":
                record = op.record
            elif op.kind != "barrier":
                try:
                    if self._change(scratch, op, now):
                        op.index = len(states) // 2
                        states += (encode_state(scratch.state()),
                                   cbor2.dumps(op.events) if op.events else b"")
                except errors.RegistryError as e:
                    self.counters["rejected_" + e.code] += 1
                    e.token = op.token
                    op.error = e
        if not states and record is None and ops[0].expected is None:
            self._settle(dev, ops, 0, None)
            self._mark_ready(dev.number)
            return
        store = self._store
        args = [dev.version, "" if ops[0].expected is None else ops[0].expected, dev.number,
                self.origin, store.options.stream_length, len(states) // 2, *states,
                b"" if record is None else encode_record(record)]
        self._busy[dev.number] = "reply"
        store.call("change", [store.device_key(dev.number), store.key_seq, store.key_feed],
                   args).addCallbacks(self._replied, self._failed,
                                      callbackArgs=(dev.number, ops, dev.version),
                                      errbackArgs=(dev.number, ops))

    def _change(self, dev, op, now):
        """Apply one op to a scratch copy; True if it makes a new version."""
        kind = op.kind
        if kind == "connection":
            if dev.online == op.patch["online"]:
                return False
            dev.online = op.patch["online"]
            data = op.patch
        elif kind == "reported":
            if op.patch:
                keys, vals, times, grow = merge_map(self._shapes, dev.rkeys, dev.rvals, dev.rtimes,
                                                    op.patch, now)
                self._fits(keys, vals, grow, "reported", dev.name)
                dev.rkeys, dev.rvals, dev.rtimes = keys, vals, times
            if op.events:
                data = FrozenMap({"patch": FrozenMap(op.patch), "events": op.events})
                if not op.patch:
                    kind, data = "events", op.events
            else:
                data = FrozenMap(op.patch)
        else:
            if not op.patch:
                return False
            keys, vals, times, grow = merge_map(self._shapes, dev.dkeys, dev.dvals, dev.dtimes,
                                                op.patch, now)
            self._fits(keys, vals, grow, "desired", dev.name)
            dev.dkeys, dev.dvals, dev.dtimes = keys, vals, times
            data = FrozenMap(op.patch)
        dev.version += 1
        size = self.settings.history_size
        if size:
            dev.history = (dev.history + ((dev.version, 0, now, kind, data),))[-size:]
        return True

    def _fits(self, keys, vals, grow, which, name):
        limit = self.settings.max_state_bytes
        if grow and map_size(keys, vals) > limit:
            raise errors.StateTooLarge(f"{which} state of {name!r} would exceed {limit} bytes")

    # -- writes: Redis's answer ----------------------------------------------

    def _replied(self, reply, number, ops, base):
        status, first, version = reply
        dev = self._by_number.get(number)
        name = dev.name if dev is not None else number
        if status == "ok":
            self._top = max(self._top, first + version - base - 1)
            self._settle(dev, ops, first, base)
            last = max((first + op.index for op in ops if op.index is not None), default=0)
            if last and last > self.cursor:
                self._busy[number] = last
            else:
                self._mark_ready(number)
            return
        if status == "stale":
            self.counters["retried_stale"] += 1
            queue = self._queues.setdefault(number, deque())
            for op in reversed(ops):
                op.index = op.error = None
                queue.appendleft(op)
            if dev is not None and dev.version < version:
                self._busy[number] = ("v", version)
            else:
                self._mark_ready(number)
            return
        for op in ops:
            if status == "conflict" and op.expected is not None:
                self.counters["rejected_version_conflict"] += 1
                op.d.errback(errors.VersionConflict(name, op.expected, version, token=op.token))
            else:
                op.d.errback(errors.UnknownDevice(name, token=op.token))
        self._mark_ready(number)

    def _failed(self, failure, number, ops):
        for op in ops:
            op.d.errback(failure)
        self._mark_ready(number)

    def _settle(self, dev, ops, first, base):
        """Fire or park each op's Deferred once its change is applied here."""
        name = dev.name if dev is not None else None
        last = None
        for op in ops:
            if op.error is not None:
                op.d.errback(op.error)
            elif op.index is not None:
                cursor = first + op.index
                last = (cursor, base + op.index + 1)
                self._wait(cursor, op.d, UpdateResult(name, last[1], cursor, op.token))
        for op in ops:
            if op.error is None and op.index is None:
                if op.kind == "session":
                    result = op.record
                elif last is not None:
                    result = UpdateResult(name, last[1], last[0], op.token)
                else:
                    result = UpdateResult(name, dev.version, dev.cursor, op.token)
                self._wait(last[0] if last else 0, op.d, result)

    def _wait(self, cursor, d, result):
        if cursor <= self.cursor:
            d.callback(result)
        else:
            self._waiters.append((cursor, d, result))

    # -- the change stream ---------------------------------------------------

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
        self._restore(dev, state, version, cursor)
        if facts[0] is not None and (dev.last_heard is None or facts[0] > dev.last_heard):
            dev.last_heard, dev.address, dev.rtt, dev.session_id = facts
        replaced = dev.cursor > 0
        dev.version = version
        dev.cursor = cursor
        self._feed.place(dev, replaced)
        self.counters["applied"] += 1
        self._subs.notify(dev.name, lambda: DeviceView.of(dev, events))
        if (dev.dkeys, dev.dvals) != old_desired and self._desired_watches:
            desired = FrozenMap(zip(dev.dkeys, dev.dvals))
            for watch in list(self._desired_watches):
                try:
                    watch.callback(number, desired)
                except Exception:
                    self.log.failure("desired watcher raised for device {number}", number=number)
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
        del self._by_name[name]
        del self._by_number[number]
        self._names.remove(name)
        if dev.cursor > 0:
            self._feed.stale()
        dev.cursor = 0
        tomb = DeviceView.tombstone(name, number, version, cursor)
        self._feed.place(tomb, False)
        self._subs.notify(name, lambda: tomb)
        self._keys_changed(number)
        for op in self._queues.pop(number, ()):
            op.d.errback(errors.UnknownDevice(name, token=op.token))

    def _apply_secret(self, number, secret, origin):
        dev = self._by_number.get(number)
        if dev is not None and origin != self.origin and dev.secret != secret:
            dev.secret = secret
            self._keys_changed(number)

    # -- provisioning and tokens ---------------------------------------------

    def add_device(self, name):
        """Provision a device in Redis: Deferred[Provisioned] once applied here."""
        try:
            check_name(name)
        except errors.InvalidName as e:
            return defer.fail(e)
        if name in self._by_name:
            return defer.fail(errors.DeviceExists(name))
        number = new_device_number(self._random_bytes)
        while number in self._by_number:
            number = new_device_number(self._random_bytes)
        dev = Device(name, number, new_secret(self._random_bytes), 1)
        if self.settings.history_size:
            dev.history = ((1, 0, self._clock.seconds(), "created", None),)
        store = self._store
        keys = [store.device_key(number), store.keys_names, store.key_seq, store.key_feed]
        args = [name, number, dev.secret, encode_state(dev.state()), self.origin,
                store.options.stream_length]

        def replied(reply):
            status, cursor, _ = reply
            if status == "exists":
                raise errors.DeviceExists(name)
            if status == "taken":
                return self.add_device(name)
            d = defer.Deferred()
            self._wait(cursor, d, Provisioned(name, number, dev.secret))
            return d
        return store.call("add", keys, args).addCallback(replied)

    def remove_device(self, name):
        """Remove a device everywhere; Deferred once applied here."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        store = self._store
        keys = [store.device_key(dev.number), store.keys_names, store.key_seq, store.key_feed,
                store.key_tombs, store.key_horizon]
        args = [dev.number, self.origin, store.options.stream_length,
                self.settings.feed_retention or 1]

        def replied(reply):
            status, cursor, version = reply
            if status != "ok":
                raise errors.UnknownDevice(name)
            d = defer.Deferred()
            self._wait(cursor, d, UpdateResult(name, version, cursor))
            return d
        return store.call("remove", keys, args).addCallback(replied)

    def rotate_key(self, name):
        """A new secret for a device, everywhere; Deferred[Provisioned] once in Redis."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        secret = new_secret(self._random_bytes)
        store = self._store

        def replied(reply):
            if reply[0] != "ok":
                raise errors.UnknownDevice(name)
            dev.secret = secret
            self._keys_changed(dev.number)
            return Provisioned(name, dev.number, secret)
        return store.call("secret", [store.device_key(dev.number), store.key_seq, store.key_feed],
                          [dev.number, secret, self.origin, store.options.stream_length]
                          ).addCallback(replied)

    def _tokens_call(self, *args):
        store = self._store
        return store.call("tokens", [store.key_tokens, store.key_seq, store.key_feed],
                          [*args, self.origin, store.options.stream_length])

    def add_token(self, role):
        """A new dashboard token, valid on every broker once Redis has it."""
        if role not in ROLES:
            return defer.fail(errors.InvalidValue(f"token role must be one of {', '.join(ROLES)}"))
        token_id, text = new_token(self._random_bytes)
        while token_id in self._tokens:
            token_id, text = new_token(self._random_bytes)
        digest = hash_token(text)
        now = self._clock.seconds()
        self._tokens.add(token_id, digest, role, now)
        return self._tokens_call("add", token_id, cbor2.dumps([digest, role, now])).addCallback(
            lambda _: (token_id, text))

    def revoke_token(self, token_id):
        """Forget a token everywhere."""
        if not self._tokens.remove(token_id):
            return defer.fail(errors.UnknownToken(f"unknown token {token_id!r}"))
        return self._tokens_call("del", token_id, b"").addCallback(lambda _: token_id)


def open_shared_registry(options, *, reactor=None, clock=None, settings=None,
                         store_wrapper=None, origin=None):
    """A SharedRegistry over Redis (``options``: a RedisOptions); raises StoreError
    (clear message) when Redis cannot be reached or holds damaged data."""
    from .redis_store import RedisStore
    from .settings import RegistrySettings
    if reactor is None:
        from twisted.internet import reactor
    store = RedisStore(options, reactor=reactor)
    wrapped = store if store_wrapper is None else store_wrapper(store)
    try:
        return SharedRegistry(wrapped, clock=clock or reactor,
                              settings=settings or RegistrySettings(), origin=origin)
    except BaseException:
        store.close()
        raise
