"""A process whose change-stream entries were trimmed unread catches up with everything:
devices, tokens, keys, and the devices whose sessions it holds."""

import redis
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry.redis_connection import RedisOptions
from broker.registry.redis_follow import _trimmed
from broker.registry.shared import open_shared_registry

from .redis_support import CuttingProxy, start_server
from .support import wait_until

FEED = "{ssp}:feed"


class TrimmedTests(SynchronousTestCase):
    """How the stream reader tells, from entry ids, that entries were trimmed unread."""

    def test_a_stream_still_holding_the_last_entry_read_lost_nothing(self):
        """The stream's first id at or before the last entry read: no gap."""
        self.assertFalse(_trimmed(b"7-0", b"3-0", b"9-0"))
        self.assertFalse(_trimmed("7-2", "7-2", "8-0"))

    def test_the_very_next_id_after_the_last_entry_read_is_no_gap(self):
        """The last entry read is gone, but the first one read is the next id."""
        self.assertFalse(_trimmed(b"7-2", b"7-3", b"7-3"))

    def test_a_stream_starting_after_the_last_entry_read_is_a_gap(self):
        """The last entry read is gone and the first one read is a later cursor (a side
        entry of the last cursor may have been trimmed), or the stream is empty."""
        self.assertTrue(_trimmed(b"7-0", b"8-0", b"8-0"))
        self.assertTrue(_trimmed(b"7-0", b"7-5", b"7-5"))
        self.assertTrue(_trimmed(b"7-0", None, b"8-0"))

    def test_nothing_read_from_no_stream_leaves_it_to_the_cursors(self):
        """Before the first entry of a stream that did not exist at load, ids prove nothing."""
        self.assertFalse(_trimmed("0-0", b"5-0", b"5-0"))


