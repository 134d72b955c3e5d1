"""Short and long polling of /api/v1/changes and of one device, driven by a task.Clock.

Requests are real HTTP parsed by twisted.web over memory transports
(tests.web.api_support); nothing sleeps.
"""

from twisted.trial.unittest import SynchronousTestCase

from broker.web.api import outbox
from broker.web.api.settings import ApiSettings
from tests.web.api_support import START, MemoryAPI, bearer, device_auth


class ShortPollTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self)
        for name in ("a", "b", "c"):
            self.m.add_device(name)
        self.auth = bearer(self.m.token("read"))

    def test_returns_exactly_the_changes_since_the_cursor(self):
        """A short poll returns the latest state of each device changed after the cursor, and a new cursor."""
        _, _, first = self.m.call("GET", "/api/v1/changes?since=0", self.auth)
        self.assertEqual([d["name"] for d in first["devices"]], ["a", "b", "c"])
        cursor = first["cursor"]
        self.m.registry.update_desired("c", {"x": 1})
        self.m.registry.update_desired("a", {"x": 1})
        self.m.registry.update_desired("c", {"x": 2})
        status, headers, body = self.m.call("GET", f"/api/v1/changes?since={cursor}", self.auth)
        self.assertEqual(status, 200)
        self.assertEqual([(d["name"], d["desired"]) for d in body["devices"]],
                         [("a", {"x": 1}), ("c", {"x": 2})])
        self.assertEqual(body["cursor"], self.m.registry.cursor)
        self.assertEqual((body["more"], body["reset"]), (False, False))
        _, _, again = self.m.call("GET", f"/api/v1/changes?since={body['cursor']}", self.auth)
        self.assertEqual(again["devices"], [])

    def test_advises_the_poll_interval(self):
        """A short poll carries X-Poll-Interval with the configured min_interval."""
        m = MemoryAPI(self, ApiSettings(min_interval=2.5))
        status, headers, _ = m.call("GET", "/api/v1/changes", bearer(m.token("read")))
        self.assertEqual((status, headers["X-Poll-Interval"]), (200, "2.5"))

    def test_paging_with_limit(self):
        """limit pages the feed: more is true until the last page, cursors chain without gaps."""
        names = []
        cursor = 0
        for _ in range(3):
            _, _, body = self.m.call("GET", f"/api/v1/changes?since={cursor}&limit=1", self.auth)
            names += [d["name"] for d in body["devices"]]
            cursor = body["cursor"]
            if not body["more"]:
                break
        self.assertEqual(names, ["a", "b", "c"])
        self.assertFalse(body["more"])

    def test_name_filter(self):
        """name= keeps only matching devices (prefix, or glob with * ? [)."""
        self.m.add_device("kitchen-1")
        _, _, body = self.m.call("GET", "/api/v1/changes?since=0&name=kit", self.auth)
        self.assertEqual([d["name"] for d in body["devices"]], ["kitchen-1"])
        _, _, body = self.m.call("GET", "/api/v1/changes?since=0&name=%5Bab%5D", self.auth)
        self.assertEqual([d["name"] for d in body["devices"]], ["a", "b"])

    def test_cursor_from_the_future_resets(self):
        """A cursor the broker never issued gets reset=true and a full snapshot."""
        _, _, body = self.m.call("GET", "/api/v1/changes?since=999999", self.auth)
        self.assertTrue(body["reset"])
        self.assertEqual([d["name"] for d in body["devices"]], ["a", "b", "c"])


class LongPollTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_wait=30.0, max_waiters=3))
        self.m.add_device("a")
        self.m.add_device("b")
        self.auth = bearer(self.m.token("read"))
        self.cursor = self.m.registry.cursor

    def poll(self, query=""):
        return self.m.open("GET", f"/api/v1/changes?since={self.cursor}&wait=10{query}", self.auth)

    def test_answers_on_the_next_turn_after_a_change(self):
        """A long poll waits; a change answers it on the very next reactor turn with exactly that change."""
        poll = self.poll()
        self.m.clock.advance(5)
        self.assertFalse(poll.answered)
        self.m.registry.update_reported("b", {"t": 21.5})
        self.assertFalse(poll.answered)          # not inside the registry's write
        self.m.clock.advance(0)
        status, _, body = poll.response()
        self.assertEqual(status, 200)
        self.assertEqual([(d["name"], d["reported"]) for d in body["devices"]], [("b", {"t": 21.5})])
        self.assertEqual(body["cursor"], self.m.registry.cursor)

    def test_empty_at_the_timeout(self):
        """With no change, the long poll answers an empty list and the same cursor at its timeout."""
        poll = self.poll()
        self.m.clock.advance(9.999)
        self.assertFalse(poll.answered)
        self.m.clock.advance(0.001)
        status, headers, body = poll.response()
        self.assertEqual((status, body["devices"], body["cursor"]), (200, [], self.cursor))
        self.assertNotIn("X-Poll-Interval", headers)
        self.assertEqual(len(self.m.api.room), 0)

    def test_pending_changes_answer_at_once(self):
        """A long poll whose cursor is already behind answers without waiting."""
        self.m.registry.update_desired("a", {"on": True})
        poll = self.poll()
        self.assertTrue(poll.answered)
        self.assertEqual([d["name"] for d in poll.response()[2]["devices"]], ["a"])

    def test_wait_is_cut_to_max_wait(self):
        """A wait beyond [polling] max_wait ends at max_wait."""
        poll = self.m.open("GET", f"/api/v1/changes?since={self.cursor}&wait=1000", self.auth)
        self.m.clock.advance(29.99)
        self.assertFalse(poll.answered)
        self.m.clock.advance(0.01)
        self.assertTrue(poll.answered)

    def test_waiters_share_one_timer_and_one_encoding(self):
        """Three waiters on one cursor cost one reactor timer and get identical bodies."""
        polls = [self.poll() for _ in range(3)]
        timers = [c for c in self.m.clock.getDelayedCalls()
                  if getattr(c.func, "__name__", None) == "_fire"]
        self.assertEqual(len(timers), 1)
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        bodies = {p.response()[2]["cursor"] for p in polls}
        self.assertEqual(bodies, {self.m.registry.cursor})

    def test_burst_of_changes_answered_once(self):
        """Several changes before the wake-up pass give one answer carrying all of them."""
        poll = self.poll()
        self.m.registry.update_desired("a", {"v": 1})
        self.m.registry.update_desired("b", {"v": 2})
        self.m.clock.advance(0)
        self.assertEqual([d["name"] for d in poll.response()[2]["devices"]], ["a", "b"])

    def test_filtered_waiter_ignores_other_devices(self):
        """A long poll filtered by name keeps waiting through changes of other devices."""
        poll = self.poll("&name=b")
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertFalse(poll.answered)
        self.m.registry.update_desired("b", {"v": 1})
        self.m.clock.advance(0)
        self.assertEqual([d["name"] for d in poll.response()[2]["devices"]], ["b"])

    def test_same_filter_reads_the_feed_once(self):
        """Waiters with the same cursor and filter share one feed read per wake-up pass."""
        polls = [self.poll("&name=b") for _ in range(3)]
        reads = []
        original = self.m.registry.changes_since
        self.patch(self.m.registry, "changes_since",
                   lambda *args, **kw: reads.append(args) or original(*args, **kw))
        self.m.registry.update_desired("b", {"v": 1})
        self.m.clock.advance(0)
        self.assertEqual(len(reads), 1)
        self.assertTrue(all(poll.answered for poll in polls))

    def test_disconnect_frees_the_slot(self):
        """A client that goes away mid-wait leaves the waiting room at once."""
        poll = self.poll()
        self.assertEqual(len(self.m.api.room), 1)
        poll.disconnect()
        self.assertEqual(len(self.m.api.room), 0)
        self.assertEqual(len(self.m.api.room.scheduler), 0)
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)                  # nothing is written to the dead request
        self.assertEqual(poll.raw(), b"")

    def test_full_room_answers_503(self):
        """Beyond max_waiters a long poll gets 503 too_many_waiters with Retry-After."""
        polls = [self.poll() for _ in range(3)]
        status, headers, body = self.poll().response()
        self.assertEqual((status, body["error"]["code"]), (503, "too_many_waiters"))
        self.assertEqual(headers["Retry-After"], "1")
        polls[0].disconnect()
        self.assertFalse(self.poll().answered)   # the freed slot is usable again

    def test_stop_answers_every_waiter(self):
        """Stopping the API answers waiting polls and leaves no timer behind."""
        poll = self.poll()
        self.m.api.stop()
        self.assertTrue(poll.answered)
        self.assertEqual(self.m.clock.getDelayedCalls(), [])


class DevicePollTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(offline_after=60.0))
        self.device = self.m.add_device("node-7")
        self.auth = device_auth(self.device.key)

    def test_device_long_polls_its_desired_state(self):
        """A device waiting on its version gets the new desired state when a dashboard writes it."""
        old = self.m.registry.device("node-7").version
        poll = self.m.open("GET", f"/api/v1/devices/node-7?version={old}&wait=20", self.auth)
        self.assertTrue(poll.answered)           # it went online: a new version, at once
        version = poll.response()[2]["version"]
        self.assertGreater(version, old)
        poll = self.m.open("GET", f"/api/v1/devices/node-7?version={version}&wait=20", self.auth)
        self.m.clock.advance(3)
        self.assertFalse(poll.answered)
        self.m.registry.update_desired("node-7", {"led": "on"})
        self.m.clock.advance(0)
        status, headers, body = poll.response()
        self.assertEqual((status, body["desired"], body["delta"]), (200, {"led": "on"}, {"led": "on"}))
        self.assertEqual(headers["ETag"], '"%d"' % body["version"])

    def test_device_poll_timeout_returns_same_version(self):
        """At its timeout a device poll answers the unchanged device."""
        self.m.call("GET", "/api/v1/devices/node-7", self.auth)     # goes online
        version = self.m.registry.device("node-7").version
        poll = self.m.open("GET", f"/api/v1/devices/node-7?version={version}&wait=2", self.auth)
        self.m.clock.advance(2)
        self.assertEqual(poll.response()[2]["version"], version)

    def test_removed_device_answers_404(self):
        """A device removed while polled answers 404 unknown_device."""
        token = bearer(self.m.token("read"))
        poll = self.m.open("GET", "/api/v1/devices/node-7?wait=20", token)
        self.m.registry.remove_device("node-7")
        self.m.clock.advance(0)
        status, _, body = poll.response()
        self.assertEqual((status, body["error"]["code"]), (404, "unknown_device"))

    def test_rotated_key_ends_the_poll_at_once(self):
        """A device poll waiting with a key that is then rotated is answered 401 invalid_device_key at once, never with data."""
        self.m.call("GET", "/api/v1/devices/node-7", self.auth)     # goes online
        version = self.m.registry.device("node-7").version
        poll = self.m.open("GET", f"/api/v1/devices/node-7?version={version}&wait=30", self.auth)
        self.assertFalse(poll.answered)
        self.m.result(self.m.registry.rotate_key("node-7"))
        status, headers, body = poll.response()
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_device_key"))
        self.assertIn("Device", headers["WWW-Authenticate"])
        self.assertEqual(len(self.m.api.room), 0)

    def test_rotation_leaves_other_polls_waiting(self):
        """Rotating one device's key leaves token polls of it, and other devices' polls, waiting."""
        other = self.m.add_device("node-8")
        self.m.call("GET", "/api/v1/devices/node-8", device_auth(other.key))
        version = self.m.registry.device("node-8").version
        by_device = self.m.open("GET", f"/api/v1/devices/node-8?version={version}&wait=30",
                                device_auth(other.key))
        version = self.m.registry.device("node-7").version
        by_token = self.m.open("GET", f"/api/v1/devices/node-7?version={version}&wait=30",
                               bearer(self.m.token("read")))
        self.m.result(self.m.registry.rotate_key("node-7"))
        self.m.clock.advance(1)
        self.assertFalse(by_device.answered or by_token.answered)
        self.m.registry.update_desired("node-7", {"led": "on"})
        self.m.clock.advance(0)
        self.assertEqual(by_token.response()[2]["desired"], {"led": "on"})

    def test_connection_facts_like_an_ssp_device(self):
        """An HTTP device is online with address and last_heard, stays so while waiting, then goes offline."""
        self.m.call("POST", "/api/v1/devices/node-7/reported", {
            **self.auth, b"Content-Type": b"application/json"}, {"t": 1})
        view = self.m.registry.device("node-7")
        self.assertTrue(view.online)
        self.assertEqual(view.address[0], "127.0.0.1")
        self.assertEqual(view.last_heard, self.m.clock.seconds())
        for _ in range(3):                       # 90 s of back-to-back 30 s polls
            version = self.m.registry.device("node-7").version
            poll = self.m.open("GET", f"/api/v1/devices/node-7?version={version}&wait=30", self.auth)
            self.m.clock.pump([10] * 3)
            self.assertTrue(poll.answered)
            self.assertTrue(self.m.registry.device("node-7").online)
        self.m.clock.pump([10] * 5)              # silent for 50 s: still online
        self.assertTrue(self.m.registry.device("node-7").online)
        self.m.clock.pump([10] * 2)              # silent for 70 s: offline
        view = self.m.registry.device("node-7")
        self.assertFalse(view.online)
        self.assertEqual(view.last_heard, START + 90.0)

    def waiting_poll(self, key):
        """A long poll of node-7 with ``key``, waiting (the device went online first)."""
        self.m.call("GET", "/api/v1/devices/node-7", device_auth(key))
        version = self.m.registry.device("node-7").version
        poll = self.m.open("GET", f"/api/v1/devices/node-7?version={version}&wait=30",
                           device_auth(key))
        self.m.clock.advance(0)
        self.assertFalse(poll.answered)
        return poll

    def test_removed_device_ends_its_own_poll_with_401(self):
        """A device's own poll is answered 401 invalid_device_key when the device is
        removed (its key matches no device now), as a new request with it would be."""
        poll = self.waiting_poll(self.device.key)
        self.m.result(self.m.registry.remove_device("node-7"))
        status, headers, body = poll.response()
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_device_key"))
        self.assertIn("Device", headers["WWW-Authenticate"])
        self.assertEqual(len(self.m.api.room), 0)

    def test_device_poll_never_gets_its_same_name_successor(self):
        """A device removed and added again under its name in one reactor turn (a Redis
        follower applying a batch): the old key's poll gets 401, never the new device's
        document, and does not mark the new device online."""
        poll = self.waiting_poll(self.device.key)
        self.m.registry.remove_device("node-7")
        successor = self.m.add_device("node-7")
        self.m.clock.advance(0)
        status, _, body = poll.response()
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_device_key"))
        view = self.m.registry.device("node-7")
        self.assertEqual(view.device_number, successor.device_number)
        self.assertFalse(view.online)
        self.m.clock.advance(120)                    # the presence sweep: nothing to flip
        self.assertIsNone(self.m.registry.device("node-7").last_heard)

    def test_poll_of_a_replaced_device_is_refused_in_the_wake_pass(self):
        """A key holder whose device's number changed under its name (no key watch
        heard of it) is answered 401 by the wake-up pass, not with the new device."""
        self.m.api.room._key_changed = lambda number: None   # as if the key watch missed it
        poll = self.waiting_poll(self.device.key)
        self.m.registry.remove_device("node-7")
        self.m.add_device("node-7")
        self.m.clock.advance(0)
        status, _, body = poll.response()
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_device_key"))
        self.assertFalse(self.m.registry.device("node-7").online)

    def test_token_poll_of_a_readded_device_gets_the_new_one(self):
        """A token's poll reads by name: it gets the device now named so, whose version
        is above every version of the removed one."""
        version = self.m.registry.device("node-7").version
        poll = self.m.open("GET", f"/api/v1/devices/node-7?version={version}&wait=30",
                           bearer(self.m.token("read")))
        self.m.registry.remove_device("node-7")
        successor = self.m.add_device("node-7")
        self.m.clock.advance(0)
        self.assertTrue(poll.answered, "the poll missed the new device (same version)")
        status, _, body = poll.response()
        self.assertEqual((status, body["device_number"]), (200, str(successor.device_number)))
        self.assertGreater(body["version"], version)


