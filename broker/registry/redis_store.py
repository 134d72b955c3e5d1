"""The registry on Redis (one server or Redis Cluster), through redis-py's sync client.

Why threads and the sync client: the broker runs Twisted's epoll reactor,
and redis-py is the maintained client that speaks Redis Cluster (slot map,
MOVED, failover), TLS and ACL users. Its asyncio flavour would need the
asyncio reactor for the whole broker; txredisapi has no Cluster support.
So two threads do all Redis I/O: a writer that sends everything queued
as ONE pipeline (group commit: one round trip for every write of a
reactor turn, redis_writer.py) and a reader blocked in ``XREAD`` on the
change stream (redis_follow.py). The reactor thread never waits on Redis;
results come back through ``callFromThread``. Every process parses every
process's stream entries, so the C reply parser (hiredis, which redis-py
uses when installed) is a dependency of the redis extra.

This module ties those together behind the store interface, and keeps the
synchronous calls of loading and of broker-admin. Where the keys are and
how values are encoded: redis_layout.py; how to connect:
redis_connection.py.

The data set's marker (``{p}:incarnation``): loading (and broker-admin)
first adopts the marker Redis holds (read, not written), or sets a new one
if there is none (``ADOPT``: SET NX, so processes starting together on an
empty Redis, or on data written before markers existed, all take the
same). From then on every script and every answer of the writer and the
reader carry it; one that finds another marker, or none, reports
``IncarnationLost``: Redis lost the data this process loaded (shared.py).

A process STARTING on an emptied Redis cannot see the loss in Redis: with
a data directory, the marker adopted there is remembered, and a start that
finds none, or another one, is refused (``MarkerMismatch``, redis_marker.py)
before anything is written.
"""

from __future__ import annotations

import os
import threading

from twisted.internet import defer

from .database import decode_state, encode_state
from .errors import StoreError
from .redis_connection import Connector, RedisOptions, redacted
from .redis_follow import SEQUENCE_CHECK_INTERVAL, ChangeFollower, CommandListener
from .model import SessionRecord
from .redis_layout import RedisKeys, decode_record, decode_tokens, encode_record, marker_text
from .redis_marker import RememberedMarker
from .redis_scripts import ADOPT, SCRIPTS
from .redis_writer import IncarnationLost, PipelineWriter
from .store import DeviceRow, Loaded, Store

#: the calls that change nothing in the registry (``refuse`` lets them through).
_NOT_WRITES = ("barrier", "publish")
#: loads started again because the marker changed while one ran.
LOAD_ATTEMPTS = 3

#: RedisOptions stays importable from here for the broker's wiring.
__all__ = ["RedisOptions", "RedisStore"]


