"""The dashboard WebSocket protocol end to end: a real broker, a real Autobahn client, loopback."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from tests.web.wsclient import connected, start_fleet


class SubscribeTests(unittest.TestCase):
    """Snapshots, live updates and the device shape."""

    timeout = 30

    @defer.inlineCallbacks
    def test_snapshot_then_report_arrives(self):
        """A subscriber gets a snapshot of the matching devices, then each reported change."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        page = yield client.request({"op": "subscribe", "id": "s1", "patterns": ["pump-*"]})
        self.assertEqual((page["type"], page["full"], page["done"]), ("snapshot", True, True))
        self.assertEqual(sorted(d["name"] for d in page["devices"]), ["pump-1", "pump-2"])
        self.assertEqual(page["cursor"], fleet.registry.cursor)

        yield fleet.registry.update_reported("pump-1", {"temp": 21.5})
        update = yield client.expect("update")
        self.assertEqual(update["device"]["reported"], {"temp": 21.5})
        self.assertEqual(update["device"], fleet.registry.device("pump-1").to_json())
        self.assertEqual(update["cursor"], fleet.registry.cursor)

    @defer.inlineCallbacks
    def test_unsubscribed_device_is_not_sent(self):
        """Changes of devices outside the patterns, or after unsubscribe, are not sent."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        yield client.request({"op": "subscribe", "id": 1, "patterns": ["pump-1", "valve-*"]})
        fleet.registry.update_reported("pump-2", {"x": 1})
        answer = yield client.request({"op": "unsubscribe", "id": 2, "patterns": ["valve-*"]})
        self.assertEqual(answer, {"type": "result", "id": 2, "op": "unsubscribe",
                                  "patterns": ["pump-1"]})
        fleet.registry.update_reported("valve-1", {"x": 1})
        fleet.registry.update_reported("pump-1", {"x": 2})
        update = yield client.expect("update")
        self.assertEqual(update["device"]["name"], "pump-1")
        yield client.request({"op": "ping", "id": 3})
        self.assertEqual([m for m in client.received if m["type"] == "update"], [])

    @defer.inlineCallbacks
    def test_removed_device_is_announced(self):
        """Removing a subscribed device sends an update marked removed."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        yield client.request({"op": "subscribe", "id": 1, "patterns": ["*"]})
        yield fleet.registry.remove_device("valve-1")
        update = yield client.expect("update")
        self.assertEqual((update["device"]["name"], update["device"]["removed"]), ("valve-1", True))

    @defer.inlineCallbacks
    def test_history_can_be_left_out(self):
        """subscribe with history false leaves history out of pages and updates; get has it all."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        page = yield client.request({"op": "subscribe", "id": 1, "patterns": ["pump-1"],
                                     "history": False})
        self.assertNotIn("history", page["devices"][0])
        fleet.registry.update_reported("pump-1", {"x": 1})
        update = yield client.expect("update")
        expected = fleet.registry.device("pump-1").to_json()
        del expected["history"]
        self.assertEqual(update["device"], expected)
        answer = yield client.request({"op": "get", "id": 2, "name": "pump-1"})
        self.assertEqual(answer["device"], fleet.registry.device("pump-1").to_json())

    @defer.inlineCallbacks
    def test_get_and_ping(self):
        """get answers one device (or unknown_device); ping answers pong with the cursor."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        answer = yield client.request({"op": "get", "id": "g", "name": "valve-1"})
        self.assertEqual(answer["device"], fleet.registry.device("valve-1").to_json())
        answer = yield client.request({"op": "get", "id": "h", "name": "nope"})
        self.assertEqual((answer["type"], answer["code"], answer["op"]),
                         ("error", "unknown_device", "get"))
        answer = yield client.request({"op": "ping", "id": 7})
        self.assertEqual(answer, {"type": "pong", "id": 7, "cursor": fleet.registry.cursor})

    @defer.inlineCallbacks
    def test_too_many_subscriptions(self):
        """Patterns beyond max_subscriptions are refused with too_many_subscriptions."""
        fleet = yield start_fleet(self, websocket={"max_subscriptions": 2})
        client = yield connected(self, fleet.url, fleet.read_token)
        answer = yield client.request({"op": "subscribe", "id": 1, "patterns": ["a", "b", "c"]})
        self.assertEqual(answer["code"], "too_many_subscriptions")
        answer = yield client.request({"op": "subscribe", "id": 2, "patterns": ["a", "b"]})
        self.assertEqual(answer["type"], "snapshot")


