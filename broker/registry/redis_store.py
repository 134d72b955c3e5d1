"""The registry on Redis (one server or Redis Cluster), through redis-py's sync client.

Why threads and the sync client: the broker runs Twisted's epoll reactor,
and redis-py is the maintained client that speaks Redis Cluster (slot map,
MOVED, failover), TLS and ACL users. Its asyncio flavour would need the
asyncio reactor for the whole broker; txredisapi has no Cluster support.
So two threads do all Redis I/O: a writer that sends everything queued
as ONE pipeline (group commit: one round trip for every write of a
reactor turn) and a reader blocked in ``XREAD`` on the change stream. The
reactor thread never waits on Redis; results come back through
``callFromThread``. Every process parses every process's stream entries,
so the C reply parser (hiredis, which redis-py uses when installed) is a
dependency of the redis extra.

Key layout (``{p}`` is the hash tag, ``key_prefix`` in braces). Every key
of one registry carries the same tag, so it lives in one Cluster slot:

* ``{p}:d:<number>``  hash: v (version), c (cursor), n (name), k (secret),
  s (state, the SQLite store's CBOR), r (SSP session record)
* ``{p}:names`` hash name -> number (unique names)
* ``{p}:seq`` the global change sequence (the registry cursor)
* ``{p}:feed`` stream of changes, entry id ``<cursor>-<n>``
* ``{p}:tombs`` sorted set of removed devices, ``{p}:horizon``
* ``{p}:tokens`` hash token_id -> CBOR [digest, role, created_at]
* ``{p}:cmd`` pub/sub channel of relayed commands, CBOR [number, origin,
  command] (commands live in memory only, so pub/sub, not a stream)
* presence (shared_presence.py): ``{p}:lease:<origin>`` a process's lease
  (expires unless renewed), ``{p}:holders`` set of processes with a lease,
  ``{p}:held:<origin>`` set of the devices a process holds; field h of a
  device hash names its holder

A change is one Lua script: check the device's version, take the next
cursor(s) with INCR, store the new state and append it to the stream, all
atomically. One slot is what makes that possible on Cluster, where a
script may only touch keys of one slot; docs/scaling.md says what that
costs and why the cursor needs it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import cbor2
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .database import decode_state
from .errors import StoreError
from .model import SessionRecord
from .redis_scripts import ADD, CHANGE, EXPIRED, LEASE, REMOVE, SECRET, TOKENS
from .store import DeviceRow, Loaded, Store
from .values import thaw

#: seconds the reader blocks in XREAD before it checks whether to stop.
READ_BLOCK = 0.5
#: stream entries taken per XREAD.
READ_COUNT = 2000

@dataclass(frozen=True)
class RedisOptions:
    """How to reach Redis (the ``redis_*`` settings of ``[registry]``)."""

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    key_prefix: str = "ssp"
    username: str = ""
    password_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    wait_replicas: int = 0
    wait_timeout: float = 1.0
    stream_length: int = 100_000
    timeout: float = 5.0


def encode_record(record):
    # Records written before remote_seq existed have six items; they decode
    # with its default.
    return cbor2.dumps([record.session_id, record.acked_remote_num, record.acked_remote_state,
                        record.local_num, record.local_state, record.seq_reservation,
                        record.remote_seq])


def decode_record(blob):
    try:
        return SessionRecord(*cbor2.loads(blob))
    except (cbor2.CBORError, TypeError, ValueError) as e:
        raise StoreError(f"damaged session record in Redis: {e}") from None


def _client_options(options):
    kwargs = {"socket_timeout": None, "socket_connect_timeout": options.timeout,
              "health_check_interval": 30}
    if options.username:
        kwargs["username"] = options.username
    if options.password_file:
        with open(options.password_file, encoding="utf-8") as handle:
            kwargs["password"] = handle.read().strip()
    if options.tls_ca_file or options.tls_cert_file:
        kwargs["ssl_ca_certs"] = options.tls_ca_file or None
        kwargs["ssl_certfile"] = options.tls_cert_file or None
        kwargs["ssl_keyfile"] = options.tls_key_file or None
        if not options.url.startswith("rediss://"):
            kwargs["ssl"] = True
    return kwargs


class Connector:
    """Gives a plain redis-py client talking to the primary that holds our slot.

    On one server that is the server. On Cluster, every key has our hash
    tag, so one node holds them all; after a failover or a moved slot
    (MOVED, connection refused) ``refresh()`` asks the cluster again.
    """

    def __init__(self, options):
        import redis
        self.options = options
        self.tag = "{" + options.key_prefix + "}"
        kwargs = _client_options(options)
        if options.cluster:
            from redis.cluster import RedisCluster
            self._cluster = RedisCluster.from_url(options.url, **kwargs)
        else:
            self._cluster = None
            self._kwargs = kwargs
            self._redis = redis
        self._clients = []

    def client(self):
        """A new connection (each thread keeps its own)."""
        if self._cluster is None:
            client = self._redis.Redis.from_url(self.options.url, **self._kwargs)
        else:
            node = self._cluster.get_node_from_key(self.tag)
            pool = self._cluster.get_redis_connection(node).connection_pool
            import redis
            client = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **pool.connection_kwargs))
        self._clients.append(client)
        return client

    def refresh(self):
        if self._cluster is not None:
            self._cluster.nodes_manager.initialize()

    def close(self):
        for client in self._clients:
            client.close()
        if self._cluster is not None:
            self._cluster.close()


class RedisStore(Store):
    """Registry storage in Redis; see the module docstring. Not a drop-in
    ``Store``: ``SharedRegistry`` drives it (scripts, the change stream)."""

    log = Logger()

    def __init__(self, options, *, reactor, connector=None):
        self.options = options
        self._reactor = reactor
        import redis
        try:
            self._connector = connector or Connector(options)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"cannot reach Redis at {options.url}: {e}") from None
        tag = self._connector.tag
        self.keys_names = f"{tag}:names"
        self.key_seq = f"{tag}:seq"
        self.key_feed = f"{tag}:feed"
        self.key_tombs = f"{tag}:tombs"
        self.key_horizon = f"{tag}:horizon"
        self.key_tokens = f"{tag}:tokens"
        self.key_commands = f"{tag}:cmd"
        self._device_prefix = f"{tag}:d:"
        self.key_holders = f"{tag}:holders"
        self.lease_prefix = f"{tag}:lease:"
        self.held_prefix = f"{tag}:held:"
        self._main = self._connector.client()
        self._scripts = {name: self._main.register_script(text) for name, text in
                         (("change", CHANGE), ("add", ADD), ("remove", REMOVE),
                          ("secret", SECRET), ("tokens", TOKENS), ("lease", LEASE),
                          ("expired", EXPIRED))}
        self._queue = deque()
        self._wake = threading.Event()
        self._closing = False
        self._writer = None
        self._reader = None
        self._listener = None
        self._stop_reading = threading.Event()
        #: pipelines sent and calls made (the benchmark reports them).
        self.commits = 0
        self.operations = 0
        #: where the change stream stood when load() began.
        self.feed_start = "0-0"

    def device_key(self, number):
        return f"{self._device_prefix}{number}"

    @property
    def device_prefix(self):
        return self._device_prefix

    # -- loading (synchronous, at start) --------------------------------------

    def load(self):
        """Everything in Redis, plus the stream position to follow from."""
        import redis
        try:
            return self._load(self._main)
        except redis.RedisError as e:
            raise StoreError(f"cannot load the registry from Redis: {e}") from None

    def _load(self, client):
        last = client.xrevrange(self.key_feed, count=1)
        self.feed_start = last[0][0].decode() if last else "0-0"
        loaded = Loaded()
        loaded.sequence = int(client.get(self.key_seq) or 0)
        loaded.horizon = int(float(client.get(self.key_horizon) or 0))
        keys = [key for key in client.scan_iter(match=self._device_prefix + "*", count=1000)]
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
        for member, score in client.zrange(self.key_tombs, 0, -1, withscores=True):
            number, version, name = member.decode().split(":", 2)
            loaded.tombstones.append((int(score), name, int(number), int(version)))
        loaded.tokens = self._tokens(client)
        return loaded

    # -- tools (synchronous: broker-admin, never the reactor thread) -------------

    def run_now(self, script, keys, args):
        """Run one script now and wait for Redis (and the configured replicas);
        its reply ``(status, a, b)``. Raises StoreError."""
        import redis
        try:
            reply = self._scripts[script](keys=keys, args=args, client=self._main)
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

    def tokens_now(self):
        """Every token row ``(token_id, digest, role, created_at)``, now (tools)."""
        import redis
        try:
            return self._tokens(self._main)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"Redis failed: {e}") from None

    def _tokens(self, client):
        rows = []
        for token_id, blob in client.hgetall(self.key_tokens).items():
            digest, role, created = cbor2.loads(blob)
            rows.append((token_id.decode(), bytes(digest), role, created))
        return rows

    # -- writes (called on the reactor thread) --------------------------------

    def call(self, script, keys, args):
        """Queue one script call; Deferred firing with its reply ``[status, a, b]``."""
        if self._closing:
            return defer.fail(StoreError("the registry store is closed"))
        return self._queued(script, keys, args)

    def write(self, op, result=None):
        """Queue ``(kind, script, keys, args)``: ``call`` under a write kind
        (state, session, add, remove, secret, token_add, token_del) that store
        wrappers count. Fires with the script's reply (``result`` is unused)."""
        _, script, keys, args = op
        return self.call(script, keys, args)

    def fetch_tokens(self):
        return self._queued(None, None, None)

    def _queued(self, script, keys, args):
        """Hand an item to the writer thread (started on first use)."""
        d = defer.Deferred()
        self._queue.append((script, keys, args, d))
        self._wake.set()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="registry-redis-writer",
                                            daemon=True)
            self._writer.start()
        return d

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
        """Send what is queued, stop both threads; a Deferred."""
        self._closing = True
        self._stop_reading.set()
        self._wake.set()
        threads = [t for t in (self._writer, self._reader, self._listener) if t is not None]

        def join():
            for thread in threads:
                thread.join(10)
            self._connector.close()
        from twisted.internet.threads import deferToThreadPool
        if not threads:
            self._connector.close()
            return defer.succeed(None)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), join)

    # -- writer thread ----------------------------------------------------------

    def _write_loop(self):
        import redis
        client = self._main
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._wake.wait(READ_BLOCK)
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
        pipe = client.pipeline(transaction=False)
        slots = []
        for script, keys, args, _ in batch:
            if script is None:
                pipe.hgetall(self.key_tokens)
                slots.append("fetch_tokens")
            elif script == "barrier":
                pipe.get(self.key_seq)
                slots.append("barrier")
            elif script == "publish":
                pipe.publish(self.key_commands, args)
                slots.append("publish")
            else:
                self._scripts[script](keys=keys, args=args, client=pipe)
                slots.append(script)
        if self.options.wait_replicas:
            pipe.execute_command("WAIT", self.options.wait_replicas,
                                 int(self.options.wait_timeout * 1000))
        replies = pipe.execute(raise_on_error=False)
        self.commits += 1
        self.operations += len(batch)
        problem = None
        if self.options.wait_replicas:
            acked = replies.pop()
            if isinstance(acked, Exception) or acked < self.options.wait_replicas:
                problem = StoreError(f"only {acked} of {self.options.wait_replicas} replicas "
                                     "acknowledged in time")
        outcomes = []
        for (script, _, _, d), kind, reply in zip(batch, slots, replies):
            if isinstance(reply, redis.ConnectionError):
                raise reply
            if isinstance(reply, Exception):
                outcomes.append((d, Failure(StoreError(f"Redis refused {kind}: {reply}"))))
            elif problem is not None:
                outcomes.append((d, Failure(problem)))
            elif kind == "fetch_tokens":
                outcomes.append((d, [(tid.decode(), bytes(dg), role, created) for tid, (dg, role, created)
                                     in ((t, cbor2.loads(b)) for t, b in reply.items())]))
            elif kind in ("barrier", "publish"):
                outcomes.append((d, int(reply or 0)))
            elif kind == "expired":
                outcomes.append((d, [(reply[i].decode(), [int(n) for n in reply[i + 1]])
                                     for i in range(0, len(reply), 2)]))
            else:
                outcomes.append((d, (reply[0].decode(), int(reply[1]), int(reply[2]))))
        return outcomes

    # -- the change stream ------------------------------------------------------

    def follow(self, after, deliver):
        """Call ``deliver(entries)`` on the reactor thread with every stream
        entry after id ``after`` (parsed in the reader thread; states and
        records stay raw, see ``decode_entry``)."""
        self._reader = threading.Thread(target=self._read_loop, args=(after, deliver),
                                        name="registry-redis-reader", daemon=True)
        self._reader.start()

    def _read_loop(self, after, deliver):
        import redis
        client = self._connector.client()
        last = after
        pause = 0.05
        while not self._stop_reading.is_set():
            try:
                found = client.xread({self.key_feed: last}, count=READ_COUNT,
                                     block=int(READ_BLOCK * 1000))
                pause = 0.05
            except (redis.RedisError, OSError) as e:
                self.log.warn("reading the Redis change stream failed: {error}", error=str(e))
                try:
                    self._connector.refresh()
                    client = self._connector.client()
                except (redis.RedisError, OSError):
                    pass
                self._stop_reading.wait(pause)
                pause = min(2.0, pause * 2)
                continue
            if not found:
                continue
            raw = found[0][1]
            last = raw[-1][0]
            entries = []
            for entry_id, fields in raw:
                try:
                    entries.append(decode_entry(fields))
                except (StoreError, KeyError, ValueError) as e:
                    self.log.error("damaged change-stream entry {id}: {error}",
                                   id=entry_id, error=str(e))
            self._reactor.callFromThread(deliver, entries)
        client.close()


    # -- relayed commands -------------------------------------------------------

    def listen_commands(self, deliver):
        """Call ``deliver(payload)`` on the reactor thread with every message
        published on the command channel (a thread blocked in the subscription)."""
        if self._listener is None and not self._closing:
            self._listener = threading.Thread(target=self._listen_loop, args=(deliver,),
                                              name="registry-redis-commands", daemon=True)
            self._listener.start()

    def _listen_loop(self, deliver):
        import redis
        pause = 0.05
        pubsub = None
        while not self._stop_reading.is_set():
            try:
                if pubsub is None:
                    pubsub = self._connector.client().pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.key_commands)
                message = pubsub.get_message(timeout=READ_BLOCK)
                pause = 0.05
            except (redis.RedisError, OSError) as e:
                self.log.warn("listening for relayed commands failed: {error}", error=str(e))
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                self._stop_reading.wait(pause)
                pause = min(2.0, pause * 2)
                continue
            if message is not None and message.get("type") == "message":
                self._reactor.callFromThread(deliver, bytes(message["data"]))
        if pubsub is not None:
            pubsub.close()


