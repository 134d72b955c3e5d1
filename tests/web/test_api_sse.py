"""Server-sent events at /api/v1/events: ids, resumption, flow control (task.Clock, memory transports)."""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from broker.web.api.settings import ApiSettings
from tests.web.api_support import Exchange, MemoryAPI, bearer, sse_messages

#: what a TCP transport holds before it pauses its producer (FileDescriptor.bufferSize).
TRANSPORT_BUFFER = 64 * 1024


class EventStreamTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(sse_keepalive=15.0, min_interval=2.0))
        for name in ("a", "b"):
            self.m.add_device(name)
        self.token = self.m.token("read")
        self.auth = bearer(self.token)

    def open(self, query="since=0", headers=None):
        return self.m.open("GET", "/api/v1/events?" + query, {**self.auth, **(headers or {})})

    def events(self, stream):
        return [m for m in sse_messages(stream.stream_body()) if m.get("event") == "device"]

    def test_headers_and_snapshot(self):
        """The stream is text/event-stream, advises retry, and starts with every device since the cursor."""
        stream = self.open()
        head = stream.raw().split(b"\r\n\r\n")[0].lower()
        self.assertIn(b"content-type: text/event-stream; charset=utf-8", head)
        self.assertIn(b"cache-control: no-store", head)
        self.assertIn(b"retry: 2000\n", stream.stream_body())
        events = self.events(stream)
        self.assertEqual([(e["data"]["name"], int(e["id"])) for e in events],
                         [("a", 1), ("b", 2)])

    def test_live_changes_follow(self):
        """A change is sent as one device event, id = its cursor, on the next reactor turn."""
        stream = self.open()
        self.m.registry.update_reported("b", {"t": 3})
        self.m.clock.advance(0)
        last = self.events(stream)[-1]
        self.assertEqual((last["data"]["reported"], int(last["id"])), ({"t": 3}, self.m.registry.cursor))

    def test_last_event_id_resumes_without_gap(self):
        """Reconnecting with Last-Event-ID yields exactly the changes after it: no gap, no repeat."""
        stream = self.open()
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        seen = self.events(stream)
        stream.disconnect()
        self.assertEqual(len(self.m.api.room), 0)
        self.m.registry.update_desired("b", {"v": 2})      # while the client is away
        self.m.registry.update_desired("a", {"v": 3})
        again = self.open(headers={b"Last-Event-ID": seen[-1]["id"]})
        resumed = self.events(again)
        self.assertEqual([(e["data"]["name"], e["data"]["desired"]) for e in resumed],
                         [("b", {"v": 2}), ("a", {"v": 3})])
        self.assertTrue(all(int(e["id"]) > int(seen[-1]["id"]) for e in resumed))

    def test_last_event_id_wins_over_since(self):
        """The browser's Last-Event-ID overrides the since= of the (unchanged) URL."""
        stream = self.open("since=0", {b"Last-Event-ID": b"1"})
        self.assertEqual([e["data"]["name"] for e in self.events(stream)], ["b"])

    def test_slow_reader_gets_latest_state_once(self):
        """While the transport is full nothing is queued; on drain each changed device goes once, latest."""
        stream = self.open()
        before = len(stream.raw())
        stream.transport.producer.pauseProducing()   # what a full transport buffer does
        for i in range(500):
            self.m.registry.update_reported("a", {"n": i})
            self.m.clock.advance(0)
        self.assertEqual(len(stream.raw()), before)
        stream.transport.producer.resumeProducing()
        events = self.events(stream)
        self.assertEqual(events[-1]["data"]["reported"], {"n": 499})
        self.assertEqual([e["data"]["name"] for e in events].count("a"), 2)   # snapshot + latest

    def test_filter_moves_last_event_id(self):
        """With name=, changes of other devices move the client's id without events."""
        stream = self.open("since=0&name=a")
        self.m.registry.update_desired("b", {"v": 1})
        self.m.clock.advance(0)
        messages = sse_messages(stream.stream_body())
        self.assertEqual([m["data"]["name"] for m in messages if m.get("event") == "device"], ["a"])
        self.assertEqual(messages[-1], {"id": str(self.m.registry.cursor)})

    def test_keepalive_comments(self):
        """An idle stream gets a comment line every sse_keepalive seconds (one timer for all)."""
        stream = self.open()
        size = len(stream.stream_body())
        self.m.clock.advance(15)
        self.assertEqual(stream.stream_body()[size:], b":\n\n")

    def test_token_in_query(self):
        """EventSource cannot set headers: ?token= authenticates a GET."""
        stream = self.m.open("GET", "/api/v1/events?token=" + self.token.decode())
        self.assertEqual(len(self.events(stream)), 2)

    def test_reset_event_for_unknown_cursor(self):
        """A cursor from the future starts with a reset event, then the snapshot."""
        stream = self.open("since=424242")
        messages = sse_messages(stream.stream_body())
        kinds = [m.get("event") for m in messages if "event" in m]
        self.assertEqual(kinds, ["reset", "device", "device"])

    def test_bad_last_event_id(self):
        """A Last-Event-ID that is not a cursor gets 400."""
        status, _, body = self.open(headers={b"Last-Event-ID": b"yesterday"}).response()
        self.assertEqual((status, body["error"]["code"]), (400, "invalid_parameter"))

    def test_streams_count_as_waiters(self):
        """Open streams take places in the waiting room; beyond max_waiters: 503."""
        m = MemoryAPI(self, ApiSettings(max_waiters=1))
        auth = bearer(m.token("read"))
        m.open("GET", "/api/v1/events", auth)
        status, _, body = m.open("GET", "/api/v1/events", auth).response()
        self.assertEqual((status, body["error"]["code"]), (503, "too_many_waiters"))

    def test_stop_ends_streams(self):
        """Stopping the API finishes every stream (the terminating chunk is sent)."""
        stream = self.open()
        self.m.api.stop()
        self.assertTrue(stream.raw().endswith(b"0\r\n\r\n"))
        self.assertEqual(len(self.m.api.room), 0)

    def test_revoked_token_ends_the_stream(self):
        """A stream whose token is revoked is ended at the next change, unsent, like the WebSocket's 4001."""
        stream = self.open()
        sent = len(self.events(stream))
        token_id = self.token.decode().partition(".")[0]
        self.m.registry.revoke_token(token_id)
        self.m.clock.advance(1.0)
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertEqual(len(self.events(stream)), sent)
        self.assertTrue(stream.raw().endswith(b"0\r\n\r\n"))
        self.assertEqual(len(self.m.api.room), 0)
        status, _, body = self.open().response()
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_token"))

    def test_revoked_token_ends_an_idle_stream(self):
        """An idle stream whose token is revoked ends by the next keepalive, freeing its place."""
        stream = self.open()
        self.m.registry.revoke_token(self.token.decode().partition(".")[0])
        self.m.clock.advance(15)
        self.assertTrue(stream.raw().endswith(b"0\r\n\r\n"))
        self.assertEqual(len(self.m.api.room), 0)

    def test_reset_moves_the_id_even_with_nothing_to_send(self):
        """After a reset with no matching device the stream's id leaves the dead cursor: one reset, not one per change."""
        stream = self.open("since=424242&name=zzz")
        for value in range(3):
            self.m.registry.update_desired("a", {"v": value})
            self.m.clock.advance(0)
        messages = sse_messages(stream.stream_body())
        self.assertEqual([m.get("event") for m in messages if "event" in m], ["reset"])
        self.assertEqual(messages[-1], {"id": str(self.m.registry.cursor)})


