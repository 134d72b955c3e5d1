"""WebSocket ping frames from a client that does not read cost the broker one pong, not one each."""

from __future__ import annotations

import os
import socket
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from broker.web.websocket.messages import SUBPROTOCOL
from tests.web.test_websocket_flow import buffered
from tests.web.wsclient import eventually, start_fleet


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, masked) with a payload under 126 bytes."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


class DeafClient(Protocol):
    """Opens a WebSocket by hand, then stops reading its socket until told to."""

    def __init__(self, token: str):
        self.token = token
        self.opened = defer.Deferred()
        self.data = b""

    def connectionMade(self):
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.transport.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n"
            b"Authorization: Bearer " + self.token.encode() + b"\r\n\r\n")

    def dataReceived(self, data):
        self.data += data
        if b"\r\n\r\n" in self.data and not self.opened.called:
            self.transport.pauseProducing()
            self.opened.callback(self.data.split(b"\r\n", 1)[0])


class PingFloodTests(unittest.TestCase):
    """docs/websocket.md "Slow clients": nothing is queued without bound for a client that does not read."""

    timeout = 60

    @defer.inlineCallbacks
    def test_unread_pings_are_answered_once(self):
        """4 MB of ping frames from a client that does not read leave the send buffer within its bound, and one pong owed."""
        fleet = yield start_fleet(self, websocket={"ping_interval": 0.0, "max_behind": 600.0})
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", fleet.port, timeout=5)
        deaf = yield connectProtocol(endpoint, DeafClient(fleet.write_token))
        self.addCleanup(deaf.transport.abortConnection)
        status = yield deaf.opened
        self.assertIn(b" 101 ", status)
        (server,) = fleet.factory.clients
        server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        pings = b"".join(masked_frame(0x9, b"%03d" % n + b"p" * 122) for n in range(128))
        peak = 0
        for _ in range(256):
            deaf.transport.write(pings)
            yield task.deferLater(reactor, 0.002, lambda: None)
            peak = max(peak, buffered(server.transport))
        yield eventually(lambda: not buffered(deaf.transport), timeout=30)
        yield task.deferLater(reactor, 0.1, lambda: None)
        peak = max(peak, buffered(server.transport))
        self.assertTrue(server.sync.paused)
        self.assertEqual(server.state, server.STATE_OPEN)
        self.assertLessEqual(peak, server.transport.bufferSize + fleet.factory.max_reply_backlog)
        # The latest ping's payload is owed, and sent once the client reads again.
        self.assertEqual(server.owed_pong, b"127" + b"p" * 122)
        deaf.transport.resumeProducing()
        yield eventually(lambda: server.owed_pong is None and deaf.data.endswith(
            b"\x8a\x7d127" + b"p" * 122), timeout=30)
