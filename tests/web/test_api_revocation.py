"""Requests that wait (long polls, event streams) end once their access token is revoked (task.Clock)."""

from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SynchronousTestCase

from broker.web.api.settings import ApiSettings
from tests.web.api_support import MemoryAPI, bearer, device_auth, sse_messages


class RevokedLongPollTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_wait=30.0, sse_keepalive=0.0))
        self.m.add_device("a")
        self.token = self.m.token("read")
        self.auth = bearer(self.token)

    def revoke(self, token=None):
        self.m.registry.revoke_token((token or self.token).decode().partition(".")[0])

    def feed_poll(self, wait=20):
        return self.m.open("GET", f"/api/v1/changes?since={self.m.registry.cursor}&wait={wait}",
                           self.auth)

    def device_poll(self, wait=20):
        version = self.m.registry.device("a").version
        return self.m.open("GET", f"/api/v1/devices/a?version={version}&wait={wait}", self.auth)

    def assertRevoked(self, poll):
        status, headers, body = poll.response()
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_token"))
        self.assertIn("Bearer", headers["WWW-Authenticate"])
        self.assertNotIn("devices", body)

    def test_feed_poll_answered_401_within_a_second(self):
        """A waiting /changes long poll is answered 401 invalid_token within a second of revocation."""
        poll = self.feed_poll()
        self.m.clock.advance(0.3)
        self.revoke()
        self.m.clock.advance(0.99)
        self.assertRevoked(poll)
        self.assertEqual(len(self.m.api.room), 0)

    def test_device_poll_answered_401_within_a_second(self):
        """A waiting device long poll (version + wait) with a revoked token is answered 401 within a second."""
        poll = self.device_poll()
        self.revoke()
        self.m.clock.advance(1.0)
        self.assertRevoked(poll)
        self.assertEqual(len(self.m.api.room), 0)

    def test_no_data_after_revocation_on_a_change(self):
        """A change right after revocation (before the periodic check) wakes the poll with 401, not data."""
        feed, device = self.feed_poll(), self.device_poll()
        self.revoke()
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertRevoked(feed)
        self.assertRevoked(device)

    def test_no_data_after_revocation_at_the_deadline(self):
        """A deadline that falls before the periodic check answers 401, not the empty page or the device."""
        feed, device = self.feed_poll(wait=0.5), self.device_poll(wait=0.5)
        self.revoke()
        self.m.clock.advance(0.5)
        self.assertRevoked(feed)
        self.assertRevoked(device)

    def test_other_tokens_and_device_keys_keep_waiting(self):
        """Revoking one token answers only its waiters: another token's poll and a device's own poll still wait."""
        other = self.m.token("read")
        device = self.m.add_device("node")
        self.m.call("GET", "/api/v1/devices/node", device_auth(device.key))    # goes online
        version = self.m.registry.device("node").version
        own = self.m.open("GET", f"/api/v1/devices/node?version={version}&wait=20",
                          device_auth(device.key))
        kept = self.m.open("GET", f"/api/v1/changes?since={self.m.registry.cursor}&wait=20",
                           bearer(other))
        revoked = self.feed_poll()
        self.revoke()
        self.m.clock.advance(1.0)
        self.assertRevoked(revoked)
        self.assertFalse(own.answered)
        self.assertFalse(kept.answered)
        self.m.registry.update_reported("a", {"t": 1})
        self.m.clock.advance(0)
        self.assertEqual(kept.response()[0], 200)


class TokenCheckTimerTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_wait=30.0, sse_keepalive=0.0))
        self.m.add_device("a")
        self.token = self.m.token("read")
        self.auth = bearer(self.token)

    def check_timers(self):
        room = self.m.api.room
        return [call for call in self.m.clock.getDelayedCalls()
                if isinstance(call.func, LoopingCall) and call.func.f == room.tokens.check]

    def test_idle_stream_ends_without_keepalives(self):
        """With sse_keepalive = 0, an idle stream whose token is revoked ends within a second, without a change."""
        stream = self.m.open("GET", "/api/v1/events?since=0", self.auth)
        sent = sse_messages(stream.stream_body())
        self.m.clock.advance(5)
        self.m.registry.revoke_token(self.token.decode().partition(".")[0])
        self.m.clock.advance(1.0)
        self.assertTrue(stream.raw().endswith(b"0\r\n\r\n"))
        self.assertEqual(sse_messages(stream.stream_body()), sent)
        self.assertEqual(len(self.m.api.room), 0)

    def test_one_timer_for_every_waiter_and_none_when_idle(self):
        """Streams and long polls share one once-a-second check timer, which stops when the last leaves."""
        streams = [self.m.open("GET", "/api/v1/events?since=0", self.auth) for _ in range(3)]
        polls = [self.m.open("GET", f"/api/v1/changes?since={self.m.registry.cursor}&wait=20",
                             self.auth) for _ in range(2)]
        self.assertEqual(len(self.check_timers()), 1)
        self.m.clock.advance(2.5)
        self.assertEqual(len(self.check_timers()), 1)
        for exchange in streams + polls:
            exchange.disconnect()
        self.assertEqual(self.check_timers(), [])

    def test_stop_stops_the_timer(self):
        """Stopping the API leaves no token check timer behind."""
        self.m.open("GET", "/api/v1/events?since=0", self.auth)
        self.m.api.stop()
        self.assertEqual(self.check_timers(), [])
