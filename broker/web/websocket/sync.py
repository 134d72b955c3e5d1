"""State synchronization for one dashboard connection (sans-IO core).

The registry calls ``changed(view)`` on every change of a subscribed
device. While the connection can take data the update is sent at once;
while it cannot (the transport paused us, or older changes still wait)
only the device's *name* is remembered, in change order, and its latest
state is sent when the connection drains. So a client that stops reading
costs at most one small entry per subscribed device, never a message log,
and it gets every device's latest state when it comes back.

Every message carries the client's resume ``cursor``: reconnecting with it
loses nothing and repeats nothing (docs/websocket.md, "Resume"). It is the
registry cursor when nothing is owed, else one below the oldest change
still owed (and no further than a resume job has read the feed).

Time comes from the injected clock, bytes leave through ``send``; the
Autobahn adapter (protocol.py) owns the socket.
"""

from __future__ import annotations

from collections import deque
from fnmatch import translate
import re

from .jobs import resume_job, snapshot_job
from .messages import ProtocolError, device_json, snapshot_message, update_message

#: Devices per snapshot page, and the page's approximate byte budget.
PAGE_DEVICES = 100
PAGE_BYTES = 32 * 1024


def compile_patterns(patterns) -> "callable":
    """A predicate name -> bool matching any of the names or fnmatch globs."""
    if not patterns:
        return lambda name: False
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match


class UpdateCache:
    """Encodes each device state once for every connection (fanout).

    Keyed by (device, its change cursor, history or not): the registry's
    cursor names one state of one device, so connections sending the same
    state share its JSON, and those sending it with the same resume cursor
    share the framed message too (``frame``: Autobahn's prepared message).
    Clients that fell behind and drain later find the state already
    encoded. Both tables keep the ``limit`` latest entries.
    """

    __slots__ = ("_frame", "limit", "_texts", "_messages", "_last", "hits", "misses")

    def __init__(self, frame=bytes, limit: int = 2048) -> None:
        self._frame = frame
        self.limit = limit
        self._texts = {}
        self._messages = {}
        self._last = (None, None, None, None)   # view, cursor, history, message
        self.hits = self.misses = 0

    def update(self, view, cursor: int, history: bool):
        """The framed update message for a view, with this resume cursor."""
        last_view, last_cursor, last_history, message = self._last
        if view is last_view and cursor == last_cursor and history == last_history:
            self.hits += 1       # the next client of the same change: no lookup at all
            return message
        message = self._message(view.name, view.cursor, cursor, history, view, None)
        self._last = (view, cursor, history, message)
        return message

    def owed(self, name: str, device_cursor: int, cursor: int, history: bool, load):
        """The framed update for a device state owed since device_cursor (None: it is gone).

        ``load()`` gives its view, called only if nobody encoded that state yet.
        """
        return self._message(name, device_cursor, cursor, history, None, load)

    def _message(self, name, device_cursor, cursor, history, view, load):
        key = (name, device_cursor, history, cursor)
        message = self._messages.get(key)
        if message is not None:
            self.hits += 1
            return message
        self.misses += 1
        text = self._texts.get(key[:3])
        if text is None:
            if view is None:
                view = load()
                if view is None:
                    return None
                if view.cursor != device_cursor:   # changed again since: do not share
                    return self._frame(update_message(device_json(view, history), cursor))
            text = device_json(view, history)
            self._remember(self._texts, key[:3], text)
        message = self._frame(update_message(text, cursor))
        self._remember(self._messages, key, message)
        return message

    def _remember(self, table, key, value) -> None:
        if len(table) >= self.limit:
            del table[next(iter(table))]
        table[key] = value


