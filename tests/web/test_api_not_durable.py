"""A write the store failed after it was applied is 503 not_durable, never store_error.

Real HTTP (and a real WebSocket) against a broker on loopback with the
SQLite registry; the store fails as a full disk would (a trigger refusing
every update of a device row, from another connection), and recovers when
the trigger is dropped.
"""

import sqlite3

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from broker.registry.errors import StoreError
from tests.helpers import start_broker
from tests.web.test_api_rest import Client, broker_config, header
from tests.web.wsclient import connected


def break_storage(registry):
    """Make every write of a device's row fail (as a full disk would); returns the
    connection whose ``execute("DROP TRIGGER full_disk")`` repairs it."""
    conn = sqlite3.connect(registry._store.path, isolation_level=None)
    conn.execute("CREATE TRIGGER full_disk BEFORE UPDATE ON devices"
                 " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    return conn


def repair(conn):
    conn.execute("DROP TRIGGER full_disk")
    conn.close()


def events_in(device):
    """The event batches of a device document's history, in order."""
    return [entry["data"] for entry in device["history"] if entry["kind"] == "events"]


class NotDurableTests(TestCase):
    """HTTP writes while the SQLite store fails."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.config = broker_config(self, registry={"backend": "sqlite"},
                                    websocket={"enabled": True})
        yield self.start()
        prov = yield self.registry.add_device("porch")
        _, token = yield self.registry.add_token("write")
        self.write = b"Bearer " + token.encode()
        self.device = b"Device " + prov.key.encode()

    @defer.inlineCallbacks
    def start(self):
        self.broker = yield start_broker(self, self.config)
        self.registry = self.broker.service.registry
        self.client = Client(self, self.broker.http_url)

    @defer.inlineCallbacks
    def restart(self):
        """Stop the broker cleanly (it stores what it holds) and start it again."""
        yield self.broker.service.stopService()
        yield self.start()

    def assertNotDurable(self, status, headers, body):
        self.assertEqual((status, body["error"]["code"], body["error"]["applied"]),
                         (503, "not_durable", True), body)
        self.assertIsNone(header(headers, b"retry-after"))   # sending it again applies it twice
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 0)

    @defer.inlineCallbacks
    def test_events_refused_by_the_store_are_applied_and_stored_once(self):
        """Events whose commit failed are answered 503 not_durable (applied), are in the
        device at once, and are stored once when the store recovers, without a resend."""
        broken = break_storage(self.registry)
        status, headers, body = yield self.client.call(
            "POST", "/devices/porch/events", self.device, {"events": [{"button": 2}]})
        self.assertNotDurable(status, headers, body)
        _, _, now = yield self.client.call("GET", "/devices/porch", self.device)
        self.assertEqual(events_in(now), [[{"button": 2}]])
        repair(broken)
        yield self.restart()
        _, _, stored = yield self.client.call("GET", "/devices/porch", self.device)
        self.assertEqual(events_in(stored), [[{"button": 2}]])

    @defer.inlineCallbacks
    def test_desired_and_reported_writes_refused_by_the_store_are_not_durable(self):
        """A desired patch and a report whose commit failed are 503 not_durable, and
        the device shows both while the store still fails."""
        broken = break_storage(self.registry)
        self.addCleanup(repair, broken)
        answers = yield defer.gatherResults([
            self.client.call("PATCH", "/devices/porch/desired", self.write, {"led": "on"}),
            self.client.call("POST", "/devices/porch/reported", self.device, {"temp": 21})])
        for status, headers, body in answers:
            self.assertNotDurable(status, headers, body)
        device = self.registry.device("porch")
        self.assertEqual((device.desired, device.reported), ({"led": "on"}, {"temp": 21}))

    @defer.inlineCallbacks
    def test_write_that_changed_nothing_is_store_error(self):
        """An empty report (it changes nothing) while a failed commit is unstored is 503
        store_error with Retry-After (nothing of it applied: sending it again is safe)."""
        broken = break_storage(self.registry)
        self.addCleanup(repair, broken)
        status, headers, body = yield self.client.call(
            "POST", "/devices/porch/reported", self.device, {"temp": 21})
        self.assertNotDurable(status, headers, body)
        version = self.registry.device("porch").version
        status, headers, body = yield self.client.call(
            "POST", "/devices/porch/reported", self.device, {})
        self.assertEqual((status, body["error"]["code"]), (503, "store_error"), body)
        self.assertNotIn("applied", body["error"])
        self.assertEqual(header(headers, b"retry-after"), "1")
        self.assertEqual(self.registry.device("porch").version, version)

    @defer.inlineCallbacks
    def test_websocket_set_desired_refused_by_the_store_is_not_durable(self):
        """A WebSocket set_desired whose commit failed is answered not_durable with
        "applied": true, and the device holds the change."""
        _, token = yield self.registry.add_token("write")
        client = yield connected(self, self.broker.http_url, token)
        broken = break_storage(self.registry)
        self.addCleanup(repair, broken)
        answer = yield client.request({"op": "set_desired", "id": "w1", "name": "porch",
                                       "desired": {"led": "off"}})
        self.assertEqual((answer["type"], answer["code"], answer["applied"]),
                         ("error", "not_durable", True), answer)
        self.assertEqual(self.registry.device("porch").desired, {"led": "off"})


class EventsBodyTests(TestCase):
    """What an events body may hold."""

    timeout = 30

    @defer.inlineCallbacks
    def test_too_many_events_is_invalid_events(self):
        """More than max_events (64) events is 400 invalid_events (as none), and nothing
        is applied."""
        broker = yield start_broker(self, broker_config(self, http={"max_request_bytes": 4096}))
        registry = broker.service.registry
        prov = yield registry.add_device("porch")
        client = Client(self, broker.http_url)
        device = b"Device " + prov.key.encode()
        version = registry.device("porch").version
        status, _, body = yield client.call("POST", "/devices/porch/events", device,
                                            {"events": list(range(65))})
        self.assertEqual((status, body["error"]["code"]), (400, "invalid_events"), body)
        self.assertIn("at most 64 events", body["error"]["message"])
        self.assertEqual(registry.device("porch").version, version)
        status, _, _ = yield client.call("POST", "/devices/porch/events", device,
                                         {"events": list(range(64))})
        self.assertEqual(status, 200)