def decode_events(blob):
    """The events of a change from the CBOR the writer sent (b"": none)."""
    return tuple(thaw(e) for e in cbor2.loads(blob)) if blob else ()


def decode_entry(fields):
    """A stream entry as a tuple (type first), decoded off the reactor thread.

    The state and events of an ``s`` entry and the record of an ``r`` entry
    stay raw bytes: most entries are other processes' changes that this
    process may never read (shared_stream.py decodes them when needed).
    ``flags`` is None for an entry written without them; ``record`` is the
    raw session record written with the state, or None."""
    kind = fields[b"t"]
    origin = fields.get(b"o", b"").decode()
    if kind == b"s":
        flags = fields.get(b"f")
        return ("s", int(fields[b"n"]), int(fields[b"v"]), int(fields[b"c"]),
                bytes(fields[b"s"]), fields.get(b"e", b""), origin,
                None if flags is None else int(flags), fields.get(b"r"))
    if kind == b"r":
        return ("r", int(fields[b"n"]), bytes(fields[b"r"]), origin)
    if kind == b"a":
        return ("a", int(fields[b"n"]), int(fields[b"v"]), int(fields[b"c"]),
                fields[b"m"].decode(), bytes(fields[b"k"]), decode_state(fields[b"s"]), origin)
    if kind == b"x":
        return ("x", int(fields[b"n"]), int(fields[b"v"]), int(fields[b"c"]),
                fields[b"m"].decode(), origin)
    if kind == b"k":
        return ("k", int(fields[b"n"]), bytes(fields[b"k"]), origin)
    if kind == b"t":
        return ("t", origin)
    raise ValueError(f"unknown entry type {kind!r}")


def _fire(outcomes):
    for d, outcome in outcomes:
        if isinstance(outcome, Failure):
            d.errback(outcome)
        else:
            d.callback(outcome)


def wait_for_redis(url, timeout=10.0, check=None):
    """Block until a Redis server answers PING (tools and tests).

    ``check()``, if given, runs before each attempt and raises to give up
    early (a test's server process that exited)."""
    import redis
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    end = time.monotonic() + timeout
    try:
        while True:
            if check is not None:
                check()
            try:
                if client.ping():
                    return
            except (redis.RedisError, OSError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
    finally:
        client.close()
