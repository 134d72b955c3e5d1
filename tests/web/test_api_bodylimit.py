"""Oversized request bodies over a real loopback connection: 413 at once, the rest never read."""

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.helpers import start_broker
from tests.web.test_api_rest import broker_config

#: bytes of body the client sends after the head, a little at a time.
TRICKLE = 64
TRICKLES = 5
#: seconds the 413 may take (generous: shared, slow CI machines).
ANSWER_WITHIN = 5.0


class _RawClient(Protocol):
    """A bare TCP client: sends bytes as told, keeps what it receives, notes when the connection ends."""

    def __init__(self):
        self.received = b""
        self.answered = defer.Deferred()
        self.closed = defer.Deferred()
        self.sent_body = 0

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and not self.answered.called:
            self.answered.callback(self.sent_body)

    def connectionLost(self, reason):
        self.closed.callback(reason.value)


class OversizedBodyTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, broker_config(self))   # max_request_bytes = 1024
        yield self.broker.service.registry.add_device("node")
        _, token = yield self.broker.service.registry.add_token("write")
        self.token = token.encode()
        self.port = int(self.broker.http_url.rsplit(":", 1)[1])

    @defer.inlineCallbacks
    def connect(self):
        client = _RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected
                        else None)
        return client

    def head(self, extra):
        return (b"PATCH /api/v1/devices/node/desired HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer " + self.token + b"\r\n"
                b"Content-Type: application/json\r\n" + extra + b"\r\n")

    @defer.inlineCallbacks
    def trickle(self, client, chunked=False):
        """Send small pieces of body slowly until the connection ends (bounded)."""
        for _ in range(TRICKLES):
            if client.closed.called:
                return
            piece = b"x" * TRICKLE
            client.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            client.sent_body += TRICKLE
            yield deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_huge_content_length_answered_before_the_body(self):
        """A head declaring 5 GB gets 413 before any body byte is sent, and the broker closes the connection."""
        client = yield self.connect()
        client.transport.write(self.head(b"Content-Length: 5000000000\r\n"))
        sent_when_answered = yield client.answered.addTimeout(ANSWER_WITHIN, reactor)
        self.assertEqual(sent_when_answered, 0)
        yield self.trickle(client)
        ended = yield client.closed
        self.assertIsInstance(ended, (ConnectionDone, ConnectionLost))   # by the broker
        self.assertLess(client.sent_body, TRICKLE * TRICKLES)
        status_line = client.received.split(b"\r\n", 1)[0]
        self.assertTrue(status_line.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b'"code":"request_too_large"', client.received)
        self.assertIn(b"connection: close", client.received.lower())
        self.assertEqual(self.broker.service.registry.device("node").desired, {})

    @defer.inlineCallbacks
    def test_chunked_body_cut_off_past_the_limit(self):
        """A chunked body trickled past the limit gets 413 once it passes it, and the connection closes."""
        client = yield self.connect()
        client.transport.write(self.head(b"Transfer-Encoding: chunked\r\n"))
        for _ in range(1024 // TRICKLE + 1):                  # just past 1024 bytes
            piece = b"y" * TRICKLE
            client.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            client.sent_body += TRICKLE
        sent_when_answered = yield client.answered.addTimeout(ANSWER_WITHIN, reactor)
        self.assertEqual(sent_when_answered, 1024 + TRICKLE)
        yield self.trickle(client, chunked=True)
        ended = yield client.closed
        self.assertIsInstance(ended, (ConnectionDone, ConnectionLost))
        self.assertLess(client.sent_body, 1024 + TRICKLE * (TRICKLES + 1))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 "))
        self.assertEqual(client.received.count(b"HTTP/1.1"), 1)