class WriteTests(unittest.TestCase):
    """set_desired: results, conflicts and roles."""

    timeout = 30

    @defer.inlineCallbacks
    def test_set_desired_reaches_registry(self):
        """set_desired changes the registry and answers with the new version and the id."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        answer = yield client.request({"op": "set_desired", "id": "w1", "name": "pump-1",
                                       "desired": {"speed": 3, "mode": "eco"}})
        view = fleet.registry.device("pump-1")
        self.assertEqual(answer, {"type": "result", "id": "w1", "op": "set_desired",
                                  "name": "pump-1", "version": view.version,
                                  "cursor": view.cursor})
        self.assertEqual(dict(view.desired), {"speed": 3, "mode": "eco"})
        answer = yield client.request({"op": "set_desired", "id": "w2", "name": "pump-1",
                                       "desired": {"mode": None},
                                       "expected_version": view.version})
        self.assertEqual(answer["type"], "result")
        self.assertEqual(dict(fleet.registry.device("pump-1").desired), {"speed": 3})

    @defer.inlineCallbacks
    def test_version_conflict(self):
        """A stale expected_version is refused with version_conflict and the current version."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        before = fleet.registry.device("pump-1")
        answer = yield client.request({"op": "set_desired", "id": 9, "name": "pump-1",
                                       "desired": {"on": True},
                                       "expected_version": before.version + 5})
        self.assertEqual((answer["type"], answer["code"], answer["id"], answer["current_version"]),
                         ("error", "version_conflict", 9, before.version))
        self.assertEqual(fleet.registry.device("pump-1").version, before.version)

    @defer.inlineCallbacks
    def test_registry_refusals_are_precise(self):
        """Unknown devices and invalid keys come back with the registry's own codes."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        answer = yield client.request({"op": "set_desired", "id": 1, "name": "ghost",
                                       "desired": {"on": True}})
        self.assertEqual(answer["code"], "unknown_device")
        answer = yield client.request({"op": "set_desired", "id": 2, "name": "pump-1",
                                       "desired": {"bad key!": 1}})
        self.assertEqual(answer["code"], "invalid_key")
        answer = yield client.request({"op": "set_desired", "id": 3, "name": "x" * 10_000,
                                       "desired": {"on": True}})
        self.assertEqual(answer["code"], "invalid_name")
        self.assertLess(len(answer["message"]), 200)

    @defer.inlineCallbacks
    def test_bytes_values_are_written_as_sent(self):
        """A {"$bytes": base64} value in set_desired is stored as bytes, as over REST."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        answer = yield client.request({"op": "set_desired", "id": "b1", "name": "pump-1",
                                       "desired": {"blob": {"$bytes": "AAE="}}})
        self.assertEqual(answer["type"], "result", answer)
        self.assertEqual(dict(fleet.registry.device("pump-1").desired), {"blob": b"\x00\x01"})
        answer = yield client.request({"op": "set_desired", "id": "b2", "name": "pump-1",
                                       "desired": {"blob": {"$bytes": "not base64!"}}})
        self.assertEqual((answer["type"], answer["code"], answer["id"]),
                         ("error", "invalid_json", "b2"))
        self.assertIn("base64", answer["message"])

    @defer.inlineCallbacks
    def test_text_that_is_not_unicode_is_invalid_json(self):
        """An unpaired surrogate escape in a write is invalid_json for its id; the link stays up."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        for field, value in (("desired", {"s": "\ud800"}), ("command", ["\udc00"])):
            op = "set_desired" if field == "desired" else "command"
            target = "name" if field == "desired" else "device"
            answer = yield client.request({"op": op, "id": op, target: "pump-1", field: value})
            self.assertEqual((answer["type"], answer["id"], answer["code"]),
                             ("error", op, "invalid_json"))
        client.send({"op": "ping", "id": "\ud800"})      # an id that cannot be echoed
        answer = yield client.expect("error")
        self.assertEqual((answer["id"], answer["code"]), (None, "invalid_json"))

    @defer.inlineCallbacks
    def test_write_failing_at_once_is_answered_and_not_counted(self):
        """A set_desired whose registry call raises at once gets its answer and frees its slot."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        (server,) = fleet.factory.clients

        def broken(*args, **kwargs):
            raise KeyError("bug")

        self.patch(fleet.registry, "update_desired", broken)
        answer = yield client.request({"op": "set_desired", "id": "w", "name": "pump-1",
                                       "desired": {"on": True}})
        self.assertEqual((answer["type"], answer["id"], answer["code"]),
                         ("error", "w", "internal_error"))
        self.assertEqual(server.inflight, 0)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    @defer.inlineCallbacks
    def test_command_failing_unexpectedly_is_answered(self):
        """A command whose answer fails with a bug gets internal_error for its id, and is logged."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        self.patch(fleet.factory.commands, "send",
                   lambda name, command: defer.fail(KeyError("bug")))
        answer = yield client.request({"op": "command", "id": "c9", "device": "pump-1",
                                       "command": 1})
        self.assertEqual((answer["type"], answer["id"], answer["op"], answer["code"]),
                         ("error", "c9", "command", "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        answer = yield client.request({"op": "ping", "id": "after"})
        self.assertEqual(answer["type"], "pong")

    @defer.inlineCallbacks
    def test_read_token_cannot_write(self):
        """A read token (given as a subprotocol) subscribes but set_desired is forbidden."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token, via="subprotocol")
        answer = yield client.request({"op": "set_desired", "id": "x", "name": "pump-1",
                                       "desired": {"on": True}})
        self.assertEqual((answer["type"], answer["code"], answer["id"]),
                         ("error", "forbidden", "x"))
        self.assertEqual(dict(fleet.registry.device("pump-1").desired), {})
        page = yield client.request({"op": "subscribe", "id": "s", "patterns": ["pump-1"]})
        self.assertEqual(page["type"], "snapshot")


