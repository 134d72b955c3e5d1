"""Long polls and event streams over real loopback sockets with a real HTTP client (treq / Agent)."""

import json

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from tests.helpers import http_pool, start_broker
from tests.web.api_support import sse_messages
from tests.web.test_api_rest import broker_config

#: a long poll must be answered this soon after a change (generous: shared, slow CI machines).
ANSWER_WITHIN = 0.25


class _Collect(Protocol):
    """Keeps the chunks of a streamed body as they arrive."""

    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(None)


class LiveTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, broker_config(self, polling={"max_wait": 1.0}))
        self.registry = self.broker.service.registry
        self.room = self.broker.service.api.room
        self.node = yield self.registry.add_device("node-1")
        yield self.registry.add_device("node-2")
        _, token = yield self.registry.add_token("write")
        self.token = token
        self.headers = {b"authorization": [b"Bearer " + token.encode()]}
        self.pool = http_pool(self)
        self.base = self.broker.http_url + "/api/v1"

    def get(self, path, headers=None):
        return treq.get(self.base + path, headers=headers or self.headers, pool=self.pool)

    @defer.inlineCallbacks
    def until(self, condition, limit=2.0):
        """Wait (reactor turns, bounded) until condition() holds."""
        waited = 0.0
        while not condition():
            self.assertLess(waited, limit, "condition not reached")
            yield deferLater(reactor, 0.005, lambda: None)
            waited += 0.005

    @defer.inlineCallbacks
    def test_long_poll_answers_right_after_a_change(self):
        """A waiting long poll gets exactly the change, within milliseconds of it."""
        cursor = self.registry.cursor
        pending = self.get(f"/changes?since={cursor}&wait=1")
        yield self.until(lambda: len(self.room) == 1)
        changed_at = reactor.seconds()
        self.registry.update_desired("node-2", {"fan": 2})
        response = yield pending
        body = yield response.json()
        elapsed = reactor.seconds() - changed_at
        self.assertEqual([(d["name"], d["desired"]) for d in body["devices"]],
                         [("node-2", {"fan": 2})])
        self.assertEqual(body["cursor"], cursor + 1)
        self.assertLess(elapsed, ANSWER_WITHIN)

    @defer.inlineCallbacks
    def test_long_poll_empty_at_timeout(self):
        """Without changes a long poll answers empty at its wait, not before."""
        cursor = self.registry.cursor
        started = reactor.seconds()
        response = yield self.get(f"/changes?since={cursor}&wait=0.3")
        body = yield response.json()
        elapsed = reactor.seconds() - started
        self.assertEqual((response.code, body["devices"], body["cursor"]), (200, [], cursor))
        self.assertGreaterEqual(elapsed, 0.29)
        self.assertLess(elapsed, 0.3 + ANSWER_WITHIN * 2)

    @defer.inlineCallbacks
    def test_disconnect_mid_wait_frees_the_slot(self):
        """A client that drops its connection while waiting leaves the waiting room at once."""
        pending = self.get(f"/changes?since={self.registry.cursor}&wait=1")
        pending.addErrback(lambda failure: None)
        yield self.until(lambda: len(self.room) == 1)
        pending.cancel()                                  # the client aborts its connection
        yield self.until(lambda: len(self.room) == 0, limit=0.5)
        self.assertEqual(self.broker.service.metrics.registry.get_sample_value("broker_longpoll_waiters"), 0)

    @defer.inlineCallbacks
    def test_device_long_polls_desired_over_http(self):
        """A device with its key long-polls itself and gets a dashboard's desired write."""
        device = {b"authorization": [b"Device " + self.node.key.encode()]}
        response = yield self.get("/devices/node-1", device)
        version = (yield response.json())["version"]
        pending = self.get(f"/devices/node-1?version={version}&wait=1", device)
        yield self.until(lambda: len(self.room) == 1)
        write = yield treq.patch(self.base + "/devices/node-1/desired", json={"led": "red"},
                                 headers=self.headers, pool=self.pool)
        self.assertEqual(write.code, 200)
        yield write.content()
        response = yield pending
        body = yield response.json()
        self.assertEqual((body["desired"], body["delta"]), ({"led": "red"}, {"led": "red"}))
        self.assertTrue(body["connection"]["online"])
        self.assertTrue(body["connection"]["address"].startswith("127.0.0.1:"))

    @defer.inlineCallbacks
    def open_stream(self, headers=None):
        agent = Agent(reactor, pool=self.pool)
        sent = Headers({b"accept": [b"text/event-stream"], **self.headers, **(headers or {})})
        response = yield agent.request(b"GET", (self.base + "/events?since=0").encode(), sent)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/event-stream; charset=utf-8"])
        body = _Collect()
        response.deliverBody(body)
        return body

    def device_events(self, body):
        return [m for m in sse_messages(body.data) if m.get("event") == "device"]

    @defer.inlineCallbacks
    def test_event_stream_resumes_with_last_event_id(self):
        """SSE over a real socket: live events, then a reconnect with Last-Event-ID loses nothing."""
        first = yield self.open_stream()
        yield self.until(lambda: len(self.device_events(first)) == 2)
        self.registry.update_reported("node-1", {"t": 1})
        yield self.until(lambda: len(self.device_events(first)) == 3)
        last_id = self.device_events(first)[-1]["id"]
        first.transport.stopProducing()                  # the browser loses the connection
        yield first.done
        yield self.until(lambda: len(self.room) == 0)
        self.registry.update_reported("node-2", {"t": 2})
        self.registry.update_reported("node-1", {"t": 3})
        second = yield self.open_stream({b"last-event-id": [last_id.encode()]})
        yield self.until(lambda: len(self.device_events(second)) == 2)
        events = self.device_events(second)
        self.assertEqual([(e["data"]["name"], e["data"]["reported"]) for e in events],
                         [("node-2", {"t": 2}), ("node-1", {"t": 3})])
        self.assertEqual([int(e["id"]) for e in events],
                         [int(last_id) + 1, int(last_id) + 2])
        second.transport.stopProducing()
        yield second.done

    @defer.inlineCallbacks
    def test_short_poll_json(self):
        """A short poll answers at once with JSON and the advised interval."""
        response = yield self.get("/changes?since=0")
        body = json.loads((yield response.content()))
        self.assertEqual([d["name"] for d in body["devices"]], ["node-1", "node-2"])
        self.assertEqual(response.headers.getRawHeaders(b"x-poll-interval"), [b"1"])