class PushbackTransport(StringTransport):
    """A memory transport that pushes back as a TCP one does: past TRANSPORT_BUFFER
    bytes not yet drained it pauses its streaming producer at once, in write()."""

    def __init__(self, port):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.drained = 0            # bytes of value() the client has read
        self.full = False

    def held(self) -> int:
        """Bytes written and not yet read by the client."""
        return len(self.value()) - self.drained

    def writeSequence(self, data):
        self.write(b"".join(data))

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming and not self.full \
                and self.held() > TRANSPORT_BUFFER:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The client reads everything written; the producer may write again."""
        self.drained = len(self.value())
        if self.full:
            self.full = False
            self.producer.resumeProducing()


class SlowReaderMemoryTests(SynchronousTestCase):
    """What a stream whose reader does not keep up holds in the broker."""

    def make(self, **registry):
        # etc/broker.toml's registry limits: a device with a full history is ~250 kB.
        self.m = MemoryAPI(self, ApiSettings(max_requests_per_second=0), history_size=32,
                           max_state_bytes=8192, **registry)
        self.auth = bearer(self.m.token("read"))

    def big_devices(self, count):
        for i in range(count):
            name = f"big{i}"
            self.m.add_device(name)
            for r in range(33):
                self.m.registry.update_desired(name, {"blob": f"{r}-" + "x" * 7500})
        return [f"big{i}" for i in range(count)]

    def open(self):
        transport = PushbackTransport(41000)
        channel = self.m.site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/v1/events?since=0 HTTP/1.1\r\nHost: broker.test\r\n"
                             b"Authorization: " + self.auth[b"Authorization"] + b"\r\n\r\n")
        return Exchange(channel, transport), transport

    def follow(self, transport, largest):
        """Drain the stream until it writes nothing more; each time the broker must
        hold at most the transport buffer plus one event."""
        for _ in range(200):
            self.assertLessEqual(transport.held(), TRANSPORT_BUFFER + largest + 4096)
            before = len(transport.value())
            transport.drain()
            self.m.clock.advance(0)
            if len(transport.value()) == before:
                return
        self.fail("the stream never caught up")

    def device_events(self, stream):
        return [(m["data"]["name"], int(m["id"])) for m in sse_messages(stream.stream_body())
                if m.get("event") == "device"]

    def test_non_reading_client_costs_one_buffer_and_one_event(self):
        """A reader that stops reading makes the broker hold its transport buffer and
        at most one more event, not a page of 50 devices (megabytes with big histories)."""
        self.make()
        names = self.big_devices(12)
        largest = max(len(repr(self.m.registry.device(n).to_json())) for n in names)
        stream, transport = self.open()
        self.assertLessEqual(transport.held(), TRANSPORT_BUFFER + largest + 4096)
        self.assertLess(transport.held(), 3 * largest)

    def test_slow_reader_gets_every_device_once_in_order(self):
        """Written event by event as the reader drains, the stream still sends each
        device once, in cursor order, and then follows new changes."""
        self.make()
        names = self.big_devices(12)
        largest = max(len(repr(self.m.registry.device(n).to_json())) for n in names)
        stream, transport = self.open()
        self.follow(transport, largest)
        events = self.device_events(stream)
        self.assertEqual(sorted(name for name, _ in events), sorted(names))
        self.assertEqual([c for _, c in events], sorted(c for _, c in events))
        self.m.registry.update_reported("big3", {"t": 1})
        self.m.clock.advance(0)
        self.assertEqual(self.device_events(stream)[-1],
                         ("big3", self.m.registry.device("big3").cursor))

    def test_never_stops_below_the_horizon(self):
        """A stream is not stopped on a cursor the feed would reset (below its horizon,
        once removals were forgotten): it would send the same snapshot forever."""
        self.make(feed_retention=1)
        names = self.big_devices(6)
        for name in ("r0", "r1", "r2"):
            self.m.add_device(name)
            self.m.registry.remove_device(name)
        horizon = self.m.registry.feed_horizon
        self.assertGreater(horizon, self.m.registry.device("big5").cursor)
        largest = max(len(repr(self.m.registry.device(n).to_json())) for n in names)
        stream, transport = self.open()
        self.assertGreater(transport.held(), 5 * largest)     # the whole snapshot at once
        transport.drain()
        self.m.clock.advance(0)
        messages = sse_messages(stream.stream_body())
        self.assertNotIn("reset", [m.get("event") for m in messages])
        self.assertEqual(sorted(name for name, _ in self.device_events(stream)),
                         sorted(names + ["r2"]))          # r2: its tombstone, past the horizon
