"""Other processes' changes are kept raw and decoded on first read (shared_stream.py)."""

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from broker.registry import SessionRecord, errors

from .support import SingleRedis, TwoRegistries, wait_until


class LazyStreamTests(TwoRegistries, SingleRedis, TestCase):
    """What B sees of A's changes when B does not decode them at once."""

    @defer.inlineCallbacks
    def _reported_on_a(self, name, *patches):
        """Add ``name`` on A, apply the reports there; B has them applied (raw) after."""
        provisioned = yield self.a.add_device(name)
        result = None
        for patch in patches:
            result = yield self.a.update_reported(name, patch, events=["tick"])
        yield wait_until(self, lambda: self.b.cursor >= result.cursor, what="A's reports on B")
        return provisioned.device_number

    @defer.inlineCallbacks
    def test_report_of_another_process_is_decoded_on_first_read(self):
        """B keeps A's report raw until read, then shows exactly A's view (state, history cursors, feed)."""
        number = yield self._reported_on_a("dev-1", {"t": 1.5}, {"t": 2.5, "n": 3})
        self.assertIn(number, self.b._pending)
        self.assertGreater(self.b.counters["applied_lazily"], 0)
        self.assertEqual(self.b.device("dev-1"), self.a.device("dev-1"))
        self.assertNotIn(number, self.b._pending)
        self.assertEqual(dict(self.b.device("dev-1").reported), {"t": 2.5, "n": 3})
        [entry] = [v for v in self.b.changes_since(0).devices if v.name == "dev-1"]
        self.assertEqual(entry, self.a.device("dev-1"))

    @defer.inlineCallbacks
    def test_feed_read_decodes_a_raw_state(self):
        """changes_since on B gives A's reported state even if nothing read the device before."""
        yield self._reported_on_a("dev-2", {"t": 4.0})
        [entry] = [v for v in self.b.changes_since(0).devices if v.name == "dev-2"]
        self.assertEqual(dict(entry.reported), {"t": 4.0})
        self.assertEqual(entry.version, self.a.device("dev-2").version)

    @defer.inlineCallbacks
    def test_observer_subscribed_after_raw_states_gets_decoded_views(self):
        """An observer subscribing on B after raw states arrived hears A's next report in full, with its events."""
        yield self._reported_on_a("dev-3", {"t": 1.0})
        heard = []
        self.b.subscribe(["dev-3"], heard.append)
        result = yield self.a.update_reported("dev-3", {"u": 2}, events=["boot"])
        yield wait_until(self, lambda: heard, what="B's observer")
        self.assertEqual(dict(heard[-1].reported), {"t": 1.0, "u": 2})
        self.assertEqual((heard[-1].version, heard[-1].events), (result.version, ("boot",)))

    @defer.inlineCallbacks
    def test_connection_facts_set_here_survive_a_raw_state(self):
        """Facts B learned itself while A's state was raw are kept when it is decoded (newer than A's)."""
        number = yield self._reported_on_a("dev-4", {"t": 1.0})
        self.assertIn(number, self.b._pending)
        yield self.b.set_connection("dev-4", online=False, last_heard=1e12,
                                    address=("127.0.0.1", 9))
        view = self.b.device("dev-4")
        self.assertEqual((view.last_heard, view.address), (1e12, ("127.0.0.1", 9)))
        self.assertEqual(dict(view.reported), {"t": 1.0})

    @defer.inlineCallbacks
    def test_online_flag_of_a_raw_state_is_counted(self):
        """A's online flip reaches B's online_count and view without B decoding A's state first."""
        yield self._reported_on_a("dev-5", {"t": 1.0})
        result = yield self.a.set_connection("dev-5", online=True)
        yield wait_until(self, lambda: self.b.cursor >= result.cursor, what="flip on B")
        self.assertEqual(self.b.online_count, 1)
        self.assertTrue(self.b.device("dev-5").online)

    @defer.inlineCallbacks
    def test_record_written_with_a_report_reaches_the_other_process(self):
        """A record saved in the same turn as a report rides on its stream entry; B decodes it on demand."""
        provisioned = yield self.a.add_device("dev-6")
        number = provisioned.device_number
        yield wait_until(self, lambda: self.b.device("dev-6") is not None, what="add on B")
        record = SessionRecord(session_id=9, acked_remote_num=2, seq_reservation=4096)
        report = self.a.update_reported("dev-6", {"t": 1.0})
        saved = self.a.save_session(number, record)
        result, _ = yield defer.gatherResults([report, saved])
        yield wait_until(self, lambda: self.b.cursor >= result.cursor, what="report on B")
        self.assertEqual(self.b.session_record(number), record)
        self.assertEqual(self.a.session_record(number), record)

    @defer.inlineCallbacks
    def test_states_kept_for_own_writes_are_released(self):
        """After merged concurrent writes and a version conflict, neither process keeps a sent state."""
        yield self.a.add_device("dev-7")
        yield wait_until(self, lambda: self.b.device("dev-7") is not None, what="add on B")
        writes = [registry.update_reported("dev-7", {f"k{i}": i})
                  for i in range(5) for registry in (self.a, self.b)]
        yield defer.gatherResults(writes)
        yield wait_until(self, lambda: self.a.device("dev-7").version ==
                         self.b.device("dev-7").version == 11, what="both caught up")
        version = 11
        outcomes = yield defer.DeferredList(
            [r.update_desired("dev-7", {"led": r is self.a}, expected_version=version)
             for r in (self.a, self.b)], consumeErrors=True)
        self.assertEqual(sorted(ok for ok, _ in outcomes), [False, True])
        self.assertEqual((self.a._own_states, self.b._own_states), ({}, {}))
        self.assertEqual(len(self.a.device("dev-7").reported), 5)

    @defer.inlineCallbacks
    def test_damaged_raw_state_is_logged_and_the_last_good_state_kept(self):
        """A raw state that cannot be decoded is logged on first read; the device keeps its last good state."""
        number = yield self._reported_on_a("dev-8", {"t": 1.0})
        self.b.device("dev-8")
        dev = self.b._by_number[number]
        self.b._deliver([("s", number, dev.version + 1, self.b.cursor + 1, b"\xff", b"",
                          "elsewhere", 0, None)])
        self.assertIn(number, self.b._pending)
        view = self.b.device("dev-8")
        self.assertEqual(len(self.flushLoggedErrors(errors.StoreError)), 1)
        self.assertEqual(dict(view.reported), {"t": 1.0})

    @defer.inlineCallbacks
    def test_observer_reading_only_names_decodes_nothing_and_views_are_exact(self):
        """A "*" observer reading names leaves B's state raw; a view read later still shows its own change."""
        number = yield self._reported_on_a("dev-9", {"t": 1.0})
        heard = []
        self.b.subscribe(["*"], heard.append)
        first = yield self.a.update_reported("dev-9", {"t": 2.0})
        yield wait_until(self, lambda: len(heard) == 1, what="first change on B")
        self.assertEqual((heard[0].name, heard[0].cursor), ("dev-9", first.cursor))
        self.assertIn(number, self.b._pending)
        yield self.a.update_reported("dev-9", {"t": 3.0})
        yield wait_until(self, lambda: len(heard) == 2, what="second change on B")
        self.assertEqual(dict(heard[0].reported), {"t": 2.0})
        self.assertEqual(heard[0].version, first.version)
        self.assertEqual(dict(heard[1].reported), {"t": 3.0})
        self.assertEqual(dict(self.b.device("dev-9").reported), {"t": 3.0})