class ClientSync:
    """What one connection subscribes to, and what it is still owed."""

    __slots__ = ("registry", "_send", "_clock", "_cache", "_frame", "max_patterns",
                 "patterns", "_match", "_subscription", "pending", "_removed", "jobs",
                 "paused", "behind_since", "history", "closed", "_pumping", "page_devices")

    def __init__(self, registry, send, *, clock, cache: UpdateCache | None = None,
                 frame=bytes, max_patterns: int = 100, page_devices: int = PAGE_DEVICES) -> None:
        self.registry = registry
        self._send = send
        self._clock = clock
        self._frame = frame
        self._cache = cache if cache is not None else UpdateCache(frame)
        self.max_patterns = max_patterns
        self.page_devices = page_devices
        self.patterns: tuple = ()
        self._match = compile_patterns(())
        self._subscription = None
        #: name -> cursor of its latest change not yet sent, oldest first.
        self.pending: dict[str, int] = {}
        #: tombstones of removed devices among ``pending`` (the registry forgets them).
        self._removed = {}
        self.jobs: deque = deque()
        self.paused = False
        #: clock time since which changes wait unsent (None: caught up).
        self.behind_since = None
        self.history = True
        self.closed = False
        self._pumping = False

    # -- requests ----------------------------------------------------------

    def subscribe(self, request_id, patterns: tuple, cursor: int | None = None,
                  history: bool | None = None) -> None:
        """Add patterns; answer with a snapshot, or with what changed since ``cursor``.

        Answers not yet sent (the client does not read) are bounded like
        patterns: beyond ``max_patterns`` of them a subscribe is refused.
        """
        if len(self.jobs) >= self.max_patterns:
            raise ProtocolError(
                "too_many_requests",
                f"at most {self.max_patterns} subscribe requests unanswered per connection: "
                "read their snapshots first", request_id=request_id, op="subscribe")
        new = tuple(p for p in patterns if p not in self.patterns)
        if len(self.patterns) + len(new) > self.max_patterns:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.max_patterns} patterns per connection: this one has "
                f"{len(self.patterns)} and asked for {len(new)} more",
                request_id=request_id, op="subscribe")
        if history is not None:
            self.history = history
        skip = self._skip()
        self._resubscribe(self.patterns + new)
        upto = self.registry.cursor
        if cursor is None:
            job = snapshot_job(self.registry, request_id, patterns, new, upto, skip)
        else:
            job = resume_job(self.registry, request_id, patterns, new, cursor, upto, skip)
        self.jobs.append(job)
        self.pump()

    def unsubscribe(self, request_id, patterns: tuple) -> tuple:
        """Drop patterns (and the unsent rest of their snapshots); returns those left."""
        unknown = [p for p in patterns if p not in self.patterns]
        if unknown:
            raise ProtocolError("not_subscribed", f"not subscribed to {', '.join(unknown)}",
                                request_id=request_id, op="unsubscribe", patterns=unknown)
        left = tuple(p for p in self.patterns if p not in patterns)
        self._resubscribe(left)
        dropped = set(patterns)
        self.jobs = deque(job for job in self.jobs if not set(job.patterns) <= dropped)
        for job in self.jobs:
            # A job kept for its other patterns no longer answers for these
            # (a later subscribe to them is a new answer): see _skip.
            job.new = tuple(p for p in job.new if p not in dropped)
        return left

    def _skip(self):
        """What a new answer leaves out: the devices the client has through patterns it holds.

        Those of a pattern whose own answer is done, and those an answer
        still unfinished has dealt with (Job.passed), as far as it gets:
        were it dropped by an unsubscribe before it is done, the new answer
        sends the rest itself (the client would not have them otherwise).
        """
        held = set(self.patterns)
        unfinished = [(job, held.intersection(job.new)) for job in self.jobs
                      if held.intersection(job.new)]
        owed = {p for _, answers in unfinished for p in answers}
        match = compile_patterns(tuple(p for p in self.patterns if p not in owed))
        if not unfinished:
            return match
        return lambda name: bool(match(name)) or any(job.passed(name, answers)
                                                     for job, answers in unfinished)

    def _resubscribe(self, patterns: tuple) -> None:
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        self.patterns = patterns
        self._match = compile_patterns(patterns)
        if patterns:
            self._subscription = self.registry.subscribe(list(patterns), self.changed)

    def resume_cursor(self) -> int:
        """The cursor a client reconnecting now would resume from without loss."""
        point = self.registry.cursor
        if self.pending:
            point = next(iter(self.pending.values())) - 1
        for job in self.jobs:
            if job.position is not None and job.position < point:
                point = job.position
        return point

    # -- the registry calls this -------------------------------------------

    def changed(self, view) -> None:
        """A subscribed device changed: send it now, or remember its name."""
        if self.paused or self.pending or self.jobs or self._pumping or self.closed:
            self._changed_slowly(view)
            return
        # Nothing owed: the resume cursor is the registry's (the fanout fast path).
        self._send(self._cache.update(view, self.registry.cursor, self.history))

    def _changed_slowly(self, view) -> None:
        if self.closed:
            return
        if self.paused or self.pending or self._pumping or self._resuming() is not None:
            self._owe(view)
            return
        self._send(self._cache.update(view, self.resume_cursor(), self.history))

    def _owe(self, view) -> None:
        name = view.name
        self.pending.pop(name, None)
        self.pending[name] = view.cursor
        if view.removed:
            self._removed[name] = view
        else:
            self._removed.pop(name, None)
        if self.behind_since is None:
            self.behind_since = self._clock.seconds()

    # -- the transport calls these (IPushProducer) -------------------------

    def pause(self) -> None:
        """The transport's buffer is full: stop sending."""
        self.paused = True

    def resume(self) -> None:
        """The transport drained: send what is owed."""
        self.paused = False
        self.pump()

    def close(self) -> None:
        """The connection is gone: stop observing and forget what is owed."""
        self.closed = True
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        self.pending.clear()
        self._removed.clear()
        self.jobs.clear()

    # -- sending what is owed -------------------------------------------------

    def pump(self) -> None:
        """Send owed changes, then snapshot pages, until paused or done."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self.paused and not self.closed:
                # Missed changes first, then newer ones, then snapshots: so
                # every message's cursor covers everything sent before it.
                resuming = self._resuming()
                if resuming is not None:
                    self._send_page(resuming)
                elif self.pending:
                    self._send_owed()
                elif self.jobs:
                    self._send_page(self.jobs[0])
                else:
                    break
        finally:
            self._pumping = False
        if not self.pending:
            self.behind_since = None

    def _resuming(self):
        """The first job still sending changes since a cursor, or None."""
        for job in self.jobs:
            if job.position is not None:
                return job
        return None

    def _send_owed(self) -> None:
        name = next(iter(self.pending))
        device_cursor = self.pending.pop(name)
        removed = self._removed.pop(name, None)
        if not self._match(name):
            return
        if removed is not None:
            message = self._cache.update(removed, self.resume_cursor(), self.history)
        else:
            message = self._cache.owed(name, device_cursor, self.resume_cursor(), self.history,
                                       lambda: self.registry.device(name))
        if message is not None:
            self._send(message)

    def _send_page(self, job) -> None:
        devices, size = [], 0
        for view in job.views:
            if not self._match(view.name):
                continue
            text = device_json(view, self.history)
            devices.append(text)
            size += len(text)
            if len(devices) >= self.page_devices or size >= PAGE_BYTES:
                break
        else:
            job.done = True
            self.jobs.remove(job)
        reset, job.reset = job.reset, None
        self._send(self._frame(snapshot_message(
            job.request_id, devices, full=job.full, done=job.done,
            cursor=self.resume_cursor(), reset=reset)))
