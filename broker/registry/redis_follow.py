"""The threads that listen to Redis for the reactor: changes and relayed commands.

Each blocks in Redis (``XREAD`` on the change stream, a pub/sub
subscription on the command channel) so the reactor never does, and hands
what arrives to the reactor thread with ``callFromThread``. Stream entries
are parsed here, off the reactor: every process reads every process's
changes. After an error they reconnect, pausing longer each time.

Entries trimmed (MAXLEN) before this process read them (it was cut off
from Redis, or fell behind, for longer than the stream holds) are a gap.
Two things show one. A change's entry has the id ``<cursor>-<n>``, so an
entry whose cursor is more than one above the last one read. But entries
that take no cursor of their own (a token change, a key rotation, a
session record alone: ``<top>-<n>``, after the change at the top) leave
no hole in the cursors; so every XREAD is pipelined with a read of the
stream's first id (``FIRST_ID``: the id only, not the entry): a stream that
now starts after the last entry read (that entry is gone) may have lost
entries after it too, unless the first entry read is the very next id
(``<same top>-<n + 1>``). Either way the follower reads the registry again
(the snapshot ``load(client)`` gives) and hands it over as an entry
``("g", loaded)`` before the ones after the gap. (A reader whose last
entry was trimmed at the very edge may have lost nothing: it catches up
all the same. Before the first entry read, a stream that did not exist at
load time, or was empty then, has nothing to compare: there only the
cursors tell.)

If Redis loses its data (restarted without persistence, FLUSHALL, failed
over to an empty or older replica), its sequence starts again below the
last entry read. Two checks catch it, each handing over one entry (once)
for the registry to refuse writes (shared.py), and the follower stops:

* every XREAD is pipelined with a read of the data set's marker (after it,
  so the entries read are of the data set the marker names): a marker that
  is missing or another one than the process loaded hands over
  ``("gone", marker)`` instead of the entries. This catches an emptied
  Redis at once, even after other processes' writes took the new
  sequence past the last entry read (XREAD would then bring their entries
  as if nothing had happened);
* while XREAD finds nothing, at most every ``check_interval`` seconds, the
  sequence (and the marker) are read; a sequence below the last cursor
  read hands over ``("lost", sequence, last cursor read)``. This catches
  an older copy of the same data set (a restored snapshot, an older
  replica), whose marker is the same.
"""

from __future__ import annotations

import threading
import time

from twisted.logger import Logger

from .errors import StoreError
from .redis_layout import decode_entry, marker_text
from .redis_scripts import FIRST_ID

#: seconds a listener blocks in Redis before it checks whether to stop.
READ_BLOCK = 0.5
#: stream entries taken per XREAD.
READ_COUNT = 2000
#: batches handed to the reactor and not yet taken, at most: while the
#: reactor is busy, later entries wait in Redis, not in this process's
#: memory; a few keep the reader reading while the reactor applies one.
MAX_BATCHES_WAITING = 4
#: seconds between two reads of Redis's change sequence while the stream is
#: quiet (is it behind the last entry read? Redis lost data).
SEQUENCE_CHECK_INTERVAL = 5.0


class _Gone(Exception):
    """The data set's marker is not the one loaded (``args[0]``: the one found)."""


