"""The waiting room: every long poll and event stream, woken by one registry subscription.

The subscription exists only while something waits: with nobody waiting
the registry builds no view per change. Nothing is missed meanwhile,
because every newcomer reads the feed or the device before it waits (a
stream reads after the subscription is back, a long poll in the same
reactor turn as its admission), and the wake-up pass reads from cursors
and versions, not from the notifications themselves.

Waiting costs memory only: each waiter is a small slotted object in a dict
and one deadline in the waiting room's timer heap (broker.scheduler's
WakeupScheduler, one reactor timer for every waiter); no thread, no timer
of its own. A registry change sets a flag and schedules one wake-up pass for the
next reactor turn (so a burst of changes is answered once); that pass reads
the feed once per distinct cursor, encodes each answer once, and writes
the same bytes to every waiter that shares it (waiters share an answer
only if they asked for the same: cursor, name filter, limit, and with or
without histories). A client that goes away leaves at once through its
request's notifyFinish errback. Decided answers are written by the outbox
(outbox.Outbox), a slice per reactor turn.

A request holds the access token it came with (revocation.TokenWatch): one
once-a-second check ends every waiter and stream whose token was revoked,
and the outbox checks every answer again just before it is written. A
device polling itself holds the number and secret its key matched: a
rotation or a removal (the registry's key watch, while such polls wait)
ends those polls at once with 401 invalid_device_key, as it ends the
device's SSP session; such a poll is never answered with another device
of its name (one removed and added again in one reactor turn, as a Redis
follower applies a batch). Its presence is kept by number too.

One answer that cannot be built ends only its own request(s), with a JSON 500.
"""

from __future__ import annotations

import hmac

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from broker.scheduler import WakeupScheduler

from .conditions import matches, not_modified
from .feed import changes_body, device_answer, select
from .outbox import FAILED, KEY_REMOVED, KEY_ROTATED, REVOKED, Outbox
from .revocation import TokenWatch


def _changes_answer(batch, views, history, horizon):
    return 200, changes_body(batch, views, history, horizon), None


class FeedWaiter:
    """A long poll of /changes: answers once the filtered feed past its cursor is non-empty."""

    __slots__ = ("room", "request", "cursor", "match", "limit", "history", "token", "done")

    def __init__(self, room, request, cursor, match, limit, history, token):
        self.room = room
        self.request = request
        self.cursor = cursor
        self.match = match
        self.limit = limit
        self.history = history       # devices with their history (False: history=false)
        self.token = token           # the access token it came with (None: a device key)
        self.done = False

    def expire(self):
        self.room.expire_feed(self)


class DeviceWaiter:
    """A long poll of one device: answers once its version differs from the one the client has."""

    __slots__ = ("room", "request", "name", "version", "address", "token", "key", "unless",
                 "done")

    def __init__(self, room, request, name, version, address, token, key, unless=None):
        self.room = room
        self.request = request
        self.name = name
        self.version = version
        self.address = address       # set for a device polling itself (presence), else None
        self.token = token           # the access token it came with (None: a device key)
        self.key = key               # (device number, secret) of a device key, else None
        self.unless = unless         # its If-None-Match (conditions.py), else None
        self.done = False

    def expire(self):
        self.room.expire_device(self)


