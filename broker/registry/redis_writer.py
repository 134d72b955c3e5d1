"""The writer thread of the Redis store: group commit off the reactor.

Everything the reactor queues is sent by one thread as ONE pipeline (one
round trip for every write of a reactor turn), so the reactor never
waits on Redis; the replies come back to it through ``callFromThread``.

Every script call gets the data set's marker appended (its key to KEYS,
the marker this process loaded to ARGV, see redis_scripts.CHECK), and the
reads that answer for the registry (the sequence, the tokens) read the
marker with them: an answer from a Redis that lost the data this process
has fails with ``IncarnationLost``, never passes for a normal one.

With ``redis_wait_replicas`` the pipeline ends with a ``WAIT``, and its
verdict (too few replicas in time) fails only the items whose durability
it stands for: the scripts that change the registry (``DURABLE``), with
``NotReplicated`` carrying the script's reply (it ran: the registry must
not take the failure for "nothing applied", shared_retry.py). A
PUBLISH was delivered whatever the replicas did (failing it would make the
sender relay the command again, delivered twice), and reads (the tokens,
the sequence) and the presence lease's scripts are answered from their
own replies. A pipeline without such a write sends no WAIT.
"""

from __future__ import annotations

import threading
from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import StoreError
from .redis_layout import decode_tokens, marker_text

#: seconds the idle writer sleeps before it checks whether to stop.
IDLE_WAIT = 0.5
#: the scripts that change the registry: the only items that ``WAIT``'s
#: verdict fails (module docstring). The lease scripts are not among them: a
#: lease lost with a failed-over primary is renewed at the next check.
DURABLE = frozenset({"change", "add", "remove", "secret", "tokens", "restored"})


class IncarnationLost(StoreError):
    """Redis's data set marker is not the one this process loaded (``found``:
    the marker there, None if there is none): Redis lost data (shared.py)."""

    def __init__(self, found):
        self.found = found
        super().__init__("Redis lost data: its data set marker is "
                         + ("gone" if found is None else f"now {found}"))


class NotReplicated(StoreError):
    """A script Redis ran, but that fewer replicas than ``redis_wait_replicas``
    acknowledged in time (a failover may lose it): ``reply`` is its decoded
    reply, which says what it did."""

    def __init__(self, message, reply):
        super().__init__(message)
        self.reply = reply