class StreamGapTests(TestCase):
    """Catching up after entries were trimmed before this process read them."""

    timeout = 60

    def setUp(self):
        self.redis_port = start_server(self)
        self.direct = redis.Redis(host="127.0.0.1", port=self.redis_port)
        self.addCleanup(self.direct.close)

    def open_registry(self, port=None, **presence):
        presence.setdefault("lease_ttl", 0)
        registry = open_shared_registry(
            RedisOptions(url=f"redis://127.0.0.1:{port or self.redis_port}/0", timeout=1.0),
            reactor=reactor, **presence)
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    @defer.inlineCallbacks
    def cut_off(self, a, b, proxy, changes):
        """Run ``changes`` on A while B is cut off, trim every entry of the stream,
        write one more change and let B back: B's next read follows its last one."""
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B in step")
        proxy.hold()
        yield a.add_device("dev-x")     # answers the XREAD B had already sent
        yield changes()
        self.direct.xtrim(FEED, maxlen=0)
        yield a.update_reported("dev-1", {"t": 1})
        proxy.release()
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B in step again")

    @defer.inlineCallbacks
    def test_a_token_revoked_during_a_gap_is_refused_once_caught_up(self):
        """A token revoked on A, and a device added, while B was cut off (their entries
        trimmed): B's catch-up refuses the token as soon as it has the device."""
        proxy = CuttingProxy(self, self.redis_port)
        a = self.open_registry()
        b = self.open_registry(proxy.port)
        token_id, text = yield a.add_token("write")
        yield a.add_device("dev-1")
        yield wait_until(self, lambda: b.check_token(text) == "write", what="B has the token")

        @defer.inlineCallbacks
        def changes():
            yield a.revoke_token(token_id)
            yield a.add_device("dev-y")
        yield self.cut_off(a, b, proxy, changes)
        self.assertEqual(b.counters["stream_resync"], 1)
        self.assertIsNotNone(b.device("dev-y"))
        self.assertIsNone(b.check_token(text))

    @defer.inlineCallbacks
    def test_side_entries_trimmed_without_a_cursor_gap_are_caught_up(self):
        """A revoke and a key rotation (entries without a cursor of their own) trimmed
        while B was cut off, the next change's cursor right after B's last one: B sees
        the gap by the stream's ids, catches up, refuses the token and has the new key."""
        proxy = CuttingProxy(self, self.redis_port)
        a = self.open_registry()
        b = self.open_registry(proxy.port)
        token_id, text = yield a.add_token("write")
        yield a.add_device("dev-1")
        yield wait_until(self, lambda: b.check_token(text) == "write", what="B has the token")
        rotated = []

        @defer.inlineCallbacks
        def changes():
            yield a.revoke_token(token_id)
            rotated.append((yield a.rotate_key("dev-1")))
        yield self.cut_off(a, b, proxy, changes)
        self.assertEqual(b.counters["stream_resync"], 1)
        self.assertIsNone(b.check_token(text))
        self.assertEqual(b.secret_for(rotated[0].device_number), rotated[0].secret)

    @defer.inlineCallbacks
    def test_a_process_started_on_an_emptied_stream_sees_no_gap(self):
        """A process that loads while the stream is empty (trimmed to nothing) follows
        it from the last id it gave: later changes are no gap."""
        a = self.open_registry()
        yield a.add_device("dev-1")
        self.direct.xtrim(FEED, maxlen=0)
        b = self.open_registry()
        yield a.update_reported("dev-1", {"t": 1})
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B in step")
        self.assertEqual(b.counters["stream_resync"], 0)
        self.assertEqual(dict(b.device("dev-1").reported), {"t": 1})

    @defer.inlineCallbacks
    def test_a_catch_up_lets_devices_marked_offline_meanwhile_go(self):
        """B holds dev-1's session and is cut off past its lease and past the stream; A
        marks dev-1 offline. B's catch-up cannot tell that from a device that moved
        and went offline elsewhere: dev-1 stays offline, held by nobody, until B
        hears the device again (its connection facts claim it)."""
        proxy = CuttingProxy(self, self.redis_port)
        lease = {"lease_ttl": 2.0, "lease_check_interval": 0.5}
        a = self.open_registry(**lease)
        b = self.open_registry(proxy.port, **lease)
        yield a.add_device("dev-1")
        yield wait_until(self, lambda: b.device("dev-1") is not None, what="B has dev-1")
        yield b.set_connection("dev-1", online=True)
        yield wait_until(self, lambda: a.device("dev-1").online, what="A sees it online")
        proxy.hold()
        yield a.add_device("dev-x")     # answers the XREAD B had already sent
        yield wait_until(self, lambda: not a.device("dev-1").online, timeout=15,
                         what="A marked B's device offline")
        self.direct.xtrim(FEED, maxlen=0)
        yield a.update_reported("dev-x", {"t": 1})
        proxy.release()
        yield wait_until(self, lambda: b.counters["stream_resync"] == 1, what="B's catch-up")
        number = b.device("dev-1").device_number
        self.assertNotIn(number, b._held)
        self.assertFalse(b.device("dev-1").online)
        self.assertIsNone(self.direct.hget(b._store.device_key(number), "h"))
        yield b.set_connection("dev-1", online=True)      # the device's next datagram
        yield wait_until(self, lambda: a.device("dev-1").online, timeout=5,
                         what="dev-1 online again, held by B")
        self.assertEqual(self.direct.hget(b._store.device_key(number), "h"),
                         b.origin.encode())

    @defer.inlineCallbacks
    def test_a_device_that_moved_and_went_offline_stays_offline_after_a_catch_up(self):
        """B held dev-1; while B is cut off the device moves to A and goes offline there;
        B's catch-up does not claim it (the stream path would have dropped it too)."""
        proxy = CuttingProxy(self, self.redis_port)
        a = self.open_registry()
        b = self.open_registry(proxy.port)
        yield a.add_device("dev-1")
        yield wait_until(self, lambda: b.device("dev-1") is not None, what="B has dev-1")
        yield b.set_connection("dev-1", online=True)
        number = a.device("dev-1").device_number

        @defer.inlineCallbacks
        def moved_and_offline():
            yield a.set_connection("dev-1", online=True)      # the device moved to A
            yield a.set_connection("dev-1", online=False)     # and went offline there
        yield self.cut_off(a, b, proxy, moved_and_offline)
        self.assertEqual(b.counters["stream_resync"], 1)
        self.assertEqual(b.counters["presence_reclaimed"], 0)
        self.assertNotIn(number, b._held)
        self.assertFalse(b.device("dev-1").online)
        self.assertIsNone(self.direct.hget(b._store.device_key(number), "h"))
