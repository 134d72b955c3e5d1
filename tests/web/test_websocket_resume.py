"""Reconnecting with a cursor: exactly the missed latest states, over real connections."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from tests.web.wsclient import connected, start_fleet


@defer.inlineCallbacks
def close(client):
    """Close a client cleanly and wait until it is closed."""
    client.sendClose(1000)
    yield client.closed


class ResumeTests(unittest.TestCase):
    """subscribe with a cursor after a disconnect."""

    timeout = 30

    @defer.inlineCallbacks
    def test_reconnect_gets_exactly_the_missed_latest_states(self):
        """Only devices changed while away come back, once each, at their latest state."""
        fleet = yield start_fleet(self)
        registry = fleet.registry
        client = yield connected(self, fleet.url, fleet.read_token)
        yield client.request({"op": "subscribe", "id": 1, "patterns": ["pump-*"]})
        registry.update_reported("pump-1", {"t": 1})
        registry.update_reported("pump-2", {"t": 1})
        update = yield client.expect(match=lambda m: m.get("device", {}).get("name") == "pump-2")
        cursor = update["cursor"]
        self.assertEqual(cursor, registry.cursor)
        yield close(client)

        registry.update_reported("pump-1", {"t": 2})
        registry.update_reported("valve-1", {"t": 2})
        registry.update_reported("pump-1", {"t": 3})

        again = yield connected(self, fleet.url, fleet.read_token)
        page = yield again.request({"op": "subscribe", "id": 2, "patterns": ["pump-*"],
                                    "cursor": cursor})
        self.assertEqual((page["full"], page["done"]), (False, True))
        self.assertEqual(page["devices"], [registry.device("pump-1").to_json()])
        self.assertEqual(page["devices"][0]["reported"], {"t": 3})
        self.assertEqual(page["cursor"], registry.cursor)

        registry.update_reported("pump-2", {"t": 4})
        update = yield again.expect("update")
        self.assertEqual(update["device"]["reported"], {"t": 4})

    @defer.inlineCallbacks
    def test_nothing_missed_gives_an_empty_page(self):
        """Resuming from the current cursor sends no device at all."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        page = yield client.request({"op": "subscribe", "id": 1, "patterns": ["*"],
                                     "cursor": fleet.registry.cursor})
        self.assertEqual((page["devices"], page["full"], page["done"]), ([], False, True))

    @defer.inlineCallbacks
    def test_removal_while_away_is_resumed(self):
        """A device removed while the client was away comes back as a removed entry."""
        fleet = yield start_fleet(self)
        cursor = fleet.registry.cursor
        yield fleet.registry.remove_device("pump-2")
        client = yield connected(self, fleet.url, fleet.read_token)
        page = yield client.request({"op": "subscribe", "id": 1, "patterns": ["pump-*"],
                                     "cursor": cursor})
        self.assertEqual([(d["name"], d.get("removed")) for d in page["devices"]],
                         [("pump-2", True)])

    @defer.inlineCallbacks
    def test_unknown_cursor_is_told_and_gets_a_snapshot(self):
        """A cursor the broker cannot serve is answered with a reset and a full snapshot."""
        fleet = yield start_fleet(self)
        client = yield connected(self, fleet.url, fleet.read_token)
        page = yield client.request({"op": "subscribe", "id": 1, "patterns": ["pump-*"],
                                     "cursor": fleet.registry.cursor + 1000})
        self.assertEqual((page["full"], page["done"], page["reset"]["code"]),
                         (True, True, "cursor_expired"))
        self.assertEqual(sorted(d["name"] for d in page["devices"]), ["pump-1", "pump-2"])


class DurableResumeTests(unittest.TestCase):
    """Cursors survive a broker restart on the SQLite store."""

    timeout = 60

    @defer.inlineCallbacks
    def test_resume_across_broker_restart(self):
        """A cursor taken before a restart resumes after it, without a reset."""
        from tests.helpers import loopback_config, start_broker
        from tests.web.wsclient import Fleet

        config = loopback_config(self, ssp={"enabled": False})
        self.assertEqual(config.registry.backend, "sqlite")
        running = yield start_broker(self, config)
        registry = running.service.registry
        for name in ("pump-1", "pump-2"):
            yield registry.add_device(name)
        _, token = yield registry.add_token("write")
        fleet = Fleet(running, token, token)
        client = yield connected(self, fleet.url, token)
        page = yield client.request({"op": "subscribe", "id": 1, "patterns": ["*"]})
        answer = yield client.request({"op": "set_desired", "id": 2, "name": "pump-1",
                                       "desired": {"mode": "eco"}})
        self.assertEqual(answer["type"], "result")
        update = yield client.expect("update")
        cursor = update["cursor"]
        self.assertGreater(cursor, page["cursor"])
        yield running.service.stopService()

        running = yield start_broker(self, config)
        registry = running.service.registry
        yield registry.update_reported("pump-2", {"t": 5})
        again = yield connected(self, running.http_url, token)
        page = yield again.request({"op": "subscribe", "id": 3, "patterns": ["*"],
                                    "cursor": cursor})
        self.assertNotIn("reset", page)
        self.assertEqual([(d["name"], d["reported"]) for d in page["devices"]],
                         [("pump-2", {"t": 5})])
