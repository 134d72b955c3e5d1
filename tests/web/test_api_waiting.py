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


class _BrokenView:
    """A device view whose JSON cannot be built (a bug somewhere below the API)."""

    def __init__(self, view):
        self._view = view

    def __getattr__(self, name):
        return getattr(self._view, name)

    def to_json(self):
        raise ValueError("broken view")


class FailingAnswerTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_wait=30.0, sse_keepalive=0.0))
        self.m.add_device("a")
        self.m.add_device("b")
        self.auth = bearer(self.m.token("read"))
        self.cursor = self.m.registry.cursor

    def break_device(self, name):
        """Make every view of device ``name`` fail to encode, in the feed and in reads."""
        registry = self.m.registry
        changes_since, device = registry.changes_since, registry.device

        def broken_changes(*args, **kwargs):
            batch = changes_since(*args, **kwargs)
            batch.devices[:] = [_BrokenView(v) if v.name == name else v for v in batch.devices]
            return batch

        def broken_device(wanted):
            view = device(wanted)
            return _BrokenView(view) if wanted == name and view is not None else view

        self.patch(registry, "changes_since", broken_changes)
        self.patch(registry, "device", broken_device)

    def poll(self, query):
        return self.m.open("GET", f"/api/v1/changes?since={self.cursor}&wait=10{query}", self.auth)

    def assertInternalError(self, exchange):
        status, headers, body = exchange.response()
        self.assertEqual((status, body["error"]["code"]), (500, "internal_error"))
        self.assertEqual(headers["Content-Type"], "application/json; charset=utf-8")

    def test_feed_answer_that_fails_to_encode(self):
        """A feed answer that raises while encoding ends its own polls with JSON 500; other waiters get theirs."""
        broken, fine = self.poll("&name=a"), self.poll("&name=b")
        stream = self.m.open("GET", f"/api/v1/events?since={self.cursor}&name=b", self.auth)
        self.break_device("a")
        self.m.registry.update_desired("a", {"v": 1})
        self.m.registry.update_desired("b", {"v": 2})
        self.m.clock.advance(0)
        self.assertInternalError(broken)
        self.assertEqual([d["desired"] for d in fine.response()[2]["devices"]], [{"v": 2}])
        events = [e for e in sse_messages(stream.stream_body()) if e.get("event") == "device"]
        self.assertEqual([e["data"]["desired"] for e in events], [{"v": 2}])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.m.api.room), 1)             # only the stream still waits

    def test_device_answer_that_fails_to_encode(self):
        """A device long poll whose answer raises is ended with JSON 500, at a change or at its deadline."""
        version = self.m.registry.device("a").version
        woken = self.m.open("GET", f"/api/v1/devices/a?version={version}&wait=10", self.auth)
        expiring = self.m.open("GET", f"/api/v1/devices/b?version={self.m.registry.device('b').version}"
                               "&wait=5", self.auth)
        self.break_device("a")
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertInternalError(woken)
        self.break_device("b")
        self.m.clock.advance(5)
        self.assertInternalError(expiring)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.assertEqual(len(self.m.api.room), 0)

    def test_write_that_fails_before_writing(self):
        """An answer whose writing raises before any byte is sent becomes JSON 500; the others are written."""
        version = self.m.registry.device("a").version
        victim = self.m.open("GET", f"/api/v1/devices/a?version={version}&wait=10", self.auth)
        polls = [self.poll("") for _ in range(2)]
        room = self.m.api.room
        respond, request = room.outbox.respond, victim.request

        def flaky(answered, status, body, headers=None):
            if answered is request and status == 200:
                for key, value in headers.items():         # as far as the real one got
                    answered.setHeader(key, value)
                raise ValueError("cannot write")
            return respond(answered, status, body, headers)

        self.patch(room.outbox, "respond", flaky)
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertInternalError(victim)
        self.assertIsNone(victim.response()[1]["ETag"])     # the failed answer's header is gone
        self.assertEqual([p.response()[0] for p in polls], [200, 200])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(room), 0)

    def test_write_that_fails_midway_closes_the_connection(self):
        """An answer that raises after its first bytes were sent closes that connection; the others are written."""
        polls = [self.poll("") for _ in range(2)]
        room = self.m.api.room
        respond, victim = room.outbox.respond, polls[0].request

        def flaky(request, status, body, headers=None):
            if request is victim:
                request.write(body[:5])
                raise ValueError("cannot finish")
            return respond(request, status, body, headers)

        self.patch(room.outbox, "respond", flaky)
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertTrue(polls[0].transport.disconnecting)
        self.assertFalse(polls[0].answered)
        self.assertEqual(polls[1].response()[0], 200)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(room), 0)

    def test_stream_that_fails_to_encode(self):
        """An event stream whose pump raises is cut off alone; other streams keep receiving."""
        broken = self.m.open("GET", f"/api/v1/events?since={self.cursor}&name=a", self.auth)
        fine = self.m.open("GET", f"/api/v1/events?since={self.cursor}&name=b", self.auth)
        self.break_device("a")
        self.m.registry.update_desired("a", {"v": 1})
        self.m.registry.update_desired("b", {"v": 2})
        self.m.clock.advance(0)
        self.assertTrue(broken.transport.disconnecting)
        events = [e for e in sse_messages(fine.stream_body()) if e.get("event") == "device"]
        self.assertEqual([e["data"]["desired"] for e in events], [{"v": 2}])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.m.api.room), 1)