class RedisStore(RedisKeys, Store):
    """Registry storage in Redis; see the module docstring. Not a drop-in
    ``Store``: ``SharedRegistry`` drives it (scripts, the change stream).
    Its key names (RedisKeys) are attributes, for the callers that build
    script calls."""

    def __init__(self, options, *, reactor, connector=None, data_dir=None, record=True):
        self.options = options
        #: the marker the data directory remembers (None: no data directory).
        self.remembered = (None if data_dir is None
                           else RememberedMarker.for_options(data_dir, options))
        #: whether adopting records the marker in the data directory.
        self._record = record
        self._reactor = reactor
        import redis
        try:
            self._connector = connector or Connector(options)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"cannot reach Redis at {redacted(options.url)}: {e}") from None
        RedisKeys.__init__(self, self._connector.tag)
        self._main = self._connector.client()
        self._scripts = {name: self._main.register_script(text)
                         for name, text in SCRIPTS.items()}
        self._adopt = self._main.register_script(ADOPT)
        #: the data set's marker this process loaded (None until ``adopt``).
        self.incarnation = None
        self._on_lost = None
        self._writer = PipelineWriter(self._main, connector=self._connector,
                                      scripts=self._scripts, keys=self, options=options,
                                      reactor=reactor)
        self._closing = False
        self._refusal = None
        self._reader = None
        self._listener = None
        self._stop_reading = threading.Event()
        #: where the change stream stood when load() began.
        self.feed_start = "0-0"
        self._feed_start_entry = False     # whether an entry has that id
        #: token writes sent, and those not answered yet (see ``_snapshot``).
        self.token_writes = 0
        self._token_writes_open = 0

    @property
    def commits(self):
        """Pipelines sent (the benchmark reports them)."""
        return self._writer.commits

    @property
    def operations(self):
        """Calls made in those pipelines."""
        return self._writer.operations

    # -- loading (synchronous, at start) --------------------------------------

    def load(self):
        """Everything in Redis, plus the stream position to follow from (and the
        data set's marker, adopted first: module docstring)."""
        import redis
        try:
            for _ in range(LOAD_ATTEMPTS):
                if self.incarnation is None:
                    self.adopt()
                # The file before Redis: what another process of this data
                # directory records meanwhile is above what Redis holds now.
                seen = self._sequence_seen()
                loaded = self._load(self._main)
                # The marker after the data: they are of one data set.
                if marker_text(self._main.get(self.key_incarnation)) == self.incarnation:
                    self._check_sequence(loaded.sequence, seen)
                    return loaded
                self.incarnation = None
        except redis.RedisError as e:
            raise StoreError(f"cannot load the registry from Redis: {e}") from None
        raise StoreError("cannot load the registry from Redis: its data set was replaced "
                         f"{LOAD_ATTEMPTS} times while loading it")

    def adopt(self, *, deliberately=False):
        """Learn the data set's marker, setting a new one if Redis has none (an
        empty Redis, or data from before markers); returns it. Synchronous.

        A marker already there is read, not written: a script that may write is
        refused by a Redis at its memory limit, a read-only replica or a
        read-only ACL user, and a process must still start and serve reads
        there (as before markers existed).

        With a data directory, a marker other than the one it remembers, or
        none, raises MarkerMismatch before anything is written (module
        docstring), unless ``deliberately`` (``broker-admin redis adopt-new``);
        the marker adopted is remembered."""
        import redis
        # The file before Redis: a worker starting beside another that just set
        # the marker and recorded it reads that marker in Redis too (no race).
        remembered = None
        if self.remembered is not None and not deliberately:
            remembered = self.remembered.read()
        try:
            found = self._main.get(self.key_incarnation)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"cannot read the data set marker {self.key_incarnation} "
                             f"in Redis at {redacted(self.options.url)}: {e}") from None
        if remembered is not None:
            self.remembered.check(marker_text(found), self.key_incarnation, remembered)
        try:
            if not found:
                found = self._adopt(keys=[self.key_incarnation], args=[os.urandom(16).hex()],
                                    client=self._main)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"cannot adopt the data set marker {self.key_incarnation} "
                             f"in Redis: {e}") from None
        self.incarnation = marker_text(found)
        if self.remembered is not None and self._record and remembered != self.incarnation:
            self.remembered.record(self.incarnation)
        return self.incarnation

    def _sequence_seen(self):
        """The change sequence this data directory saw in the adopted data set
        (None: not checked, or never recorded)."""
        if self.remembered is None or not self._record:
            return None
        return self.remembered.sequence_seen(self.incarnation)

    def _check_sequence(self, sequence, seen):
        """Refuse an older copy of the data set this data directory served
        (OlderCopy: ``sequence``, Redis's, below ``seen``, read before it),
        else remember how far it has gone (redis_marker.py)."""
        if self.remembered is None or not self._record:
            return
        self.remembered.check_sequence(self.incarnation, sequence, seen, self.key_seq)
        self.remembered.raise_sequence(self.incarnation, sequence)

    def _remember_last_sequence(self):
        """At a clean close: the change sequence Redis holds now, remembered (a
        later start on a copy older than that is refused). Best effort: the
        start's record stands if Redis cannot be asked; nothing is recorded
        for a data set this process no longer serves."""
        import redis
        if (self.remembered is None or not self._record or self.incarnation is None
                or self._refusal is not None):
            return
        try:
            sequence = int(self._main.get(self.key_seq) or 0)
            # The marker after the sequence: both of the data set we served.
            if marker_text(self._main.get(self.key_incarnation)) == self.incarnation:
                self.remembered.raise_sequence(self.incarnation, sequence)
        except (redis.RedisError, OSError, ValueError, StoreError):
            pass

    def remember_sequence(self, sequence):
        """Deferred: ``sequence``, a change this process applied from Redis,
        remembered as seen in the data set (a thread of the reactor's pool: a
        file replace with fsync), so that a start on an older copy is refused
        even after a crash (docs/scaling.md). Fails with StoreError."""
        if (self.remembered is None or not self._record or self.incarnation is None
                or self._refusal is not None):
            return defer.succeed(None)
        from twisted.internet.threads import deferToThreadPool
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                 self.remembered.raise_sequence, self.incarnation, sequence)

    def _load(self, client):
        self.feed_start, self._feed_start_entry = self._feed_end(client)
        loaded = Loaded()
        loaded.sequence = int(client.get(self.key_seq) or 0)
        loaded.horizon = int(float(client.get(self.key_horizon) or 0))
        #: number -> the process Redis shows holding the device (shared_presence.py).
        loaded.holders = {}
        keys = [key for key in client.scan_iter(match=self.device_prefix + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            pipe = client.pipeline(transaction=False)
            chunk = keys[i:i + 1000]
            for key in chunk:
                pipe.hgetall(key)
            for key, fields in zip(chunk, pipe.execute()):
                if not fields or b"v" not in fields:
                    continue
                number = int(key.decode().rsplit(":", 1)[1])
                loaded.devices.append(DeviceRow(
                    number, fields[b"n"].decode(), bytes(fields[b"k"]), int(fields[b"v"]),
                    int(fields[b"c"]), decode_state(fields[b"s"])))
                if b"r" in fields:
                    loaded.sessions.append((number, decode_record(fields[b"r"])))
                if fields.get(b"h"):
                    loaded.holders[number] = fields[b"h"].decode()
        for member, score in client.zrange(self.key_tombs, 0, -1, withscores=True):
            number, version, name = member.decode().split(":", 2)
            loaded.tombstones.append((int(score), name, int(number), int(version)))
        loaded.tokens = decode_tokens(client.hgetall(self.key_tokens))
        return loaded

    def _feed_end(self, client):
        """``(id, whether an entry has it)``: the change stream's last entry, or
        the last id it gave if it is empty (trimmed to nothing: later cursors
        follow it, redis_follow.py), or "0-0" if there is no stream."""
        import redis
        last = client.xrevrange(self.key_feed, count=1)
        if last:
            return last[0][0].decode(), True
        try:
            info = client.xinfo_stream(self.key_feed)
        except redis.ResponseError:
            return "0-0", False     # no such key
        end = info.get("last-generated-id") or b"0-0"
        return (end.decode() if isinstance(end, bytes) else str(end)), False

    # -- tools (synchronous: broker-admin, never the reactor thread) -------------

    def run_now(self, script, keys, args):
        """Run one script now and wait for Redis (and the configured replicas);
        its reply ``(status, a, b)``. Raises StoreError (IncarnationLost when
        Redis no longer holds the data set adopted at the start)."""
        import redis
        if self.incarnation is None:
            self.adopt()
        try:
            reply = self._scripts[script](keys=[*keys, self.key_incarnation],
                                          args=[*args, self.incarnation], client=self._main)
            if reply[0] == b"lost":
                raise IncarnationLost(marker_text(reply[1]))
            if self.options.wait_replicas:
                acked = self._main.execute_command("WAIT", self.options.wait_replicas,
                                                   int(self.options.wait_timeout * 1000))
                if acked < self.options.wait_replicas:
                    raise StoreError(f"only {acked} of {self.options.wait_replicas} replicas "
                                     "acknowledged in time")
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"Redis failed: {e}") from None
        return reply[0].decode(), int(reply[1]), int(reply[2])

    def read_now(self, command, *args):
        """One read command on the main connection, now (tools); raises StoreError."""
        import redis
        try:
            return getattr(self._main, command)(*args)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"Redis failed: {e}") from None

    def _rewrite_devices_now(self, fields, rewrite, batch):
        """For every device, ``rewrite(values of fields)``: the fields to set, or
        None; ``batch`` devices a round trip (tools, with the brokers stopped:
        plain writes, no script). Returns how many devices were rewritten."""
        import redis
        count = 0
        try:
            numbers = [int(n) for n in self._main.hvals(self.keys_names)]
            for start in range(0, len(numbers), batch):
                chunk = numbers[start:start + batch]
                reads = self._main.pipeline(transaction=False)
                for number in chunk:
                    reads.hmget(self.device_key(number), *fields)
                writes = self._main.pipeline(transaction=False)
                for number, values in zip(chunk, reads.execute()):
                    mapping = rewrite(*values)
                    if mapping:
                        writes.hset(self.device_key(number), mapping=mapping)
                        count += 1
                writes.execute()
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"Redis failed: {e}") from None
        return count

    def retire_sessions_now(self, batch=1000):
        """Retire every device's session record (broker-admin redis restored:
        SessionRecord.retired); returns how many."""
        def retire(raw):
            if raw is None:
                return None
            try:
                session_id = decode_record(raw).session_id
            except StoreError:
                return None     # unreadable: no session is ever started over it
            return {"r": encode_record(SessionRecord.retired(session_id)),
                    "ri": f"{session_id:016x}", "rr": f"{0:016x}"}
        return self._rewrite_devices_now(("r",), retire, batch)

    def raise_versions_now(self, floor, batch=1000):
        """Raise every device's version to ``floor`` at least (broker-admin redis
        restored: the versions clients saw after the copy was taken must never
        name another state); returns how many. The history entries whose
        cursor the writer left to the reader (0) get it first, from the stored
        version and cursor, which the raised version no longer tells."""
        def raise_version(version, cursor, blob):
            if version is None or blob is None or int(version) >= floor:
                return None
            state = decode_state(blob)
            history = state[11].with_cursors(int(version), int(cursor))
            return {"v": floor, "s": encode_state(state[:11] + (history,))}
        return self._rewrite_devices_now(("v", "c", "s"), raise_version, batch)

    def tokens_now(self):
        """Every token row ``(token_id, digest, role, created_at)``, now (tools)."""
        import redis
        try:
            return decode_tokens(self._main.hgetall(self.key_tokens))
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"Redis failed: {e}") from None

    # -- writes (called on the reactor thread) --------------------------------

    def call(self, script, keys, args):
        """Queue one script call; Deferred firing with its reply ``[status, a, b]``."""
        if self._closing:
            return defer.fail(StoreError("the registry store is closed"))
        if self._refusal is not None and script not in _NOT_WRITES:
            return defer.fail(StoreError(self._refusal))
        return self._submit(script, keys, args)

    def _submit(self, script, keys, args):
        return self._writer.submit(script, keys, args).addErrback(self._lost)

    def _lost(self, failure):
        """An answer showed another data set (IncarnationLost): tell the
        registry (``on_incarnation_lost``) and fail with its refusal."""
        failure.trap(IncarnationLost)
        if self._on_lost is not None:
            self._on_lost(failure.value.found)
        if self._refusal is not None:
            raise StoreError(self._refusal)
        return failure

    def on_incarnation_lost(self, callback):
        """Call ``callback(marker found or None)`` on the reactor thread when an
        answer from Redis shows the data set this process loaded is gone."""
        self._on_lost = callback

    def refuse(self, reason):
        """Fail every later script call with StoreError(``reason``): Redis lost
        data this process had (shared.py); reads and relayed commands go on."""
        self._refusal = reason

    def write(self, op, result=None):
        """Queue ``(kind, script, keys, args)``: ``call`` under a write kind
        (state, session, add, remove, secret, token_add, token_del) that store
        wrappers count. Fires with the script's reply (``result`` is unused)."""
        _, script, keys, args = op
        if script != "tokens":
            return self.call(script, keys, args)
        self._token_writes_open += 1     # first: see _snapshot
        self.token_writes += 1
        return self.call(script, keys, args).addBoth(self._token_written)

    def _token_written(self, result):
        self._token_writes_open -= 1
        return result

    def fetch_tokens(self):
        return self._submit(None, None, None)

    def top(self):
        """Deferred: the global change sequence now in Redis (after every queued write)."""
        return self.call("barrier", None, None)

    def publish_command(self, payload):
        """Queue a PUBLISH of ``payload`` on the command channel; Deferred
        firing with how many processes received it."""
        return self.call("publish", None, payload)

    def barrier(self, result=None):
        return self.top().addCallback(lambda _: result)

    def close(self):
        """Send what is queued, stop the threads; a Deferred."""
        self._closing = True
        self._stop_reading.set()
        self._writer.stop()
        threads = [t for t in (self._writer.thread, self._reader, self._listener)
                   if t is not None]

        def join():
            for thread in threads:
                thread.join(10)
            self._remember_last_sequence()
            self._connector.close()
        from twisted.internet.threads import deferToThreadPool
        if not threads:
            self._connector.close()
            return defer.succeed(None)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), join)

    # -- following Redis (threads of redis_follow.py) ---------------------------

    def follow(self, after, deliver, *, check_interval=SEQUENCE_CHECK_INTERVAL):
        """Call ``deliver(entries)`` on the reactor thread with every stream
        entry after id ``after`` (parsed in the reader thread; states and
        records stay raw, see ``redis_layout.decode_entry``); after entries
        trimmed unread, ``("g", Loaded)`` first; ``("lost", sequence, cursor)``
        if Redis's sequence went back below a cursor read, checked at most every
        ``check_interval`` seconds while the stream is quiet; ``("gone", marker)``
        if the data set's marker is no longer the one loaded, checked with every
        read (redis_follow.py)."""
        self._reader = ChangeFollower(self._connector, self.key_feed, reactor=self._reactor,
                                      stop=self._stop_reading, load=self._snapshot,
                                      key_seq=self.key_seq, check_interval=check_interval,
                                      marker=(self.key_incarnation, self.incarnation)
                                      ).start(after, deliver,
                                              entry=self._feed_start_entry)

    def _snapshot(self, client):
        """Everything in Redis now (the reader thread, after a stream gap).

        Its ``token_writes`` is the count of this process's token writes it
        holds, all of them answered before it was read; None if one was on
        its way (the snapshot may or may not hold it). The registry takes the
        snapshot's tokens only if that is still the count (shared_stream.py)."""
        start = self.feed_start, self._feed_start_entry
        # Counters of the reactor thread, read before Redis (in the opposite
        # order to write's): none open means every write counted was answered
        # before the snapshot; a later one shows in the count.
        sent, open_ = self.token_writes, self._token_writes_open
        try:
            loaded = self._load(client)
        finally:
            self.feed_start, self._feed_start_entry = start
        loaded.token_writes = None if open_ else sent
        return loaded

    def listen_commands(self, deliver):
        """Call ``deliver(payload)`` on the reactor thread with every message
        published on the command channel (a thread blocked in the subscription)."""
        if self._listener is None and not self._closing:
            self._listener = CommandListener(self._connector, self.key_commands,
                                             reactor=self._reactor,
                                             stop=self._stop_reading).start(deliver)