class PipelineWriter:
    """Queues script calls from the reactor and sends them from its own thread.

    An item is ``(script, keys, args)``; besides the names in ``scripts``,
    ``None`` reads the tokens, ``"barrier"`` the change sequence and
    ``"publish"`` publishes ``args`` on the command channel. ``keys`` is a
    RedisKeys. The thread starts on first use and ends after ``stop()``,
    once the queue is empty.
    """

    log = Logger()

    def __init__(self, client, *, connector, scripts, keys, options, reactor):
        self._client = client
        self._connector = connector
        self._scripts = scripts
        self._keys = keys
        self._options = options
        self._reactor = reactor
        self._queue = deque()
        self._wake = threading.Event()
        self._closing = False
        self.thread = None
        #: pipelines sent and calls made (the benchmark reports them).
        self.commits = 0
        self.operations = 0

    def submit(self, script, keys, args):
        """Queue one item; a Deferred firing with its decoded reply."""
        d = defer.Deferred()
        self._queue.append((script, keys, args, d))
        self._wake.set()
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="registry-redis-writer",
                                           daemon=True)
            self.thread.start()
        return d

    def stop(self):
        """Let the thread end once everything queued has been sent."""
        self._closing = True
        self._wake.set()

    def _loop(self):
        import redis
        client = self._client
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._wake.wait(IDLE_WAIT)
                self._wake.clear()
                continue
            batch = [queue.popleft() for _ in range(len(queue))]
            try:
                outcomes = self._send(client, batch)
            except Exception as e:
                # Last resort, on purpose broad: if this thread died, every
                # later write would wait forever. Fail this batch loudly instead.
                self.log.error("Redis pipeline of {count} calls failed: {error}",
                               count=len(batch), error=str(e))
                try:
                    self._connector.refresh()
                except (redis.RedisError, OSError):
                    pass
                failure = Failure(StoreError(f"Redis failed: {e}"))
                outcomes = [(item[3], failure) for item in batch]
            self._reactor.callFromThread(_fire, outcomes)

    def _send(self, client, batch):
        import redis
        options = self._options
        keys_ = self._keys
        marker_key, marker = keys_.key_incarnation, keys_.incarnation
        pipe = client.pipeline(transaction=False)
        slots = []
        for script, keys, args, _ in batch:
            if script is None:
                # The marker after the tokens: it was there when they were read.
                pipe.hgetall(keys_.key_tokens)
                pipe.get(marker_key)
                slots.append("fetch_tokens")
            elif script == "barrier":
                pipe.mget(keys_.key_seq, marker_key)
                slots.append("barrier")
            elif script == "publish":
                pipe.publish(keys_.key_commands, args)
                slots.append("publish")
            else:
                self._scripts[script](keys=[*keys, marker_key], args=[*args, marker],
                                      client=pipe)
                slots.append(script)
        waiting = options.wait_replicas and any(kind in DURABLE for kind in slots)
        if waiting:
            pipe.execute_command("WAIT", options.wait_replicas,
                                 int(options.wait_timeout * 1000))
        replies = pipe.execute(raise_on_error=False)
        self.commits += 1
        self.operations += len(batch)
        problem = None
        if waiting:
            acked = replies.pop()
            if isinstance(acked, Exception) or acked < options.wait_replicas:
                problem = (f"only {acked} of {options.wait_replicas} replicas "
                           "acknowledged in time")
        outcomes = []
        replies = iter(replies)
        for (script, _, _, d), kind in zip(batch, slots):
            reply = next(replies)
            tagged = next(replies) if kind == "fetch_tokens" else None
            failed = [r for r in (reply, tagged) if isinstance(r, Exception)]
            for error in failed:
                if isinstance(error, redis.ConnectionError):
                    raise error
            if failed:
                outcomes.append((d, Failure(StoreError(f"Redis refused {kind}: {failed[0]}"))))
                continue
            # The marker each answer came with (a script compared it itself).
            if kind == "fetch_tokens":
                found = marker_text(tagged)
            elif kind == "barrier":
                reply, found = reply[0], marker_text(reply[1])
            elif kind != "publish" and reply[0] == b"lost":
                found = marker_text(reply[1])
            else:
                found = marker
            if found != marker:
                outcomes.append((d, Failure(IncarnationLost(found))))
            elif problem is not None and kind in DURABLE:
                outcomes.append((d, Failure(NotReplicated(problem, _decoded(kind, reply)))))
            else:
                outcomes.append((d, _decoded(kind, reply)))
        return outcomes


def _decoded(kind, reply):
    """The reply of one call, as the registry takes it."""
    if kind == "fetch_tokens":
        return decode_tokens(reply)
    if kind in ("barrier", "publish"):
        return int(reply or 0)
    if kind == "lease":
        return reply[0].decode(), int(reply[1]), [h.decode() for h in reply[2]]
    if kind == "expired":
        out = reply[1]
        return [(out[i].decode(), [int(n) for n in out[i + 1]]) for i in range(0, len(out), 2)]
    if kind == "held":
        return [int(n) for n in reply[1]]
    if len(reply) > 3:
        # A change whose session record was refused: the record Redis holds.
        return reply[0].decode(), int(reply[1]), int(reply[2]), bytes(reply[3])
    return reply[0].decode(), int(reply[1]), int(reply[2])


def _fire(outcomes):
    for d, outcome in outcomes:
        if isinstance(outcome, Failure):
            d.errback(outcome)
        else:
            d.callback(outcome)
