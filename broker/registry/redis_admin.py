"""Synchronous administration of the registry in Redis (broker-admin, backend "redis").

Each change is the same Lua script a broker runs (redis_scripts.py), so
names, numbers and cursors are checked by Redis exactly as for a broker's
own writes, and every change goes on the change stream: running brokers,
their dashboards and long polls see it at once. The same methods as
admin.AdminDatabase, so the CLI does not care which backend it drives.

Opening adopts the data set's marker as a broker does (redis_store.py):
provisioning into an empty Redis starts the data set the brokers then
load, and scripts run against a Redis emptied meanwhile change nothing.
Given a data directory, it is refused as a broker is when Redis no longer
holds the data set remembered there, and (when it writes) remembers the
marker it adopted (redis_marker.py).
"""

import os
import time

import cbor2

from . import errors
from .database import decode_state, encode_state
from .model import Device, DeviceView, TokenInfo
from .provisioning import check_name
from .redis_store import RedisStore
from .restart import CURSOR_GAP
from .secrets import ROLES, hash_token, new_device_number, new_secret, new_token


class RedisAdmin:
    """The registry in Redis opened for administration (no reactor, no threads)."""

    def __init__(self, store, *, feed_retention=1_000_000, history_size=32,
                 random_bytes=os.urandom, now=time.time):
        self._store = store
        self._feed_retention = feed_retention
        self._history = history_size > 0
        self._random_bytes = random_bytes
        self._now = now
        #: the origin of our stream entries (brokers apply every one of them).
        self.origin = "admin-" + random_bytes(4).hex()

    @classmethod
    def open(cls, options, *, data_dir=None, record=True, **kwargs):
        """Connect to Redis (``options``: a RedisOptions); StoreError if it cannot be
        reached, MarkerMismatch if it lost the data set ``data_dir`` remembers
        (where the marker is recorded when ``record``: the command writes)."""
        store = RedisStore(options, reactor=None, data_dir=data_dir, record=record)
        try:
            store.adopt()
        except errors.StoreError:
            store.close()
            raise
        return cls(store, **kwargs)

    @staticmethod
    def adopt_new(options, data_dir):
        """Make ``data_dir`` serve the data set Redis holds now (setting a new
        marker if it has none), whatever it remembered: ``broker-admin redis
        adopt-new``. Returns ``(previous marker or None, marker now)``."""
        store = RedisStore(options, reactor=None, data_dir=data_dir)
        try:
            try:
                previous = store.remembered.read()
            except errors.StoreError:
                previous = None         # unreadable or damaged: replaced now
            return previous, store.adopt(deliberately=True)
        finally:
            store.close()

    def close(self):
        self._store.close()

    # -- after a restore -----------------------------------------------------------

    def live_holders(self):
        """``{origin: seconds left}`` of the broker processes whose presence lease
        is still running (shared_presence.py)."""
        store = self._store
        live = {}
        for origin in sorted(store.read_now("smembers", store.key_holders)):
            origin = origin.decode() if isinstance(origin, bytes) else origin
            left = store.read_now("pttl", store.lease_prefix + origin)
            if left > 0 or left == -1:     # -1: a lease without an end
                live[origin] = left / 1000 if left > 0 else float("inf")
        return live

    def restored(self):
        """Tell the data set it was restored from an older copy (``broker-admin
        redis restored``): the change sequence skips CURSOR_GAP cursors and
        every cursor handed out before gets a reset, as an unclean start of the
        SQLite store does (restart.py). Dashboards hold cursors of changes the
        copy lost; handed out again for other changes, they would make those
        dashboards miss changes silently. StoreError while a broker process
        holds a lease: it serves the registry as it was before the restore.
        Every session record is retired (SessionRecord.retired): the devices
        went on past the copy, so none may resume over it. Every device's
        version is raised to the new sequence at least, as the cursors are:
        a version handed out after the copy was taken (an ETag, an
        ``If-Match``, a long poll's ``version``) never names another state.
        Returns ``(sequence before, sequence now, session records retired,
        versions raised)``."""
        live = self.live_holders()
        if live:
            names = ", ".join(f"{origin} ({left:.0f} s left)" for origin, left in live.items())
            raise errors.StoreError(f"broker processes still hold a lease on this data set: "
                                    f"{names}; stop every broker, wait for their leases to "
                                    "end, then run this again")
        store = self._store
        _, before, now = store.run_now("restored", [store.key_seq, store.key_horizon,
                                                    store.key_tombs, store.key_feed],
                                       [CURSOR_GAP, store.options.stream_length, self.origin])
        retired = store.retire_sessions_now()
        return before, now, retired, store.raise_versions_now(int(now))

    def _number(self, name):
        number = self._store.read_now("hget", self._store.keys_names, name)
        if number is None:
            raise errors.UnknownDevice(name)
        return int(number)

    # -- devices ---------------------------------------------------------------

    def add_device(self, name):
        """Provision ``name``: returns ``(device_number, secret)``."""
        check_name(name)
        store = self._store
        while True:
            number = new_device_number(self._random_bytes)
            secret = new_secret(self._random_bytes)
            dev = Device(name, number, secret, 1)
            if self._history:
                dev.history = ((0, 0, self._now(), "created", None),)   # see with_cursors
            status, _, _ = store.run_now(
                "add", [store.device_key(number), store.keys_names, store.key_seq, store.key_feed],
                [name, number, secret, encode_state(dev.state()), self.origin,
                 store.options.stream_length])
            if status == "exists":
                raise errors.DeviceExists(name)
            if status == "ok":
                return number, secret
            # "taken": that number is in use, draw another.

    def remove_device(self, name):
        """Remove ``name`` everywhere (a tombstone in the feed); returns its number."""
        store = self._store
        number = self._number(name)
        status, _, _ = store.run_now(
            "remove", [store.device_key(number), store.keys_names, store.key_seq, store.key_feed,
                       store.key_tombs, store.key_horizon],
            [number, self.origin, store.options.stream_length, self._feed_retention or 1])
        if status != "ok":
            raise errors.UnknownDevice(name)
        return number

    def rotate_key(self, name):
        """A new secret for ``name``: returns ``(device_number, secret)``."""
        store = self._store
        number = self._number(name)
        secret = new_secret(self._random_bytes)
        status, _, _ = store.run_now(
            "secret", [store.device_key(number), store.key_seq, store.key_feed],
            [number, secret, self.origin, store.options.stream_length])
        if status != "ok":
            raise errors.UnknownDevice(name)
        return number, secret

    def devices(self):
        """Views of every device, in name order."""
        rows = self._store.load().devices
        return [self._view(r.number, r.name, r.secret, r.version, r.cursor, r.state)
                for r in sorted(rows, key=lambda r: r.name)]

    def device(self, name):
        number = self._number(name)
        fields = self._store.read_now("hgetall", self._store.device_key(number))
        if b"v" not in fields:
            raise errors.UnknownDevice(name)
        return self._view(number, name, bytes(fields[b"k"]), int(fields[b"v"]),
                          int(fields[b"c"]), decode_state(fields[b"s"]))

    @staticmethod
    def _view(number, name, secret, version, cursor, state):
        dev = Device(name, number, secret, version, cursor)
        if state is not None:
            dev.restore_state(state)
        return DeviceView.of(dev)

    # -- tokens ----------------------------------------------------------------

    def _tokens_call(self, *args):
        store = self._store
        store.run_now("tokens", [store.key_tokens, store.key_seq, store.key_feed],
                      [*args, self.origin, store.options.stream_length])

    def add_token(self, role):
        """A new token: returns ``(token_id, token_text)``; only its hash is stored."""
        if role not in ROLES:
            raise errors.InvalidValue(f"token role must be one of {', '.join(ROLES)}")
        token_id, text = new_token(self._random_bytes)
        while self._store.read_now("hexists", self._store.key_tokens, token_id):
            token_id, text = new_token(self._random_bytes)
        self._tokens_call("add", token_id, cbor2.dumps([hash_token(text), role, self._now()]))
        return token_id, text

    def tokens(self):
        rows = sorted(self._store.tokens_now(), key=lambda row: (row[3], row[0]))
        return [TokenInfo(token_id, role, created) for token_id, _, role, created in rows]

    def revoke_token(self, token_id):
        if not self._store.read_now("hexists", self._store.key_tokens, token_id):
            raise errors.UnknownToken(f"unknown token {token_id!r}")
        self._tokens_call("del", token_id, b"")
