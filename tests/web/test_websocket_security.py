"""Who may connect, and Autobahn's unsafe defaults, each decided and checked on a real socket."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from broker.web.websocket.messages import CLOSE_TOKEN_REVOKED, SUBPROTOCOL
from tests.helpers import http_json
from tests.web.wsclient import HandshakeRefused, connect, connected, eventually, start_fleet


HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n")


class _Collect(Protocol):
    """Sends one raw request and keeps everything received until the broker closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


@defer.inlineCallbacks
def raw_answer(port: int, request: bytes):
    """(status, {lower-case header name: value}) of the broker's answer to raw request bytes."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    protocol = yield connectProtocol(endpoint, _Collect(request))
    data = yield protocol.done.addTimeout(10, reactor)
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


class HandshakeTests(unittest.TestCase):
    """Tokens, subprotocol and origins are checked before the connection opens."""

    timeout = 30

    @defer.inlineCallbacks
    def refused(self, fleet, token, **kwargs):
        """The reason text of a refused handshake (fails the test if it opens)."""
        failure = yield self.assertFailure(connect(fleet.url, token, **kwargs), HandshakeRefused)
        return str(failure)

    @defer.inlineCallbacks
    def test_token_is_required_and_checked(self):
        """No token and an unknown token are refused with 401, logged at info level
        only (a refusal is an answer, not a warning)."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fleet = yield start_fleet(self)
        reason = yield self.refused(fleet, None)
        self.assertIn("[401]", reason)
        self.assertIn("access token required", reason)
        reason = yield self.refused(fleet, "abc.def")
        self.assertIn("[401]", reason)
        self.assertIn("invalid or revoked access token", reason)
        self.assertEqual(fleet.factory.counters["refused_401"], 2)
        yield task.deferLater(reactor, 0.1, lambda: None)     # the drops are logged
        warnings = [formatEvent(event) for event in events
                    if event.get("log_level") is not None
                    and event["log_level"] >= LogLevel.warn
                    and "ServerProtocol" in (event.get("log_namespace") or "")]
        self.assertEqual(warnings, [])
        self.assertTrue([event for event in events
                         if "refused" in (event.get("log_format") or "")])

    @defer.inlineCallbacks
    def test_token_subprotocol_is_not_echoed(self):
        """A token given as a subprotocol works and the broker answers with the JSON subprotocol only."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token, via="subprotocol")
        self.assertEqual(client.websocket_protocol_in_use, SUBPROTOCOL)
        self.assertNotIn(fleet.write_token, client.http_response_data.decode())

    @defer.inlineCallbacks
    def test_subprotocol_is_required(self):
        """A client that does not offer ssp-broker.v1.json is refused with 400."""
        fleet = yield start_fleet(self)
        reason = yield self.refused(fleet, fleet.write_token, protocols=["chat"])
        self.assertIn("[400]", reason)
        self.assertIn(SUBPROTOCOL, reason)

    @defer.inlineCallbacks
    def test_wrong_origin_is_refused(self):
        """A page from an origin not allowed is refused with 403 naming the origin."""
        fleet = yield start_fleet(self, http={"allowed_origins": ["https://dash.example.com"]})
        reason = yield self.refused(fleet, fleet.write_token, origin="https://evil.example.com")
        self.assertIn("[403]", reason)
        self.assertIn("https://evil.example.com:443", reason)
        # Same host, other port or scheme: another origin.
        reason = yield self.refused(fleet, fleet.write_token, origin="http://dash.example.com")
        self.assertIn("[403]", reason)

    @defer.inlineCallbacks
    def test_null_origin_is_refused(self):
        """The null origin (sandboxed frames, file: pages) is refused."""
        fleet = yield start_fleet(self, http={"allowed_origins": ["*"]})
        reason = yield self.refused(fleet, fleet.write_token, origin="null")
        self.assertIn("[403]", reason)
        self.assertIn("null", reason)

    @defer.inlineCallbacks
    def test_allowed_and_own_origins_connect(self):
        """The configured origin (default port implied) and the broker's own origin connect."""
        fleet = yield start_fleet(self, http={"allowed_origins": ["https://dash.example.com"]})
        client = yield connected(self, fleet.url, fleet.read_token,
                                 origin="https://dash.example.com")
        self.assertEqual(client.websocket_protocol_in_use, SUBPROTOCOL)
        own = yield connected(self, fleet.url, fleet.read_token,
                              origin=f"http://127.0.0.1:{fleet.port}")
        self.assertEqual(own.websocket_protocol_in_use, SUBPROTOCOL)

    @defer.inlineCallbacks
    def test_max_clients(self):
        """Beyond max_clients connections the handshake is refused with 503."""
        fleet = yield start_fleet(self, websocket={"max_clients": 2})
        yield connected(self, fleet.url, fleet.read_token)
        yield connected(self, fleet.url, fleet.read_token)
        reason = yield self.refused(fleet, fleet.read_token)
        self.assertIn("[503]", reason)

    @defer.inlineCallbacks
    def test_refusals_carry_the_headers_their_status_needs(self):
        """401 has WWW-Authenticate, 405 Allow, 426 Upgrade and 503 Retry-After (RFC 9110)."""
        fleet = yield start_fleet(self, websocket={"max_clients": 1})
        status, headers = yield raw_answer(fleet.port, HANDSHAKE + b"\r\n")
        self.assertEqual(status, 401)
        self.assertTrue(headers.get("www-authenticate", "").startswith("Bearer"), headers)
        status, headers = yield raw_answer(fleet.port, b"POST /ws HTTP/1.1\r\n"
                                           b"Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((status, headers.get("allow")), (405, "GET"))
        status, headers = yield raw_answer(fleet.port, b"GET /ws HTTP/1.1\r\n"
                                           b"Host: 127.0.0.1\r\n\r\n")
        self.assertEqual((status, headers.get("upgrade")), (426, "websocket"))
        yield connected(self, fleet.url, fleet.read_token)
        status, headers = yield raw_answer(
            fleet.port, HANDSHAKE + b"Authorization: Bearer " + fleet.read_token.encode()
            + b"\r\n\r\n")
        self.assertEqual((status, headers.get("retry-after")), (503, "1"))

    @defer.inlineCallbacks
    def test_revoked_token_is_closed(self):
        """A connection whose token is revoked is closed with 4001."""
        fleet = yield start_fleet(self)
        token_id, token = yield fleet.registry.add_token("read")
        client = yield connected(self, fleet.url, token)
        yield fleet.registry.revoke_token(token_id)
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (CLOSE_TOKEN_REVOKED, "access token revoked"))


