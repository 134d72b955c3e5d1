"""Server-sent events: the change feed as ``text/event-stream``, paced by the reader.

A stream holds only its cursor. It is the request's push producer: while
the transport's buffer is full (``pauseProducing``) it writes nothing and
only remembers that something changed; when the transport drains
(``resumeProducing``) it reads the feed from its cursor, which gives the
latest state of each device changed meanwhile, once. So a slow reader
costs one cursor, never a queue, and a reader that reconnects with
``Last-Event-ID`` (the cursor of the last event it got) misses nothing.

Events are written one at a time and the stream stops as soon as the
transport pushes back, its cursor at the last event written: a device's
JSON can be about 170 KiB (a full history: ``[registry] history_bytes``
and the state limits, docs/http-api.md), so writing a whole page before
looking would leave megabytes in the buffer of a reader that stopped
reading.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .feed import select, sse_event, sse_reset, sse_tail

#: feed entries per page; a pump writes events until the transport pushes back.
PAGE = 50
#: pages one pump writes before it lets the reactor serve others.
MAX_PAGES = 20


@implementer(IPushProducer)
class EventStream:
    """One open ``/events`` response."""

    __slots__ = ("room", "request", "cursor", "match", "history", "token", "paused", "pending",
                 "done")

    log = Logger()

    def __init__(self, room, request, cursor: int, match, token: str | None = None,
                 history: bool = True) -> None:
        self.room = room
        self.request = request
        self.cursor = cursor
        self.match = match
        #: devices are sent with their history (False: ``history=false``).
        self.history = history
        #: the access token that opened the stream: it ends when the token is revoked.
        self.token = token
        self.paused = False
        self.pending = False
        self.done = False

    def start(self, retry_ms: int) -> None:
        """Send the preamble and everything since the cursor; then follow changes."""
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(self._finished)
        self.room.add_stream(self)
        preamble = b": ssp-broker change feed\n"
        if retry_ms > 0:
            preamble += b"retry: %d\n" % retry_ms
        self.request.write(preamble + b"\n")
        self.pump()

    def pump(self) -> None:
        """Write what changed since the cursor, as far as the transport takes it."""
        if self.done:
            return
        if self.paused:
            self.pending = True
            return
        self.pending = False
        try:
            self._pump()
        except Exception:
            # A bug in one stream's events must not stop the others: this one is
            # cut off (its client reconnects from the last id it got) and logged.
            self.log.failure("event stream failed; closing its connection")
            self.fail()

    def _pump(self) -> None:
        registry = self.room.registry
        for _ in range(MAX_PAGES):
            batch = registry.changes_since(self.cursor, PAGE)
            if not self._write_batch(batch, registry.feed_horizon) or self.done:
                return
            if not batch.more:
                return
        # A long backlog: continue in the next wake-up pass, so others get served.
        self.room.pump_later(self)

    def _write_batch(self, batch, horizon) -> bool:
        """Write ``batch`` event by event; False if the transport pushed back first.

        The cursor is the id of the last event written, so the next pump
        resumes right after it. It never stops below the feed's horizon,
        from where the next pump would be reset to the same snapshot.
        """
        request = self.request
        if batch.reset:
            request.write(sse_reset(batch))
        for view in select(batch, self.match):
            request.write(sse_event(view, self.history))
            self.cursor = view.cursor
            if self.done:
                return False
            if self.paused and view.cursor >= horizon:
                self.pending = True
                return False
        tail, self.cursor = sse_tail(batch, self.cursor)
        if tail:
            request.write(tail)
        if self.paused:
            self.pending = True
            return False
        return True

    def keepalive(self) -> None:
        """A comment line, so that proxies keep an idle stream open."""
        if not self.done and not self.paused:
            self.request.write(b":\n\n")

    # IPushProducer, called by the HTTP channel

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.pending:
            self.pump()

    def stopProducing(self) -> None:
        self._end()

    # ending

    def close(self) -> None:
        """End the response (the broker is stopping); the client reconnects elsewhere."""
        if not self.done:
            self._end()
            self.request.unregisterProducer()
            self.request.finish()

    def fail(self) -> None:
        """End the response abruptly (its events could not be written): close the connection."""
        if not self.done:
            self._end()
            self.request.unregisterProducer()
            self.request.loseConnection()

    def _finished(self, result) -> None:
        self._end()

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        self.room.remove_stream(self)
