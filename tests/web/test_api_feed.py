"""The size of /changes answers: a byte cap per page that clients following the cursor never notice."""

from twisted.trial.unittest import SynchronousTestCase

from broker.web.api.feed import MAX_PAGE_BYTES, changes_body
from broker.web.api.settings import ApiSettings
from broker.web.responses import json_bytes
from tests.web.api_support import MemoryAPI, bearer


class ChangesPageBytesTests(SynchronousTestCase):

    def make(self, **registry):
        # etc/broker.toml's registry limits: a device with a full history is ~130 kB
        # (history_bytes).
        self.m = MemoryAPI(self, ApiSettings(max_requests_per_second=0), history_size=32,
                           max_state_bytes=8192, **registry)
        self.auth = bearer(self.m.token("read"))

    def big_devices(self, count, prefix="big"):
        names = [f"{prefix}{i}" for i in range(count)]
        for name in names:
            self.m.add_device(name)
            self.touch(name)
        return names

    def touch(self, name, rounds=33):
        for r in range(rounds):
            self.m.registry.update_desired(name, {"blob": f"{r}-" + "x" * 7500})

    def largest(self, names):
        return max(len(json_bytes(self.m.registry.device(n).to_json())) for n in names)

    def poll(self, since, query=""):
        exchange = self.m.open("GET", f"/api/v1/changes?since={since}{query}", self.auth)
        status, _, body = exchange.response()
        self.assertEqual(status, 200)
        return len(exchange.raw().partition(b"\r\n\r\n")[2]), body

    def test_short_poll_answer_is_capped_by_bytes(self):
        """A short poll of devices with big histories answers about MAX_PAGE_BYTES of
        them (not up to 1000 devices), with more: true and the cursor of its last one."""
        self.make()
        names = self.big_devices(12)
        size, body = self.poll(0)
        self.assertLessEqual(size, MAX_PAGE_BYTES + self.largest(names) + 1024)
        self.assertLess(len(body["devices"]), len(names))
        self.assertTrue(body["more"])
        self.assertEqual(body["cursor"], body["devices"][-1]["cursor"])

    def test_following_the_cursor_gets_every_device_once(self):
        """A client that follows cursor and more through capped pages gets each device
        once, in cursor order, as from one big page, and ends at the feed's cursor."""
        self.make()
        names = self.big_devices(24)
        cursor, seen, pages = 0, [], 0
        while True:
            _, body = self.poll(cursor, "&history=true")
            seen += [(d["name"], d["cursor"]) for d in body["devices"]]
            cursor = body["cursor"]
            pages += 1
            if not body["more"]:
                break
        self.assertGreater(pages, 2)
        self.assertEqual([n for n, _ in seen], names)
        self.assertEqual(cursor, self.m.registry.cursor)

    def test_long_poll_answer_is_capped_too(self):
        """A long poll woken by many big changes in one turn gets a capped page as well."""
        self.make()
        names = self.big_devices(12)
        since = self.m.registry.cursor
        poll = self.m.open("GET", f"/api/v1/changes?since={since}&wait=30", self.auth)
        for name in names:
            self.touch(name, rounds=1)
        self.m.clock.advance(0)
        status, _, body = poll.response()
        self.assertEqual(status, 200)
        self.assertLess(len(body["devices"]), len(names))
        self.assertEqual((body["more"], body["cursor"]), (True, body["devices"][-1]["cursor"]))

    def test_a_page_never_ends_below_the_horizon(self):
        """Once removals were forgotten, the first page still holds every device unchanged
        since then, whatever its size: a cursor below the horizon would be reset again."""
        self.make(feed_retention=1)
        names = self.big_devices(8)
        for name in ("r0", "r1", "r2"):
            self.m.add_device(name)
            self.m.registry.remove_device(name)
        self.assertGreater(self.m.registry.feed_horizon, self.m.registry.device("big7").cursor)
        size, body = self.poll(0)
        self.assertGreater(size, MAX_PAGE_BYTES)
        self.assertEqual([d["name"] for d in body["devices"]][:8], names)
        _, after = self.poll(body["cursor"])
        self.assertFalse(after["reset"])

    def test_small_answers_are_unchanged(self):
        """Below the cap the answer is json_bytes of the whole page, byte for byte."""
        self.make()
        self.m.add_device("a")
        self.m.add_device("b")
        batch = self.m.registry.changes_since(0, 1000)
        self.assertEqual(changes_body(batch, batch.devices),
                         json_bytes({"devices": [v.to_json() for v in batch.devices],
                                     "cursor": batch.cursor, "more": batch.more,
                                     "reset": batch.reset}))
