"""The change feed without device histories: ``history=false`` on /changes and /events.

Real HTTP parsed by twisted.web over memory transports
(tests.web.api_support), time on a task.Clock; nothing sleeps.
"""

from twisted.trial.unittest import SynchronousTestCase

from broker.web.api import waiting
from broker.web.api.settings import ApiSettings
from tests.web.api_support import MemoryAPI, bearer, sse_messages


def without_history(device: dict) -> dict:
    return {key: value for key, value in device.items() if key != "history"}


class HistoryTestCase(SynchronousTestCase):
    """Two devices, each with a history of more than one entry, and a read token."""

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_wait=30.0, sse_keepalive=0.0))
        for name in ("a", "b"):
            self.m.add_device(name)
            self.m.registry.update_reported(name, {"t": 1})
        self.auth = bearer(self.m.token("read"))
        self.cursor = self.m.registry.cursor

    def get(self, query):
        return self.m.call("GET", "/api/v1/changes?" + query, self.auth)

    def poll(self, query=""):
        return self.m.open("GET", f"/api/v1/changes?since={self.cursor}&wait=10{query}", self.auth)

    def stream(self, query):
        return self.m.open("GET", "/api/v1/events?" + query, self.auth)

    def device_events(self, stream):
        return [m["data"] for m in sse_messages(stream.stream_body()) if m.get("event") == "device"]


class ShortPollHistoryTests(HistoryTestCase):

    def test_history_false_leaves_histories_out(self):
        """history=false (or 0) sends every device exactly as by default, only without its history."""
        _, _, full = self.get("since=0")
        self.assertTrue(all(len(d["history"]) == 2 for d in full["devices"]))
        for value in ("false", "0"):
            status, _, lean = self.get(f"since=0&history={value}")
            self.assertEqual(status, 200)
            self.assertEqual(lean["devices"], [without_history(d) for d in full["devices"]])
            self.assertEqual((lean["cursor"], lean["more"], lean["reset"]),
                             (full["cursor"], full["more"], full["reset"]))

    def test_history_true_is_the_default(self):
        """history=true and history=1 send the histories, as a request without the parameter does."""
        _, _, default = self.get("since=0")
        for value in ("true", "1"):
            self.assertEqual(self.get(f"since=0&history={value}")[2], default)

    def test_malformed_history_is_refused(self):
        """Any other value of history is 400 invalid_parameter naming the parameter, on both endpoints."""
        for value in ("yes", "False", "2", "", "%FF"):
            for path in ("changes", "events"):
                status, _, body = self.m.call("GET", f"/api/v1/{path}?history={value}", self.auth)
                self.assertEqual((status, body["error"]["code"]), (400, "invalid_parameter"),
                                 (path, value))
                self.assertIn("history", body["error"]["message"])
        self.assertEqual(len(self.m.api.room), 0)

    def test_lean_feed_is_much_smaller(self):
        """With a full history (history_size entries) a device without it is a fraction of the size."""
        for n in range(40):
            self.m.registry.update_reported("a", {"t": n})

        def body(query):
            raw = self.m.open("GET", "/api/v1/changes?since=0&name=a" + query, self.auth).raw()
            return raw.partition(b"\r\n\r\n")[2]
        full, lean = body(""), body("&history=false")
        self.assertEqual(len(self.m.registry.device("a").history),
                         self.m.registry.settings.history_size)
        self.assertLess(len(lean) * 4, len(full))


class LongPollHistoryTests(HistoryTestCase):

    def test_long_poll_without_history(self):
        """A long poll with history=false is woken by a change with the device but not its history."""
        poll = self.poll("&history=false")
        self.m.registry.update_desired("b", {"on": True})
        self.m.clock.advance(0)
        status, _, body = poll.response()
        self.assertEqual(status, 200)
        self.assertEqual([(d["name"], d["desired"]) for d in body["devices"]], [("b", {"on": True})])
        self.assertNotIn("history", body["devices"][0])

    def test_pending_changes_without_history(self):
        """A long poll whose cursor is already behind answers at once, without histories."""
        self.m.registry.update_desired("a", {"on": True})
        poll = self.poll("&history=false")
        self.assertEqual([sorted(d) for d in poll.response()[2]["devices"]],
                         [sorted(without_history(self.m.registry.device("a").to_json()))])

    def test_waiters_with_and_without_history_get_their_own_bodies(self):
        """Waiters on one cursor and filter, some with history and some without, each get the
        body they asked for, whether woken by a change or answered at their deadline."""
        woken = [self.poll(query) for query in ("", "&history=false", "&history=1", "&history=0")]
        self.m.registry.update_reported("a", {"t": 2})
        self.m.clock.advance(0)
        bodies = [poll.response()[2]["devices"] for poll in woken]
        self.assertEqual(["history" in devices[0] for devices in bodies], [True, False, True, False])
        self.assertEqual(bodies[0][0]["history"][-1]["data"], {"t": 2})
        self.assertEqual(without_history(bodies[0][0]), bodies[1][0])

        self.cursor = self.m.registry.cursor
        expiring = [self.poll(query) for query in ("&history=false", "")]
        self.m.registry.update_reported("b", {"t": 3})   # in the feed before the wake-up pass:
        self.m.clock.advance(10)                          # the deadline answers it
        bodies = [poll.response()[2]["devices"] for poll in expiring]
        self.assertEqual(["history" in devices[0] for devices in bodies], [False, True])

    def test_mixed_waiters_read_the_feed_once_and_encode_once_per_kind(self):
        """A wake-up pass reads the feed once for waiters that differ only in history, and
        encodes one body with histories and one without, however many wait."""
        polls = [self.poll("&history=false" if i % 2 else "") for i in range(10)]
        reads, encodings = [], []
        changes_since = self.m.registry.changes_since
        self.patch(self.m.registry, "changes_since",
                   lambda *args, **kw: reads.append(args) or changes_since(*args, **kw))
        changes_body = waiting.changes_body
        self.patch(waiting, "changes_body",
                   lambda *args, **kw: encodings.append(args) or changes_body(*args, **kw))
        self.m.registry.update_desired("a", {"v": 1})
        self.m.clock.advance(0)
        self.assertTrue(all(poll.answered for poll in polls))
        self.assertEqual((len(reads), len(encodings)), (1, 2))


class EventStreamHistoryTests(HistoryTestCase):

    def test_stream_without_history(self):
        """/events?history=false sends the snapshot and live changes without histories."""
        lean, full = self.stream("since=0&history=false"), self.stream("since=0")
        self.m.registry.update_reported("a", {"t": 5})
        self.m.clock.advance(0)
        lean_events, full_events = self.device_events(lean), self.device_events(full)
        self.assertEqual([d["name"] for d in lean_events], ["a", "b", "a"])
        self.assertEqual(lean_events, [without_history(d) for d in full_events])
        self.assertTrue(all(d["history"] for d in full_events))

    def test_resumed_stream_keeps_leaving_history_out(self):
        """A stream reopened with Last-Event-ID (same URL) resumes without histories."""
        stream = self.stream("since=0&history=0")
        last = sse_messages(stream.stream_body())[-1]["id"]
        stream.disconnect()
        self.m.registry.update_desired("b", {"v": 1})
        again = self.m.open("GET", "/api/v1/events?since=0&history=0",
                            {**self.auth, b"Last-Event-ID": last})
        events = self.device_events(again)
        self.assertEqual([(d["name"], d["desired"]) for d in events], [("b", {"v": 1})])
        self.assertNotIn("history", events[0])