class AutobahnDefaultsTests(unittest.TestCase):
    """Autobahn's defaults that do not suit a public broker, overridden."""

    timeout = 30

    @defer.inlineCallbacks
    def test_plain_get_gets_no_status_page(self):
        """A plain GET on /ws is answered 426, not with Autobahn's HTML status page."""
        fleet = yield start_fleet(self)
        status, headers, body = yield http_json(self, "GET", fleet.url + "/ws")
        self.assertEqual(status, 426)
        self.assertNotIn(b"autobahn", body.lower() if isinstance(body, bytes) else b"")
        self.assertFalse(headers.hasHeader(b"server")
                         and b"Autobahn" in b"".join(headers.getRawHeaders(b"server")))

    @defer.inlineCallbacks
    def test_handshake_names_no_server(self):
        """The 101 answer carries no Server header naming the library and its version."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        self.assertNotIn("server", client.http_headers)

    @defer.inlineCallbacks
    def test_nagle_is_off(self):
        """The broker's side of a dashboard connection has TCP_NODELAY set."""
        import socket
        fleet = yield start_fleet(self)
        yield connected(self, fleet.url, fleet.read_token)
        (server,) = fleet.factory.clients
        handle = server.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @defer.inlineCallbacks
    def test_compression_is_declined(self):
        """A client offering permessage-deflate gets no compression."""
        from autobahn.websocket.compress import PerMessageDeflateOffer
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token,
                                 offers=[PerMessageDeflateOffer()])
        self.assertEqual(client.websocket_extensions_in_use, [])

    @defer.inlineCallbacks
    def test_oversized_message_is_closed_with_reason(self):
        """A message over max_message_bytes closes that connection with 1009; others carry on."""
        fleet = yield start_fleet(self, websocket={"max_message_bytes": 1024})
        other = yield connected(self, fleet.url, fleet.read_token)
        yield other.request({"op": "subscribe", "id": 1, "patterns": ["pump-1"]})
        big = yield connected(self, fleet.url, fleet.read_token)
        big.send({"op": "ping", "id": "x" * 2000})
        was_clean, code, reason = yield big.closed
        self.assertEqual(code, 1009)
        self.assertIn("exceeds payload limit of 1024 octets", reason)
        fleet.registry.update_reported("pump-1", {"v": 1})
        update = yield other.expect("update")
        self.assertEqual(update["device"]["reported"], {"v": 1})

    @defer.inlineCallbacks
    def test_dead_peer_is_dropped_by_auto_ping(self):
        """A peer that stops answering pings is dropped after ping_interval + ping_timeout (+1 s)."""
        fleet = yield start_fleet(self, websocket={"ping_interval": 1.0, "ping_timeout": 1.0})
        client = yield connected(self, fleet.url, fleet.read_token)
        (server,) = fleet.factory.clients
        self.assertEqual((server.autoPingInterval, server.autoPingTimeout), (1.0, 2.0))
        client.stop_reading()
        yield eventually(lambda: not fleet.factory.clients, timeout=6.0)
        self.assertEqual(server.wasNotCleanReason,
                         "WebSocket ping timeout (peer did not respond with pong in time)")
        client.start_reading()
        yield client.closed

    @defer.inlineCallbacks
    def test_live_client_survives_auto_ping(self):
        """A client that reads keeps its connection across several ping rounds."""
        fleet = yield start_fleet(self, websocket={"ping_interval": 1.0, "ping_timeout": 1.0})
        client = yield connected(self, fleet.url, fleet.read_token)
        (server,) = fleet.factory.clients
        yield task.deferLater(reactor, 3.5, lambda: None)
        self.assertFalse(client.closed.called)
        self.assertEqual(fleet.factory.clients, {server})
        self.assertGreaterEqual(server.autoPingPendingSeq, 2)

    @defer.inlineCallbacks
    def test_sub_second_ping_settings_are_refused(self):
        """ping settings between 0 and 1 s stop startup with a ConfigError naming the key."""
        from broker.config import ConfigError
        from tests.helpers import loopback_config, start_broker
        config = loopback_config(self, ssp={"enabled": False}, registry={"backend": "memory"},
                                 websocket={"ping_timeout": 0.2})
        failure = yield self.assertFailure(start_broker(self, config), ConfigError)
        self.assertIn("websocket.ping_timeout", str(failure))


