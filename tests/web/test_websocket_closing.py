"""A connection the broker has closed, or whose token is gone, carries no request out."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from broker.web.websocket.messages import CLOSE_GOING_AWAY, CLOSE_TOKEN_REVOKED
from tests.web.wsclient import DeafToCloseClient, connected, eventually, start_fleet

WRITE = {"op": "set_desired", "id": "w", "name": "pump-1", "desired": {"late": True}}


class ClosingConnectionTests(unittest.TestCase):
    """Requests arriving while the broker waits for the client's close frame are dropped."""

    timeout = 30

    @defer.inlineCallbacks
    def closing_client(self, fleet, token):
        """A client that ignores close frames, connected and subscribed to pump-1."""
        client = yield connected(self, fleet.url, token, client=DeafToCloseClient)
        yield client.request({"op": "subscribe", "id": "s", "patterns": ["pump-1"]})
        return client

    @defer.inlineCallbacks
    def test_requests_after_the_revocation_close_are_dropped(self):
        """After the broker closed a connection with 4001, its set_desired and subscribe are not carried out."""
        fleet = yield start_fleet(self)
        token_id, token = yield fleet.registry.add_token("write")
        client = yield self.closing_client(fleet, token)
        yield fleet.registry.revoke_token(token_id)
        yield eventually(lambda: client.close_code is not None)
        self.assertEqual(client.close_code, CLOSE_TOKEN_REVOKED)
        client.send(WRITE)
        client.send({"op": "subscribe", "id": "s2", "patterns": ["valve-1"]})
        yield eventually(lambda: fleet.factory.counters["dropped_closing"] == 2)
        self.assertEqual(fleet.registry.device("pump-1").to_json()["desired"], {})
        self.assertEqual(fleet.registry.device("pump-1").version, 1)

    @defer.inlineCallbacks
    def test_requests_after_the_shutdown_close_are_dropped(self):
        """After the broker said 1001 (shutting down), a set_desired from a valid token is not applied."""
        fleet = yield start_fleet(self)
        client = yield self.closing_client(fleet, fleet.write_token)
        fleet.factory.close_all()
        yield eventually(lambda: client.close_code is not None)
        self.assertEqual(client.close_code, CLOSE_GOING_AWAY)
        client.send(WRITE)
        yield eventually(lambda: fleet.factory.counters["dropped_closing"] == 1)
        self.assertEqual(fleet.registry.device("pump-1").to_json()["desired"], {})

    @defer.inlineCallbacks
    def test_write_with_a_token_revoked_since_the_last_round_closes_at_once(self):
        """A set_desired whose token was revoked after the last housekeeping round is refused by closing with 4001."""
        fleet = yield start_fleet(self)
        token_id, token = yield fleet.registry.add_token("write")
        client = yield connected(self, fleet.url, token)
        revoked = fleet.registry.revoke_token(token_id)
        client.send(WRITE)     # reaches the broker before its next round (up to 1 s away)
        yield revoked
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (CLOSE_TOKEN_REVOKED, "access token revoked"))
        self.assertEqual(fleet.registry.device("pump-1").to_json()["desired"], {})
        self.assertEqual([m for m in client.received if m.get("id") == "w"], [])