class AnswerSliceTests(SynchronousTestCase):

    def test_many_answers_are_spread_over_reactor_turns(self):
        """A wake-up pass writes one slice of answers at once and the rest on the next turns."""
        self.patch(outbox, "ANSWER_SLICE", 2)
        m = MemoryAPI(self)
        m.add_device("a")
        auth = bearer(m.token("read"))
        polls = [m.open("GET", "/api/v1/changes?since=1&wait=10", auth) for _ in range(5)]
        m.registry.update_desired("a", {"v": 1})
        m.api.room.wake()
        self.assertEqual(sum(poll.answered for poll in polls), 2)
        self.assertEqual(len(m.api.room), 0)             # all have left the room already
        m.clock.advance(0)
        self.assertTrue(all(poll.answered for poll in polls))

    def test_client_leaving_before_its_answer_is_written(self):
        """A client that goes away while its answer waits in the outbox gets nothing written."""
        self.patch(outbox, "ANSWER_SLICE", 1)
        m = MemoryAPI(self)
        m.add_device("a")
        auth = bearer(m.token("read"))
        first, second = (m.open("GET", "/api/v1/changes?since=1&wait=10", auth) for _ in range(2))
        m.registry.update_desired("a", {"v": 1})
        m.api.room.wake()
        late = second if first.answered else first
        late.disconnect()
        m.clock.advance(0)
        self.assertEqual(late.raw(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])