class FramingTests(unittest.TestCase):
    """Frames Autobahn itself refuses, each with its close code."""

    timeout = 30

    @defer.inlineCallbacks
    def test_invalid_utf8_text_is_closed_with_1007(self):
        """A text frame that is not UTF-8 closes that connection with 1007."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        client.sendMessage(b'{"op": "ping", "id": "\xff"}')
        _, code, _ = yield client.closed
        self.assertEqual(code, 1007)

    @defer.inlineCallbacks
    def test_metrics_count_clients_and_messages(self):
        """broker_websocket_clients follows open connections; messages are counted both ways."""
        fleet = yield start_fleet(self)
        metrics = fleet.service.metrics
        client = yield connected(self, fleet.url, fleet.read_token)
        yield client.request({"op": "ping", "id": 1})
        self.assertEqual(metrics.websocket_clients._value.get(), 1)
        # Message counts reach Prometheus at the next housekeeping tick (<= 1 s).
        messages = metrics.websocket_messages
        yield eventually(lambda: messages.labels("in")._value.get() == 1, timeout=3.0)
        self.assertEqual(messages.labels("out")._value.get(), 1)
        client.sendClose(1000)
        yield client.closed
        yield eventually(lambda: metrics.websocket_clients._value.get() == 0)


BAD_TOKEN_HANDSHAKE = HANDSHAKE + b"Authorization: Bearer not-a-token\r\n\r\n"


class RefusalAccountingTests(unittest.TestCase):
    """Refused handshakes in the metrics and the log: counted each, logged sparingly."""

    timeout = 60

    @defer.inlineCallbacks
    def test_handshake_answers_counted_in_http_requests_total(self):
        """Each handshake answer Autobahn writes (401, 426, 101) counts in
        broker_http_requests_total under its status, as the Site's own answers do."""
        fleet = yield start_fleet(self)

        def answers(status):
            return fleet.service.metrics.registry.get_sample_value(
                "broker_http_requests_total", {"status": status}) or 0
        for _ in range(3):
            status, _ = yield raw_answer(fleet.port, BAD_TOKEN_HANDSHAKE)
            self.assertEqual(status, 401)
        status, _ = yield raw_answer(fleet.port, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(status, 426)
        yield connected(self, fleet.url, fleet.read_token)
        self.assertEqual((answers("401"), answers("426"), answers("101")), (3, 1, 1))

    @defer.inlineCallbacks
    def test_refused_handshakes_do_not_flood_the_log(self):
        """30 handshakes with a wrong token write at most one info line a second (and none
        of Autobahn's "failing WebSocket opening handshake"), the rest at debug level."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fleet = yield start_fleet(self)
        started = reactor.seconds()
        for _ in range(30):
            status, _ = yield raw_answer(fleet.port, BAD_TOKEN_HANDSHAKE)
            self.assertEqual(status, 401)
        elapsed = reactor.seconds() - started
        about = [event for event in events if "handshake" in (event.get("log_format") or "")]
        info = [event for event in about if event.get("log_level") >= LogLevel.info]
        self.assertTrue(info)
        self.assertLessEqual(len(info), 1 + int(elapsed), [formatEvent(e) for e in info])
        self.assertEqual([e for e in info if "failing" in e["log_format"]], [])
        debug = [event for event in about if event.get("log_level") == LogLevel.debug
                 and "refused" in event["log_format"]]
        self.assertEqual(len(info) + len(debug), 30)


class RefusalLogTests(unittest.SynchronousTestCase):
    """The refused handshakes' log on a Clock: one info line a second, with a count."""

    def test_one_info_line_a_second_naming_the_others(self):
        """Refusals within a second of an info line go to debug; the next info line says
        how many there were."""
        from twisted.internet.task import Clock
        from twisted.logger import Logger

        from broker.web.websocket.endpoint import RefusalLog

        events = []
        clock = Clock()
        refusals = RefusalLog(clock, Logger(observer=events.append))
        for _ in range(5):
            refusals.refused("tcp:127.0.0.1:5000", 401, "invalid or revoked access token")
            clock.advance(0.1)
        clock.advance(0.5)
        refusals.refused("tcp:127.0.0.1:5001", 403, "origin 'null' is not allowed")
        levels = [event["log_level"] for event in events]
        self.assertEqual(levels, [LogLevel.info] + [LogLevel.debug] * 4 + [LogLevel.info])
        self.assertEqual(events[-1]["suppressed"], 4)
        self.assertIn("4 more refused", formatEvent(events[-1]))
        self.assertIn("403", formatEvent(events[-1]))
        self.assertEqual(refusals.suppressed, 0)
