"""A real Autobahn WebSocket client for the dashboard endpoint's tests.

It keeps every message it receives (decoded JSON) and lets a test wait,
with a timeout, for the next one that matches; it can stop and resume
reading its socket to play a slow dashboard.
"""

from __future__ import annotations

import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from broker.web.websocket.messages import SUBPROTOCOL

#: Seconds a test waits for a message before it fails.
WAIT = 10.0


class HandshakeRefused(Exception):
    """The broker closed the connection before it opened (reason: Autobahn's text)."""


class DashboardClient(WebSocketClientProtocol):
    """Collects messages; ``expect()`` waits for one."""

    def __init__(self):
        super().__init__()
        self.received = []
        self._waiters = []
        self.closed = defer.Deferred()

    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        message = json.loads(payload)
        for waiter in list(self._waiters):
            match, d = waiter
            if match(message):
                self._waiters.remove(waiter)
                d.callback(message)
                return
        self.received.append(message)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(HandshakeRefused(reason))
        for _, d in self._waiters:
            d.errback(AssertionError(f"connection closed while waiting: {code} {reason}"))
        self._waiters = []
        self.closed.callback((wasClean, code, reason))

    # -- for tests -------------------------------------------------------------

    def send(self, message) -> None:
        """Send a dict as JSON text (bytes are sent as they are)."""
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.sendMessage(payload)

    def expect(self, type=None, id=None, match=None, timeout=WAIT) -> defer.Deferred:
        """The first unclaimed message with this type / id / predicate, as it arrives."""
        def matches(message):
            return ((type is None or message.get("type") == type)
                    and (id is None or message.get("id") == id)
                    and (match is None or match(message)))
        for message in self.received:
            if matches(message):
                self.received.remove(message)
                return defer.succeed(message)
        d = defer.Deferred()
        self._waiters.append((matches, d))
        return d.addTimeout(timeout, reactor)

    @defer.inlineCallbacks
    def request(self, message, timeout=WAIT):
        """Send a request and return the result, pong, error or last snapshot page for its id."""
        self.send(message)
        answer = yield self.expect(match=lambda m: m.get("id") == message.get("id")
                                   and m.get("type") != "update"
                                   and (m.get("type") != "snapshot" or m.get("done")),
                                   timeout=timeout)
        return answer

    def stop_reading(self) -> None:
        """Stop reading the socket (the broker's buffers fill up)."""
        self.transport.pauseProducing()

    def start_reading(self) -> None:
        """Read the socket again."""
        self.transport.resumeProducing()


class DeafToCloseClient(DashboardClient):
    """A client that never answers the broker's close frame, keeping the connection CLOSING.

    It records the close code and goes on sending, as a misbehaving or
    hostile client may for the whole close handshake timeout.
    """

    close_code = None

    def onCloseFrame(self, code, reasonRaw):
        if self.state == self.STATE_OPEN:
            self.close_code = code
            return None
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean, code, reason):
        # Its own close (at cleanup) is answered by the broker dropping TCP,
        # which leaves Autobahn's close handshake timer armed.
        call, self.closeHandshakeTimeoutCall = self.closeHandshakeTimeoutCall, None
        if call is not None:
            try:
                call.cancel()
            except ValueError:
                pass  # its batch is already running
        super().onClose(wasClean, code, reason)


@defer.inlineCallbacks
def eventually(condition, timeout=10.0, step=0.05):
    """Wait (polling the real reactor) until condition() is true; fail after timeout."""
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        yield task.deferLater(reactor, step, lambda: None)
        waited += step


def connect(broker_url: str, token: str | None = None, *, via: str = "header",
            origin: str | None = None, protocols=None, tls=None, port_host=None,
            path: str = "/ws", offers=None, client=None) -> defer.Deferred:
    """Open a DashboardClient to a running broker; fires when the connection is open.

    ``via`` says where the token goes: "header" (Authorization) or
    "subprotocol" (``bearer.<token>``). ``tls``: client TLS options (wss).
    ``client``: the protocol class (default DashboardClient).
    """
    host_port = broker_url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    scheme = "wss" if tls is not None else "ws"
    url = f"{scheme}://{port_host or host}:{port}{path}"
    offered = list(protocols) if protocols is not None else [SUBPROTOCOL]
    headers = {}
    if token is not None and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        offered.append(f"bearer.{token}")
    factory = WebSocketClientFactory(url, origin=origin, protocols=offered or None,
                                     headers=headers)
    factory.protocol = client or DashboardClient
    factory.opened = defer.Deferred()
    if offers:
        factory.setProtocolOptions(perMessageCompressionOffers=offers)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", int(port), timeout=WAIT)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: factory.opened)
    return d.addTimeout(WAIT, reactor)


@defer.inlineCallbacks
def connected(testcase, broker_url: str, token: str | None = None, **kwargs):
    """connect() that closes the client when the test ends."""
    client = yield connect(broker_url, token, **kwargs)

    def close():
        if client.closed.called:
            return client.closed
        client.sendClose(1000)
        late = reactor.callLater(2.0, client.dropConnection, True)
        return client.closed.addBoth(lambda result: late.active() and late.cancel())
    testcase.addCleanup(close)
    return client


class Fleet:
    """A running broker for WebSocket tests: its URL, registry, factory and tokens."""

    def __init__(self, running, write_token, read_token):
        self.running = running
        self.url = running.http_url
        self.service = running.service
        self.registry = running.service.registry
        self.factory = running.service.websocket_factory
        self.write_token = write_token
        self.read_token = read_token

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@defer.inlineCallbacks
def start_fleet(testcase, devices=("pump-1", "pump-2", "valve-1"), **sections):
    """A broker on loopback (memory registry, no UDP) with devices and a write and a read token."""
    from tests.helpers import loopback_config, start_broker

    sections.setdefault("ssp", {"enabled": False})
    sections.setdefault("registry", {"backend": "memory"})
    running = yield start_broker(testcase, loopback_config(testcase, **sections))
    registry = running.service.registry
    for name in devices:
        yield registry.add_device(name)
    _, write_token = yield registry.add_token("write")
    _, read_token = yield registry.add_token("read")
    return Fleet(running, write_token, read_token)
