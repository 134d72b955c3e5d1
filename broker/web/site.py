"""The HTTP Site: counts answers by status, logs them without secrets, and can be drained.

Answers name no server software: twisted.web's ``Server: TwistedWeb/<version>``
is dropped, as the WebSocket handshake sends none (docs/websocket.md).

`BrokerSite` replaces twisted.web's access log (which writes full URIs,
query strings included, where tokens could sit) with a debug event holding
the path only, and counts every answer in `broker_http_requests_total`
(but WebSocket handshakes: Autobahn answers those, and the WebSocket
endpoint counts them there).

`ConnectionTracker` wraps the Site's factory and keeps the live connections,
so a graceful stop can close the idle ones once their answers are written,
wait a bounded time for the rest, and cut off what is left. WebSocket
connections stay tracked after Autobahn takes the transport over, because
Autobahn swaps the protocol inside our wrapper.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Site

_POLL = 0.05  # seconds between checks while draining (only during a stop)


class BrokerSite(Site):
    """A Site that counts answers by status and logs them as structured events."""

    noisy = False
    _log = Logger()

    def __init__(self, resource, *, metrics, reactor=None) -> None:
        super().__init__(resource, reactor=reactor)
        self._requests = metrics.http_requests
        self._by_status = {}

    def getResourceFor(self, request):
        """The resource for a request; twisted.web's Server header (its version) is dropped first."""
        request.responseHeaders.removeHeader(b"server")
        return super().getResourceFor(request)

    def log(self, request) -> None:
        """Called by twisted.web once per finished request (instead of the access log)."""
        counter = self._by_status.get(request.code)
        if counter is None:
            counter = self._by_status[request.code] = self._requests.labels(status=str(request.code))
        counter.inc()
        self._log.debug("{method} {path} answered {status}",
                        method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("utf-8", "replace"),
                        status=request.code, sent=request.sentLength)


def _http_channel(protocol):
    """The HTTPChannel behind a Site's protocol, or None (e.g. a WebSocket took over)."""
    channel = getattr(protocol, "_channel", protocol)
    return channel if hasattr(channel, "requests") else None


class ConnectionTracker(WrappingFactory):
    """Keeps every connection of one listener; `close_all` ends them gracefully."""

    noisy = False
    log = Logger()

    def __init__(self, factory, clock) -> None:
        super().__init__(factory)
        self.clock = clock

    def __len__(self) -> int:
        return len(self.protocols)

    def close_all(self, grace: float) -> defer.Deferred:
        """Close idle HTTP connections as they become idle; after grace seconds abort the rest.

        Fires with the number of connections that had to be aborted.
        """
        done = defer.Deferred()
        deadline = self.clock.seconds() + grace
        state = {"aborted": 0}

        def check():
            if not self.protocols:
                loop.stop()
                return
            past = self.clock.seconds() >= deadline
            for wrapper in list(self.protocols):
                channel = _http_channel(wrapper.wrappedProtocol)
                if past:
                    state["aborted"] += 1
                    wrapper.transport.abortConnection()
                elif channel is not None and not channel.requests:
                    wrapper.transport.loseConnection()
            if past:
                loop.stop()

        loop = LoopingCall(check)
        loop.clock = self.clock
        loop.start(_POLL, now=True).addCallback(lambda _: done.callback(state["aborted"]))
        return done