class BadMessageTests(unittest.TestCase):
    """Every malformed request gets a precise error, and nobody else notices."""

    timeout = 30

    CASES = [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_message"),
        (b'{"id": 1}', "invalid_message"),
        (b'{"op": "fly", "id": 1}', "unknown_op"),
        (b'{"op": "subscribe", "id": 1}', "invalid_field"),
        (b'{"op": "subscribe", "id": 1, "patterns": "pump-*"}', "invalid_field"),
        (b'{"op": "subscribe", "id": 1, "patterns": ["no spaces"]}', "invalid_pattern"),
        (b'{"op": "subscribe", "id": 1, "patterns": ["a"], "cursor": -1}', "invalid_field"),
        (b'{"op": "set_desired", "id": 1, "name": "pump-1", "desired": [1]}', "invalid_field"),
        (b'{"op": "ping", "id": 1, "extra": true}', "invalid_field"),
        (b'{"op": "ping", "id": {"a": 1}}', "invalid_field"),
        (b"[" * 100_00 + b"]" * 100_00, "invalid_json"),
    ]

    @defer.inlineCallbacks
    def test_each_bad_message_gets_its_code(self):
        """Each malformed message is answered by an error with its precise code."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.write_token)
        for payload, code in self.CASES:
            client.send(payload)
            answer = yield client.expect("error")
            self.assertEqual(answer["code"], code, payload[:60])
            self.assertTrue(answer["message"])
        client.sendMessage(b"\x00\x01", isBinary=True)
        answer = yield client.expect("error")
        self.assertEqual(answer["code"], "binary_not_supported")
        answer = yield client.request({"op": "ping", "id": "still-here"})
        self.assertEqual(answer["type"], "pong")

    @defer.inlineCallbacks
    def test_bad_client_does_not_disturb_others(self):
        """Another client keeps its updates while one sends garbage."""
        fleet = yield start_fleet(self)
        good = yield connected(self, fleet.url, fleet.read_token)
        bad = yield connected(self, fleet.url, fleet.write_token)
        yield good.request({"op": "subscribe", "id": 1, "patterns": ["pump-1"]})
        for payload, _ in self.CASES:
            bad.send(payload)
        fleet.registry.update_reported("pump-1", {"v": 1})
        update = yield good.expect("update")
        self.assertEqual(update["device"]["reported"], {"v": 1})
        self.assertEqual(len([m for m in good.received if m["type"] == "error"]), 0)


class LifecycleTests(unittest.TestCase):
    """Stop and reload of the broker as seen by dashboards."""

    timeout = 30

    @defer.inlineCallbacks
    def test_stop_says_going_away(self):
        """Stopping the broker closes dashboards with 1001 and a reason."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        self.assertEqual(len(fleet.service.connections), 1)
        yield fleet.service.stopService()
        was_clean, code, reason = yield client.closed
        self.assertEqual((was_clean, code, reason), (True, 1001, "broker shutting down"))
        self.assertEqual(len(fleet.service.connections), 0)

    @defer.inlineCallbacks
    def test_reload_applies_new_limits(self):
        """A reloaded config limits connections opened after it; a bad one changes nothing."""
        from broker.config import replace
        from tests.web.wsclient import HandshakeRefused, connect

        fleet = yield start_fleet(self)
        config = fleet.service.config
        yield connected(self, fleet.url, fleet.read_token)
        service = fleet.service.getServiceNamed("websocket")
        service.reload(replace(config, "websocket", ping_interval=0.5))
        self.assertEqual(fleet.factory.autoPingInterval, config.websocket.ping_interval)
        service.reload(replace(config, "websocket", max_clients=1, max_behind=8.0))
        self.assertEqual(fleet.factory.max_behind, 8.0)
        failure = yield self.assertFailure(connect(fleet.url, fleet.read_token), HandshakeRefused)
        self.assertIn("[503]", str(failure))
