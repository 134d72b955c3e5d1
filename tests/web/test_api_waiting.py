"""The waiting room follows the registry only while something waits (task.Clock, memory transports)."""

from twisted.trial.unittest import SynchronousTestCase

from broker.web.api.settings import ApiSettings
from tests.web.api_support import MemoryAPI, bearer, sse_messages


class WaitingRoomSubscriptionTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_wait=30.0, sse_keepalive=15.0))
        self.m.add_device("a")
        self.m.add_device("b")
        self.auth = bearer(self.m.token("read"))

    def observers(self):
        return self.m.registry.observer_count("a")

    def poll(self, cursor, wait=10):
        return self.m.open("GET", f"/api/v1/changes?since={cursor}&wait={wait}", self.auth)

    def test_no_subscription_without_waiters(self):
        """A started room with nobody waiting leaves the registry with no observer at all."""
        self.assertEqual(len(self.m.api.room), 0)
        self.assertEqual(self.observers(), 0)
        self.assertFalse(self.m.registry._subs.watching)

    def test_one_subscription_while_long_polls_wait(self):
        """The first long poll subscribes once, a second shares it, the last to leave cancels it."""
        cursor = self.m.registry.cursor
        first = self.poll(cursor)
        self.assertEqual(self.observers(), 1)
        second = self.poll(cursor, wait=20)
        self.assertEqual(self.observers(), 1)
        self.m.clock.advance(10)
        self.assertTrue(first.answered)
        self.assertEqual(self.observers(), 1)
        second.disconnect()
        self.assertEqual((len(self.m.api.room), self.observers()), (0, 0))

    def test_device_poll_and_stream_hold_the_subscription(self):
        """A device long poll and an event stream each keep the subscription until they leave."""
        view = self.m.registry.device("b")
        device = self.m.open("GET", f"/api/v1/devices/b?version={view.version}&wait=10",
                             self.auth)
        stream = self.m.open("GET", "/api/v1/events?since=0", self.auth)
        self.assertEqual((len(self.m.api.room), self.observers()), (2, 1))
        self.m.registry.update_desired("b", {"v": 1})
        self.m.clock.advance(0)
        self.assertEqual(device.response()[0], 200)
        self.assertEqual(self.observers(), 1)              # the stream still waits
        stream.disconnect()
        self.assertEqual(self.observers(), 0)

    def test_changes_between_waiters_are_not_missed(self):
        """A change made while nobody waited reaches the next long poll and stream from their cursors."""
        cursor = self.m.registry.cursor
        poll = self.poll(cursor)
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertEqual(self.observers(), 0)
        answered = poll.response()[2]
        self.m.registry.update_desired("b", {"v": 2})      # nobody subscribed now
        late = self.poll(answered["cursor"])
        self.assertEqual([d["name"] for d in late.response()[2]["devices"]], ["b"])
        stream = self.m.open("GET", f"/api/v1/events?since={answered['cursor']}", self.auth)
        events = [e for e in sse_messages(stream.stream_body()) if e.get("event") == "device"]
        self.assertEqual([e["data"]["desired"] for e in events], [{"v": 2}])
        self.m.registry.update_desired("a", {"v": 3})      # subscribed again: followed live
        self.m.clock.advance(0)
        events = [e for e in sse_messages(stream.stream_body()) if e.get("event") == "device"]
        self.assertEqual([e["data"]["desired"] for e in events], [{"v": 2}, {"v": 3}])

    def test_new_waiter_after_gap_is_woken(self):
        """A long poll that starts waiting after the subscription was cancelled is woken by the next change."""
        self.m.clock.advance(10)
        first = self.poll(self.m.registry.cursor)
        self.m.clock.advance(10)
        self.assertTrue(first.answered)
        self.assertEqual(self.observers(), 0)
        poll = self.poll(self.m.registry.cursor)
        self.m.registry.update_reported("b", {"t": 1})
        self.m.clock.advance(0)
        self.assertEqual([d["reported"] for d in poll.response()[2]["devices"]], [{"t": 1}])

    def test_stop_cancels_and_start_waits_for_a_waiter(self):
        """Stopping the room drops its subscription; after a restart it comes back only with a waiter."""
        self.poll(self.m.registry.cursor)
        self.m.api.room.stop()
        self.assertEqual(self.observers(), 0)
        self.m.api.room.start()
        self.assertEqual(self.observers(), 0)
        self.poll(self.m.registry.cursor)
        self.assertEqual(self.observers(), 1)
