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
write sees it. The write path is in shared_writes.py (a failed call in
shared_retry.py), provisioning in shared_provisioning.py, the change
stream in shared_stream.py.

Presence (shared_presence.py): each process holds a lease in Redis, and
Redis records which process holds each online device, so the devices of a
process that died are marked offline by the survivors.

Commands for a device whose SSP session another process holds are relayed
over a Redis pub/sub channel (``relay_command`` / ``relay_to``): they live
in memory only, so nothing is stored, and the holder delivers them.

Redis that lost data (restarted without persistence, FLUSHALL, failed over
to an empty or older replica) restarts its sequence below cursors this
process applied: the stream would never bring this process anything again
while Redis acknowledged its writes. An emptied Redis has lost the data
set's marker this process loaded (redis_store.py): every script, every
read of the stream, of the sequence and of the tokens shows it at once
(``_incarnation_lost``), however far other processes' writes took the new
sequence. An older copy of the same data set (a restored snapshot, an
older replica) keeps the marker; it shows in a write's reply (a cursor
already applied, for a change the replica never saw), in Redis's answer
to a write of a device the replica has, or by the stream reader while the
stream is quiet (redis_follow.py) (``_sequence_went_back``). Either way it
is refused for good: one critical log line, every write fails with
StoreError, readiness says why, reads serve the replica. Redis is not
written again from here: the operator restores it and restarts the brokers.
"""

import os
from collections import deque

import cbor2
from twisted.internet import defer

from . import errors
from .close_report import CloseReport
from .model import ChangeBatch
from .redis_layout import decode_record
from .registry import DeviceRegistry
from .secrets import TokenTable
from .redis_follow import SEQUENCE_CHECK_INTERVAL
from .shared_presence import LEASE_CHECK_INTERVAL, LEASE_TTL, PresenceLease, SharedPresence
from .shared_retry import RETRY_DELAY
from .shared_provisioning import SharedProvisioning
from .shared_stream import ChangeStream, OrderedFeed, lazy_device_type
from .shared_writes import SharedWrites
from .values import thaw

__all__ = ["OrderedFeed", "SharedRegistry", "open_shared_registry"]

#: the kinds of write whose loss the stop reports (shared_writes._Op).
_CHANGES = frozenset({"reported", "desired", "session"})

#: seconds between records, in the data directory, of how far this process
#: followed the data set while it runs (besides its start and clean stop).
PROGRESS_INTERVAL = 60.0


class SharedRegistry(ChangeStream, SharedPresence, SharedWrites, SharedProvisioning,
                     DeviceRegistry):
    """A DeviceRegistry over a RedisStore, shared by every broker process (module docstring).

    ``lease_ttl`` and ``lease_check_interval`` (seconds) set the presence
    lease (shared_presence.py); ``lease_ttl=0`` turns it off (a process that
    holds no sessions, e.g. a tool). ``sequence_check_interval`` (seconds):
    how often, at most, the quiet stream reader asks whether Redis lost data.
    ``progress_interval`` (seconds, 0 = never): how often, at most, the change
    applied last is remembered in the data directory while running, so that a
    copy of Redis older than it is refused at start even after a crash
    (``OlderCopy``, redis_marker.py)."""

    shared = True

    feed_type = OrderedFeed

    def __init__(self, store, *, clock=None, settings=None, random_bytes=os.urandom, origin=None,
                 lease_ttl=LEASE_TTL, lease_check_interval=LEASE_CHECK_INTERVAL,
                 sequence_check_interval=SEQUENCE_CHECK_INTERVAL,
                 progress_interval=PROGRESS_INTERVAL):
        self.origin = origin or os.urandom(8).hex()
        self._lost = None          # why writes are refused: Redis lost data (module docstring)
        self._sequence_check = sequence_check_interval
        self._held = set()         # numbers of the devices this process holds (claimed online)
        self._left = set()         # numbers that left _held, to drop from our set in Redis
        self._reaping = set()      # numbers of another holder's devices being marked offline
        self._queues = {}          # number -> deque of _Op
        self._busy = {}            # number -> "reply" | cursor to apply | ("v", version)
        self._ready = {}           # numbers with queued writes to send (ordered set)
        self._flush_call = None
        self._waiters = deque()    # (cursor, Deferred, result), cursors ascending
        self._top = 0
        self._top_checked = 0      # Redis's top was read after cursors up to this came
        self._following = False
        self._pending = {}         # number -> [raw state, version, cursor, old state]
        self._own_states = {}      # (number, version) -> state sent, until the stream brings it
        self._attempts = {}        # number -> Attempt: writes sent with states, or in doubt
        self._retrying = {}        # numbers whose failed writes wait for the retry delay
        self._retry_call = None    # None, a DelayedCall, or False once stopped
        self._retry_delay = RETRY_DELAY  # doubles while retries find Redis away
        self._lazy_type = lazy_device_type(self)
        self._relay_target = None  # deliver(number, command) for relayed commands
        self._token_changes = 0    # token changes made or heard of here (see reload)
        self._tokens_stale = 0     # others' token changes not read yet (_tokens_changed)
        self._tokens_reading = False
        self._tokens_retry = False  # a failed re-read waits for the retry timer
        self._tokens_failing = False  # a failed re-read was logged
        self._progress_interval = progress_interval
        self._progress_due = None  # clock time of the next record of the cursor
        self._progress_busy = False
        self._last_error = None    # of the last failed call (the stop's report)
        super().__init__(store, clock=clock, settings=settings, random_bytes=random_bytes)
        self._store.on_incarnation_lost(self._incarnation_lost)
        self._held_key = self._store.held_key(self.origin)
        self.presence = (PresenceLease(self, ttl=lease_ttl, interval=lease_check_interval)
                         if lease_ttl else None)

    # -- loading -------------------------------------------------------------

    def _load(self, loaded):
        devices = self._load_records(loaded)
        keep = self.settings.feed_retention
        tombstones = sorted(loaded.tombstones)[-keep:] if keep else []
        self._load_feed(devices, tombstones, loaded.horizon, loaded.sequence)
        self._top = self.cursor
        # Unlike one process, devices stored online stay online: another
        # process may hold their sessions.

    def _restore(self, dev, state, version, cursor):
        super()._restore(dev, state, version, cursor)
        # Cursors of one script are consecutive: fill in the ones the writer
        # could not know when it built the state.
        dev.history = dev.history.with_cursors(version, cursor)

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Follow the change stream from where loading began."""
        if not self._following:
            self._following = True
            self._progress_due = self._clock.seconds() + self._progress_interval
            self._store.follow(self._store.feed_start, self._deliver,
                               check_interval=self._sequence_check)
            if self.presence is not None:
                self.presence.start()
        return defer.succeed(None)

    @defer.inlineCallbacks
    def stop(self):
        """Send queued writes (kept ones get their last try), wait until Redis
        has them, then close; fires with a CloseReport naming the devices whose
        changes Redis never took (the broker's last line, service.py). The
        lease is left to expire: the survivors then mark offline what is held."""
        if self.presence is not None:
            self.presence.stop()
        if self._retry_call:
            self._retry_call.cancel()
        self._retry()           # failed writes get one more try
        self._retry_call = False
        self._flush()
        barrier_error = None
        try:
            yield self._store.barrier()
        except errors.StoreError as e:
            barrier_error = str(e)
        # Acknowledged by Redis, so durable, even if not applied here any more.
        waiters, self._waiters = self._waiters, deque()
        for _, d, result in waiters:
            d.callback(result)
        yield self._store.close()
        unstored = self._unstored()
        # (the failed last try of those devices, else why Redis did not answer)
        error = (unstored and self._last_error) or barrier_error
        return CloseReport(barrier_error is None and not unstored, unstored, error,
                           restart_mark=False)

    def _unstored(self):
        """Names (sorted) of the devices with changes Redis never took: writes kept
        after a failed call whose last try failed too, writes never sent, calls
        never answered. Connection writes do not count: once the lease expires,
        the survivors (or the next process to start) mark the device offline."""
        names = []
        for number in set(self._queues) | set(self._attempts):
            dev = self._by_number.get(number)
            if dev is None:
                continue                    # (removed: nothing to store)
            ops = list(self._queues.get(number, ()))
            attempt = self._attempts.get(number)
            if attempt is not None and self._busy.get(number) == "reply":
                ops += attempt.ops          # (sent, never answered)
            if any(op.kind in _CHANGES for op in ops):
                names.append(dev.name)
        return sorted(names)

    def _failed(self, failure, number, ops, base):
        self._last_error = failure.getErrorMessage()    # for the stop's report
        super()._failed(failure, number, ops, base)

    def reload(self):
        """Re-read the tokens (devices are kept current by the change stream).

        An answer to a read sent before this process added or revoked a
        token, or before another process's change was announced here, may
        predate that change; it is not applied, the tokens are read again
        (the writer thread sends in order, so the new read sees it). (Applied,
        it could make valid here a token added and revoked there meanwhile.)
        Once Redis lost data, the tokens here are kept (they are the replica's)."""
        if self._lost is not None:
            return defer.succeed(None)
        issued = self._token_changes

        def apply(rows):
            if issued != self._token_changes:
                return self.reload()
            self._tokens = TokenTable.from_rows(rows)
            self.counters["admin_token"] += 1
        return self._store.fetch_tokens().addCallback(apply)

    def _tokens_call(self, kind, *args):
        self._token_changes += 1
        return super()._tokens_call(kind, *args)

    def _tokens_changed(self):
        """Another process changed the tokens (its stream entry, or a catch-up
        that could not take the snapshot's): they are stale here until a
        re-read succeeds. A failed one is logged once and tried again on the
        retry timer, with its backoff (shared_retry.py), until one succeeds: a
        revoked token must not stay valid here."""
        self._tokens_stale += 1
        self._token_changes += 1    # a read in flight may predate it: not applied (reload)
        if not self._tokens_reading:
            self._read_tokens()

    def _read_tokens(self):
        self._tokens_reading = True
        wanted = self._tokens_stale

        def read(_):
            self._tokens_reading = False
            self._retry_delay = RETRY_DELAY     # Redis answers: retry rounds start over
            if self._tokens_failing:
                self._tokens_failing = False
                self.log.info("dashboard tokens read again from Redis")
            if self._tokens_stale != wanted:
                self._read_tokens()     # changed again since this read was sent
            else:
                self._tokens_stale = 0

        def failed(failure):
            failure.trap(errors.StoreError)
            self._tokens_reading = False
            self.counters["token_reload_failed"] += 1
            if not self._tokens_failing:
                self._tokens_failing = True
                self.log.warn("re-reading the dashboard tokens after another broker process "
                              "changed them failed: {error}; trying again (a token revoked "
                              "there stays valid here until then)",
                              error=failure.getErrorMessage())
            self._retry_tokens_later()

        self.reload().addCallbacks(read, failed).addErrback(
            lambda failure: self.log.failure("re-reading the tokens failed", failure))

    # -- relayed commands ----------------------------------------------------

    def relay_to(self, deliver):
        """Hand every command another process relays to ``deliver(number, command)``
        (on the reactor thread; it returns False when no session here holds the device)."""
        self._relay_target = deliver
        self._store.listen_commands(self._relayed)

    def relay_command(self, device_number, command):
        """Publish a frozen command for the process holding the device's session;
        a Deferred firing with how many processes received it."""
        payload = cbor2.dumps([device_number, self.origin, command])
        self.counters["command_relayed"] += 1
        return self._store.publish_command(payload)

    def _relayed(self, payload):
        try:
            number, origin, command = cbor2.loads(payload)
        except (cbor2.CBORError, TypeError, ValueError):
            self.counters["command_relay_damaged"] += 1
            self.log.warn("dropped a damaged relayed command")
            return
        if origin == self.origin or self._relay_target is None:
            return      # the sender already tried its own sessions
        if self._relay_target(number, thaw(command)):
            self.counters["command_relay_delivered"] += 1

    # -- reads ---------------------------------------------------------------

    def session_record(self, device_number):
        """The saved SessionRecord of a device, or None (another process's record
        arrives raw on the stream and is decoded here, when a session needs it)."""
        dev = self._by_number.get(device_number)
        if dev is None:
            return None
        record = dev.session
        if type(record) is bytes:
            # A damaged one raises StoreError, every time: a session must
            # never start over a record it cannot read (its sequence numbers).
            record = decode_record(record)
            dev.session = record
        return record

    def changes_since(self, cursor, limit=1000):
        """As DeviceRegistry.changes_since; a cursor another process handed out
        that this replica has not reached yet waits (empty batch) instead of a reset.

        Such a cursor is beyond the top of the sequence this process knows; it
        asks Redis for the top, and only a cursor still beyond the top Redis
        gave after the cursor came here (Redis lost data) gets the reset. A
        top read earlier proves nothing: the other process may have handed
        the cursor out since."""
        if cursor > self.cursor and (cursor <= self._top or cursor > self._top_checked):
            if cursor > self._top:
                self._refresh_top(cursor)
            return ChangeBatch([], cursor, False, False)
        return super().changes_since(cursor, limit)

    def _refresh_top(self, cursor):
        applied = self.cursor

        def learned(top):
            self._top = max(self._top, top)
            self._top_checked = max(self._top_checked, cursor)
            if top < applied:
                self._sequence_went_back(top, applied)
        self._store.top().addCallbacks(learned, lambda failure: None)

    def _note_progress(self):
        """Remember the cursor applied in the data directory when it is due (see
        ``progress_interval``); a failure is logged and tried again when next due."""
        if (not self._progress_interval or self._progress_busy or self._lost is not None
                or self._progress_due is None or self._clock.seconds() < self._progress_due):
            return
        self._progress_due = self._clock.seconds() + self._progress_interval
        self._progress_busy = True

        def failed(failure):
            failure.trap(errors.StoreError)
            self.log.warn("{error}", error=failure.getErrorMessage())

        def done(_):
            self._progress_busy = False
        self._store.remember_sequence(self.cursor).addErrback(failed).addBoth(done)

    # -- Redis lost data (module docstring) -----------------------------------

    def readiness(self):
        """None while this process can write, else why not (a ReadinessCheck for /readyz)."""
        return self._lost

    def _lost_error(self):
        return errors.StoreError(self._lost)

    def _check_sequence(self):
        """Deferred firing once Redis's change sequence was compared with the
        cursor applied here (behind it, Redis lost data), or failing if it could
        not be read: that proves nothing (callers go on either way)."""
        applied = self.cursor

        def compare(top):
            if top < applied:
                self._sequence_went_back(top, applied)
        return self._store.top().addCallback(compare)

    def _incarnation_lost(self, found):
        """Redis's data set marker is ``found`` (None: there is none), not the
        one this process loaded: Redis was emptied since (module docstring)."""
        store = self._store
        if found is None:
            what = (f"its data set marker {store.key_incarnation} is gone (this broker process "
                    f"loaded the data set marked {store.incarnation}): Redis restarted empty, "
                    "was flushed, or failed over to a replica without it")
        else:
            what = (f"its data set marker {store.key_incarnation} is {found}, not "
                    f"{store.incarnation} that this broker process loaded: Redis was emptied "
                    "and a new data set started since")
        self._redis_lost(what)

    def _sequence_went_back(self, sequence, applied):
        """Redis's sequence is at ``sequence``, below cursor ``applied`` this process had."""
        self._redis_lost(f"its change sequence is at {sequence}, behind cursor {applied} "
                         "this broker process already had")

    def _redis_lost(self, what):
        """Redis lost data (``what`` shows it): refuse every write from now on
        and fail those waiting (module docstring)."""
        if self._lost is not None:
            return
        self._lost = (f"Redis lost data: {what}; writes are refused. Restore Redis from its "
                      "persistence (AOF/RDB) or a backup, then restart every broker process "
                      "(docs/scaling.md, Redis losing data)")
        self.counters["redis_lost"] += 1
        self.log.critical("{reason}", reason=self._lost)
        self._store.refuse(self._lost)
        if self.presence is not None:
            self.presence.stop()
        if self._retry_call:
            self._retry_call.cancel()
            self._retry_call = None
        self._retrying.clear()
        self._ready.clear()
        queues, self._queues = self._queues, {}
        waiters, self._waiters = self._waiters, deque()
        for number in [n for n, busy in self._busy.items() if busy != "reply"]:
            del self._busy[number]     # (a call in flight is failed when it comes back)
        for queue in queues.values():
            for op in queue:
                d, op.d = op.d, None
                if d is not None:
                    d.errback(self._lost_error())
        for _, d, _ in waiters:
            d.errback(self._lost_error())


def open_shared_registry(options, *, reactor=None, clock=None, settings=None,
                         store_wrapper=None, origin=None, data_dir=None, **presence):
    """A SharedRegistry over Redis (``options``: a RedisOptions); raises StoreError
    (clear message) when Redis cannot be reached or holds damaged data.
    ``data_dir``: the broker's data directory, where the data set's marker is
    remembered; a Redis emptied since raises MarkerMismatch (redis_marker.py).
    ``presence``: lease_ttl, lease_check_interval, sequence_check_interval
    (SharedRegistry)."""
    from .redis_store import RedisStore
    from .settings import RegistrySettings
    if reactor is None:
        from twisted.internet import reactor
    store = RedisStore(options, reactor=reactor, data_dir=data_dir)
    wrapped = store if store_wrapper is None else store_wrapper(store)
    try:
        return SharedRegistry(wrapped, clock=clock or reactor,
                              settings=settings or RegistrySettings(), origin=origin, **presence)
    except BaseException:
        store.close()
        raise