class ChangeFollower:
    """Reads the change stream ``key_feed`` until the event ``stop`` is set.

    ``marker``: (key, value) of the data set's marker the process loaded, or
    None (no check)."""

    log = Logger()

    def __init__(self, connector, key_feed, *, reactor, stop, load=None, key_seq=None,
                 check_interval=SEQUENCE_CHECK_INTERVAL, marker=None):
        self._connector = connector
        self._marker = marker
        self._key_feed = key_feed
        self._key_seq = key_seq
        self._check_interval = check_interval
        self._reactor = reactor
        self._stop = stop
        self._load = load

    def start(self, after, deliver, entry=True):
        """Start the thread calling ``deliver(entries)`` on the reactor thread
        with every entry after id ``after`` (see ``decode_entry``); returns it.
        ``entry``: whether an entry has id ``after`` (False: the stream was
        empty, and its being gone proves nothing)."""
        thread = threading.Thread(target=self._loop, args=(after, deliver, entry),
                                  name="registry-redis-reader", daemon=True)
        thread.start()
        return thread

    def _loop(self, after, deliver, entry):
        import redis
        client = self._connector.client()
        last = after
        seen = _cursor(after)
        pause = 0.05
        waiting = threading.BoundedSemaphore(MAX_BATCHES_WAITING)
        checked = time.monotonic()
        checking = self._key_seq is not None
        while not self._stop.is_set():
            try:
                found, first = self._read(client, last)
                pause = 0.05
                if not found:
                    if checking and time.monotonic() - checked >= self._check_interval:
                        checked = time.monotonic()
                        if self._sequence_lost(client, seen, deliver, waiting):
                            break
                    continue
                raw = found[0][1]
                entries, top = self._entries(client, raw, seen,
                                             entry and _trimmed(last, first, raw[0][0]))
            except _Gone as gone:
                self._hand(deliver, [("gone", gone.args[0])], waiting)
                break
            except (redis.RedisError, OSError) as e:
                self.log.warn("reading the Redis change stream failed: {error}", error=str(e))
                try:
                    self._connector.refresh()
                    client, old = self._connector.client(), client
                    self._connector.discard(old)
                except (redis.RedisError, OSError):
                    pass
                self._stop.wait(pause)
                pause = min(2.0, pause * 2)
                continue
            except StoreError as e:
                # Read the same entries again after the pause.
                self.log.warn("reading the registry after a change-stream gap failed: "
                              "{error}", error=str(e))
                self._stop.wait(pause)
                pause = min(2.0, pause * 2)
                continue
            last, seen, entry = raw[-1][0], top, True
            self._hand(deliver, entries, waiting)
        client.close()

    def _read(self, client, last):
        """XREAD after ``last`` (blocking up to READ_BLOCK), then the stream's
        first id and the marker, in the same round trip: ``(found, first id or
        None)``; raises _Gone if the marker is not ours."""
        pipe = client.pipeline(transaction=False)
        pipe.xread({self._key_feed: last}, count=READ_COUNT, block=int(READ_BLOCK * 1000))
        pipe.eval(FIRST_ID, 1, self._key_feed)
        if self._marker is not None:
            pipe.get(self._marker[0])
        replies = pipe.execute()
        if self._marker is not None:
            self._same_marker(replies[2])
        return replies[0], replies[1]

    def _same_marker(self, value):
        """Raise _Gone unless ``value`` (the marker as Redis answered) is ours."""
        if self._marker is not None:
            found = marker_text(value)
            if found != self._marker[1]:
                raise _Gone(found)

    def _hand(self, deliver, entries, waiting):
        """Hand ``entries`` to the reactor once fewer than MAX_BATCHES_WAITING wait."""
        while not waiting.acquire(timeout=READ_BLOCK):
            if self._stop.is_set():
                return
        self._reactor.callFromThread(_hand_over, deliver, entries, waiting)

    def _sequence_lost(self, client, seen, deliver, waiting):
        """Whether Redis's change sequence is behind cursor ``seen`` (already
        read): then it lost data, and the registry is told (module docstring).
        Raises _Gone if the marker read with it is not ours."""
        import redis
        keys = [self._key_seq] if self._marker is None else [self._key_seq, self._marker[0]]
        try:
            values = client.mget(keys)
            sequence = int(values[0] or 0)
        except (redis.RedisError, OSError, ValueError) as e:
            self.log.warn("reading the Redis change sequence failed: {error}", error=str(e))
            return False
        if self._marker is not None:
            self._same_marker(values[1])
        if sequence >= seen:
            return False
        self._hand(deliver, [("lost", sequence, seen)], waiting)
        return True

    def _entries(self, client, raw, seen, trimmed=False):
        """The decoded entries of ``raw`` (a snapshot first where entries are
        missing: cursors skipped, or ``trimmed`` before the first one), and the
        highest cursor among them."""
        entries = []
        for entry_id, fields in raw:
            cursor = _cursor(entry_id)
            if (trimmed or cursor > seen + 1) and self._load is not None:
                self.log.warn("change-stream entries after cursor {seen} were trimmed "
                              "before this process read them: reading the registry again",
                              seen=seen)
                loaded = self._load(client)
                self._same_marker(client.get(self._marker[0]) if self._marker else None)
                entries.append(("g", loaded))
            trimmed = False
            seen = max(seen, cursor)
            try:
                entries.append(decode_entry(fields))
            except (StoreError, KeyError, ValueError) as e:
                self.log.error("damaged change-stream entry {id}: {error}",
                               id=entry_id, error=str(e))
        return entries, seen


def _hand_over(deliver, entries, waiting):
    try:
        deliver(entries)
    finally:
        waiting.release()


def _cursor(entry_id):
    """The cursor part of a stream entry id (bytes or str ``<cursor>-<n>``)."""
    return _id(entry_id)[0]


def _id(entry_id):
    """A stream entry id (bytes or str ``<cursor>-<n>``) as ``(cursor, n)``."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    cursor, _, n = entry_id.partition("-")
    return int(cursor), int(n or 0)


def _trimmed(last, first, head):
    """Whether entries after id ``last`` may have been trimmed unread: the
    stream now starts after it (``first``, None if empty) and ``head``, the
    first entry the read brought, is not the next id (module docstring)."""
    last = _id(last)
    if last == (0, 0) or (first is not None and _id(first) <= last):
        return False
    return _id(head) != (last[0], last[1] + 1)


class CommandListener:
    """Receives the command channel ``channel`` until the event ``stop`` is set."""

    log = Logger()

    def __init__(self, connector, channel, *, reactor, stop):
        self._connector = connector
        self._channel = channel
        self._reactor = reactor
        self._stop = stop

    def start(self, deliver):
        """Start the thread calling ``deliver(payload)`` on the reactor thread
        with every message published on the channel; returns it."""
        thread = threading.Thread(target=self._loop, args=(deliver,),
                                  name="registry-redis-commands", daemon=True)
        thread.start()
        return thread

    def _loop(self, deliver):
        import redis
        pause = 0.05
        pubsub = client = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    if client is not None:
                        self._connector.discard(client)
                    client = self._connector.client()
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self._channel)
                message = pubsub.get_message(timeout=READ_BLOCK)
                pause = 0.05
            except (redis.RedisError, OSError) as e:
                self.log.warn("listening for relayed commands failed: {error}", error=str(e))
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                self._stop.wait(pause)
                pause = min(2.0, pause * 2)
                continue
            if message is not None and message.get("type") == "message":
                self._reactor.callFromThread(deliver, bytes(message["data"]))
        if pubsub is not None:
            pubsub.close()