class WaitingRoom:
    """Holds long polls and event streams; answers them on change or at their deadline."""

    log = Logger()

    def __init__(self, registry, clock, settings, respond, presence=None, gauge=None) -> None:
        self.registry = registry
        self.clock = clock
        self.settings = settings
        #: writes decided answers: respond(request, status, body_bytes, headers=None).
        self.outbox = Outbox(clock, respond, registry.check_token)
        self.presence = presence
        self._gauge = gauge
        self.scheduler = WakeupScheduler(clock, self._deadline)
        self._feed: dict[FeedWaiter, None] = {}
        self._devices: dict[str, dict[DeviceWaiter, None]] = {}
        self._device_count = 0
        self._keyed: dict[int, dict[DeviceWaiter, None]] = {}   # device number -> key holders
        self._key_watch = None
        self._streams: dict = {}
        self._changed: set[str] = set()
        self._feed_dirty = False
        self._backlog: dict = {}
        self._wake_call = None
        self._subscription = None
        self._running = False
        self.tokens = TokenWatch(registry.check_token, clock, self._revoked)
        self._keepalive = None
        if settings.sse_keepalive > 0:
            self._keepalive = LoopingCall(self._send_keepalives)
            self._keepalive.clock = clock

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Follow every registry change while something waits."""
        self._running = True
        self._follow()

    def stop(self) -> None:
        """Stop following changes, cancel the timers, close every waiting request."""
        self._running = False
        self._follow()
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self.tokens.stop()
        self.scheduler.stop()
        self.scheduler = WakeupScheduler(self.clock, self._deadline)   # for a restart
        for waiter in list(self._feed):
            self.expire_feed(waiter)
        for waiters in list(self._devices.values()):
            for waiter in list(waiters):
                self.expire_device(waiter)
        for stream in list(self._streams):
            stream.close()
        self.outbox.drain(everything=True)

    def apply(self, settings) -> None:
        """New limits (a reload): max_waiters for new requests, the keepalive period."""
        old, self.settings = self.settings, settings
        if settings.sse_keepalive == old.sse_keepalive:
            return
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        if settings.sse_keepalive > 0:
            self._keepalive = LoopingCall(self._send_keepalives)
            self._keepalive.clock = self.clock
            if self._streams:
                self._keepalive.start(settings.sse_keepalive, now=False)

    # -- admission ------------------------------------------------------------

    def __len__(self) -> int:
        """Requests waiting now: long polls and event streams."""
        return len(self._feed) + self._device_count + len(self._streams)

    def full(self) -> bool:
        return len(self) >= self.settings.max_waiters

    def _counted(self) -> None:
        self._follow()
        if self._gauge is not None:
            self._gauge.set(len(self))

    def _follow(self) -> None:
        """Subscribe to "*" when the first waiter arrives, cancel when the last leaves."""
        wanted = self._running and len(self) > 0
        if wanted and self._subscription is None:
            self._subscription = self.registry.subscribe(["*"], self._on_change)
        elif not wanted and self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        keys_wanted = self._running and bool(self._keyed)
        if keys_wanted and self._key_watch is None:
            self._key_watch = self.registry.watch_keys(self._key_changed)
        elif not keys_wanted and self._key_watch is not None:
            self._key_watch.cancel()
            self._key_watch = None

    def wait_feed(self, request, cursor, match, limit, wait, token=None, history=True) -> None:
        """Hold ``request`` until the feed past ``cursor`` has a match, or ``wait`` seconds."""
        waiter = FeedWaiter(self, request, cursor, match, limit, history, token)
        self._feed[waiter] = None
        self._enter(waiter, wait)

    def wait_device(self, request, name, version, wait, address=None, token=None,
                    key=None, unless=None) -> None:
        """Hold ``request`` until device ``name`` has a version other than ``version``.

        ``key``: (device number, secret) when the device polls with its own
        key (``address`` is then set); the poll ends with 401 once that key
        is rotated or its device removed. ``unless``: its If-None-Match.
        """
        waiter = DeviceWaiter(self, request, name, version, address, token, key, unless)
        self._devices.setdefault(name, {})[waiter] = None
        self._device_count += 1
        if key is not None:
            self._keyed.setdefault(key[0], {})[waiter] = None
        if address is not None and self.presence is not None:
            self.presence.hold(key[0])
        self._enter(waiter, wait)

    def _enter(self, waiter, wait) -> None:
        self.scheduler.schedule(waiter, self.clock.seconds() + wait)
        waiter.request.notifyFinish().addErrback(self._gone, waiter)
        self.tokens.hold(waiter.token)
        self._counted()

    def add_stream(self, stream) -> None:
        """Keep an event stream (see stream.EventStream) woken by changes."""
        self._streams[stream] = None
        self.tokens.hold(stream.token)
        if self._keepalive is not None and not self._keepalive.running:
            self._keepalive.start(self.settings.sse_keepalive, now=False)
        self._counted()

    def remove_stream(self, stream) -> None:
        if self._streams.pop(stream, 0) is None:
            self.tokens.release(stream.token)
            self._counted()
        if not self._streams and self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()

    # -- leaving --------------------------------------------------------------

    def _gone(self, failure, waiter) -> None:
        """The client went away while waiting: free its place at once."""
        if not waiter.done:
            self._leave(waiter)
            self.scheduler.cancel(waiter)
        waiter.request = None          # answered but not yet written: nothing to write to

    def _leave(self, waiter) -> None:
        waiter.done = True
        if type(waiter) is FeedWaiter:
            self._feed.pop(waiter, None)
        else:
            waiters = self._devices.get(waiter.name)
            if waiters is not None and waiters.pop(waiter, 0) is None:
                self._device_count -= 1
                if not waiters:
                    del self._devices[waiter.name]
            if waiter.address is not None and self.presence is not None:
                self.presence.release(waiter.key[0], waiter.address)
            if waiter.key is not None:
                holders = self._keyed.get(waiter.key[0])
                if holders is not None:
                    holders.pop(waiter, None)
                    if not holders:
                        del self._keyed[waiter.key[0]]
        self.tokens.release(waiter.token)
        self._counted()

    def _answer(self, waiter, status, body, headers=None) -> None:
        """Take waiter out of the room and queue its answer for writing."""
        self._leave(waiter)
        self.scheduler.cancel(waiter)
        self.outbox.put(waiter, status, body, headers)

    def _built(self, build, *args):
        """build(*args): an answer, or FAILED (logged) if building it raises."""
        try:
            return build(*args)
        except Exception:
            self.log.failure("building the answer of a waiting request failed")
            return FAILED

    def expire_feed(self, waiter) -> None:
        """Deadline of a feed waiter: answer what there is (usually nothing)."""
        self._answer(waiter, *self._built(self._feed_answer, waiter))

    def expire_device(self, waiter) -> None:
        """Deadline of a device waiter: answer its current state (same version)."""
        view = self.registry.device(waiter.name)
        if self._foreign(waiter, view):
            self._answer(waiter, *KEY_REMOVED)
        elif matches(waiter.unless, view):
            self._answer(waiter, *not_modified(view))
        else:
            self._answer(waiter, *self._built(self._device_answer, waiter.name))

    @staticmethod
    def _foreign(waiter, view) -> bool:
        """Whether a device polling itself with its key lost its device: removed,
        or replaced by another device of the same name."""
        return waiter.key is not None and (view is None or view.device_number != waiter.key[0])

    def _feed_answer(self, waiter):
        batch = self.registry.changes_since(waiter.cursor, waiter.limit)
        return _changes_answer(batch, select(batch, waiter.match), waiter.history,
                               self.registry.feed_horizon)

    def _deadline(self, waiter, now) -> None:
        """The scheduler's callback: a waiter's time is up."""
        if not waiter.done:
            waiter.expire()

    def _device_answer(self, name):
        return device_answer(self.registry.device(name), name)

    # -- waking ---------------------------------------------------------------

    def _on_change(self, view) -> None:
        if view.name in self._devices:
            self._changed.add(view.name)
        self._feed_dirty = True
        self._schedule_wake()

    def pump_later(self, stream) -> None:
        """Let ``stream`` write more of its backlog in the next wake-up pass."""
        self._backlog[stream] = None
        self._schedule_wake()

    def _schedule_wake(self) -> None:
        if self._wake_call is None:
            self._wake_call = self.clock.callLater(0, self.wake)

    def wake(self) -> None:
        """Answer every waiter the changes since the last pass concern; pump every stream."""
        self._wake_call = None
        changed, self._changed = self._changed, set()
        for name in changed:
            waiters = self._devices.get(name)
            if not waiters:
                continue
            view = self.registry.device(name)
            answer = None
            for waiter in list(waiters):
                if self._foreign(waiter, view):
                    self._answer(waiter, *KEY_REMOVED)
                elif view is None or view.version != waiter.version:
                    if matches(waiter.unless, view):
                        self._answer(waiter, *not_modified(view))
                        continue
                    if answer is None:
                        answer = self._built(self._device_answer, name)
                    self._answer(waiter, *answer)
        backlog, self._backlog = self._backlog, {}
        if self._feed_dirty:
            self._feed_dirty = False
            self._wake_feed()
            backlog = self._streams
        for stream in list(backlog):
            stream.pump()
        if self.outbox:
            self.outbox.drain()        # the first slice in this very turn

    def _wake_feed(self) -> None:
        """Answer the feed waiters that have news: the feed is read once per cursor and
        filter, and encoded once per filter and history, whoever waits on it."""
        groups: dict[tuple, dict[bool, list]] = {}
        for waiter in self._feed:
            kinds = groups.setdefault((waiter.cursor, waiter.match, waiter.limit), {})
            kinds.setdefault(waiter.history, []).append(waiter)
        for (cursor, match, limit), kinds in groups.items():
            try:
                batch = self.registry.changes_since(cursor, limit)
                views = select(batch, match)
            except Exception:
                self.log.failure("reading the feed for waiting feed requests failed")
                batch = views = None
            if batch is not None and not (views or batch.reset or batch.more):
                for waiters in kinds.values():
                    for waiter in waiters:
                        waiter.cursor = batch.cursor   # nothing of interest: skip it next time
                continue
            for history, waiters in kinds.items():
                answer = FAILED if batch is None else self._built(
                    _changes_answer, batch, views, history, self.registry.feed_horizon)
                for waiter in waiters:
                    self._answer(waiter, *answer)

    def _send_keepalives(self) -> None:
        for stream in list(self._streams):
            stream.keepalive()

    def _key_changed(self, number) -> None:
        """A device's key was rotated, or the device removed: end the polls of the old key
        (a device added again under the name is another device, with another key)."""
        holders = self._keyed.get(number)
        if not holders:
            return
        secret = self.registry.secret_for(number)
        for waiter in list(holders):
            if secret is None:
                self._answer(waiter, *KEY_REMOVED)
            elif not hmac.compare_digest(secret, waiter.key[1]):
                self._answer(waiter, *KEY_ROTATED)
        if self.outbox:
            self.outbox.drain()

    def _revoked(self, tokens) -> None:
        """End every request that waits with one of ``tokens``: streams close, long polls get 401."""
        self.log.info("ending requests whose access token was revoked")
        for stream in list(self._streams):
            if stream.token in tokens:
                stream.close()
        for waiter in list(self._feed):
            if waiter.token in tokens:
                self._answer(waiter, *REVOKED)
        for waiters in list(self._devices.values()):
            for waiter in list(waiters):
                if waiter.token in tokens:
                    self._answer(waiter, *REVOKED)
        if self.outbox:
            self.outbox.drain()
