"""Tests for the hot write path of broker.registry.registry: the fast
path of update_reported, device numbers as names, update_reported_many,
save_sessions."""

from twisted.trial.unittest import SynchronousTestCase

from broker.metrics import InstrumentedStore, Metrics
from broker.registry import MemoryStore, SessionRecord, errors
from broker.registry.model import UpdateResult
from .helpers import START, make_registry

READINGS = {"temperature": 20.5, "humidity": 41.0, "pressure": 1013.25}


class FastPathTests(SynchronousTestCase):
    """The one-pass path (known keys, numbers) behaves exactly like the full path."""

    def setUp(self):
        self.registry, self.store, self.clock = make_registry()
        self.number = self.successResultOf(self.registry.add_device("s")).device_number
        self.successResultOf(self.registry.update_reported("s", READINGS))

    def test_all_readings_replace_values_and_times(self):
        """Reporting every key again replaces values and stamps every key with the new time."""
        self.clock.advance(5)
        result = self.successResultOf(self.registry.update_reported(
            "s", {"temperature": 21.0, "humidity": 42.0, "pressure": 1000.0}))
        view = self.registry.device("s")
        self.assertEqual(dict(view.reported), {"temperature": 21.0, "humidity": 42.0,
                                               "pressure": 1000.0})
        self.assertEqual(set(view.updated_at["reported"].values()), {START + 5})
        self.assertEqual((result.version, view.version), (3, 3))

    def test_some_readings_keep_the_others(self):
        """A subset (any order, ints too) changes only its keys and their times."""
        self.clock.advance(5)
        self.successResultOf(self.registry.update_reported("s", {"pressure": 990, "temperature": 19.5}))
        view = self.registry.device("s")
        self.assertEqual(dict(view.reported), {"temperature": 19.5, "humidity": 41.0, "pressure": 990})
        self.assertEqual(view.updated_at["reported"]["humidity"], START)
        self.assertEqual(view.updated_at["reported"]["pressure"], START + 5)

    def test_non_finite_and_out_of_range_are_refused(self):
        """NaN, infinity and a 65-bit integer for a known key are refused and change nothing."""
        before = self.registry.device("s")
        for bad in (float("nan"), float("inf"), 1 << 64):
            patch = dict(READINGS, humidity=bad)
            failure = self.failureResultOf(self.registry.update_reported("s", patch),
                                           errors.InvalidValue)
            self.assertEqual(failure.value.code, "invalid_value")
        self.assertEqual(self.registry.device("s"), before)

    def test_too_many_keys_refused_like_the_full_path(self):
        """A patch over max_keys is refused even when every key already exists (in a
        map stored under a larger max_keys: merging cannot grow one past it)."""
        larger, store, _ = make_registry(max_keys=3)
        self.successResultOf(larger.add_device("s"))
        self.successResultOf(larger.update_reported("s", {"a": 1.0, "b": 2.0, "c": 3.0}))
        registry, _, _ = make_registry(store, max_keys=2)
        self.successResultOf(registry.update_reported("s", {"c": 4.0}))
        self.failureResultOf(registry.update_reported("s", {"a": 1.0, "b": 2.0, "c": 3.0}),
                             errors.InvalidValue)

    def test_history_keeps_the_patch(self):
        """With history on, the fast path records the patch like the full path."""
        self.successResultOf(self.registry.update_reported("s", {"humidity": 50.0}))
        entry = self.registry.device("s").history[-1]
        self.assertEqual((entry[3], dict(entry[4])), ("reported", {"humidity": 50.0}))

    def test_device_number_names_the_device(self):
        """update_reported accepts the device number; the result carries the name."""
        result = self.successResultOf(self.registry.update_reported(self.number, {"humidity": 1.5}))
        self.assertEqual(result.name, "s")
        self.assertEqual(self.registry.device("s").reported["humidity"], 1.5)
        self.failureResultOf(self.registry.update_reported(12345, {"x": 1}), errors.UnknownDevice)

    def test_observers_see_fast_updates(self):
        """Observers are told of every fast-path change with the new view."""
        seen = []
        self.registry.subscribe(["s"], seen.append)
        self.successResultOf(self.registry.update_reported("s", {"humidity": 7.0}))
        self.assertEqual([v.reported["humidity"] for v in seen], [7.0])


class ManyTests(SynchronousTestCase):
    """update_reported_many: one Deferred, per-update results, same semantics."""

    def setUp(self):
        self.registry, self.store, self.clock = make_registry()
        self.numbers = [self.successResultOf(self.registry.add_device(n)).device_number
                        for n in ("a", "b")]

    def test_results_in_order_with_refusals(self):
        """Each update gets its UpdateResult or its RegistryError, in order; refusals change nothing."""
        results = self.successResultOf(self.registry.update_reported_many([
            ("a", {"t": 1.0}),
            ("nobody", {"t": 1.0}, (), "tok-1"),
            (self.numbers[1], {"t": 2.0}, ({"kind": "boot"},), "tok-2"),
            ("a", {"bad key!": 1}, (), "tok-3"),
            ("a", {}),
        ]))
        self.assertEqual(results[0], UpdateResult("a", 2, 3))
        self.assertIsInstance(results[1], errors.UnknownDevice)
        self.assertEqual(results[1].token, "tok-1")
        self.assertEqual(results[2], UpdateResult("b", 3, 4, "tok-2"))   # b began at 2
        self.assertIsInstance(results[3], errors.InvalidKey)
        self.assertEqual(results[3].token, "tok-3")
        self.assertEqual(results[4], UpdateResult("a", 2, 3))
        self.assertEqual(self.registry.device("a").reported["t"], 1.0)
        self.assertEqual(self.registry.cursor, 4)

    def test_fires_only_when_durable(self):
        """The one Deferred waits for the store like single writes do."""
        self.store.hold()
        d = self.registry.update_reported_many([("a", {"t": 1.0}), ("b", {"t": 2.0})])
        self.assertNoResult(d)
        self.store.release()
        self.assertEqual([r.version for r in self.successResultOf(d)], [2, 3])
        self.assertEqual(self.store.devices[self.numbers[0]].version, 2)

    def test_observers_and_feed(self):
        """Observers see each change (with its events); the feed lists each device once."""
        seen = []
        self.registry.subscribe(["*"], lambda v: seen.append((v.name, v.version, v.events)))
        self.successResultOf(self.registry.update_reported_many(
            [("a", {"t": 1.0}), ("a", {"t": 2.0}, ("e",)), ("b", {"t": 3.0})]))
        self.assertEqual(seen, [("a", 2, ()), ("a", 3, ("e",)), ("b", 3, ())])
        batch = self.registry.changes_since(2)
        self.assertEqual([(v.name, v.version) for v in batch.devices], [("a", 3), ("b", 3)])


class SaveSessionsTests(SynchronousTestCase):
    """save_sessions: several session records behind one Deferred, as save_session each."""

    def setUp(self):
        self.registry, self.store, self.clock = make_registry()
        self.numbers = [self.successResultOf(self.registry.add_device(n)).device_number
                        for n in ("a", "b")]

    def test_records_kept_with_results_in_order(self):
        """Each record is kept and answered in order; an unknown device gets its error."""
        first, second = SessionRecord(5, acked_remote_num=1), SessionRecord(6, remote_seq=9)
        results = self.successResultOf(self.registry.save_sessions(
            [(self.numbers[0], first), (12345, first), (self.numbers[1], second)]))
        self.assertEqual(results[0], first)
        self.assertIsInstance(results[1], errors.UnknownDevice)
        self.assertEqual(results[2], second)
        self.assertEqual(self.registry.session_record(self.numbers[0]), first)
        self.assertEqual(self.store.sessions, {self.numbers[0]: first, self.numbers[1]: second})

    def test_fires_only_when_durable(self):
        """The one Deferred waits until every record is durable."""
        self.store.hold()
        d = self.registry.save_sessions([(n, SessionRecord(7)) for n in self.numbers])
        self.assertNoResult(d)
        self.assertEqual(self.store.sessions, {})
        self.store.release()
        self.assertEqual(self.successResultOf(d), [SessionRecord(7)] * 2)
        self.assertEqual(set(self.store.sessions), set(self.numbers))

    def test_only_unknown_devices(self):
        """Unknown devices only: nothing is written; the answer waits for earlier writes."""
        self.store.hold()
        d = self.registry.save_sessions([(12345, SessionRecord(7))])
        self.assertNoResult(d)
        self.store.release()
        [result] = self.successResultOf(d)
        self.assertIsInstance(result, errors.UnknownDevice)
        self.assertEqual(self.store.sessions, {})

    def test_instrumented_store_counts_each_record(self):
        """Through the metrics wrapper every record is counted as a session write."""
        metrics = Metrics()
        registry, store, _ = make_registry(InstrumentedStore(MemoryStore(), metrics))
        numbers = [self.successResultOf(registry.add_device(n)).device_number for n in "abc"]
        before = metrics.commits.kinds["session"]
        self.successResultOf(registry.save_sessions([(n, SessionRecord(3)) for n in numbers]))
        self.assertEqual(metrics.commits.kinds["session"] - before, 3)
        self.assertEqual(len(store.store.sessions), 3)


class DesiredWatchTests(SynchronousTestCase):
    """watch_desired / desired_of: desired changes without building views."""

    def test_watch_and_read_desired(self):
        """A watcher gets (number, desired) after each desired change, never for reported ones."""
        registry, _, _ = make_registry()
        number = self.successResultOf(registry.add_device("d")).device_number
        told = []
        watch = registry.watch_desired(lambda n, desired: told.append((n, dict(desired))))
        self.successResultOf(registry.update_desired("d", {"led": True}))
        self.successResultOf(registry.update_reported("d", {"t": 1.0}))
        self.successResultOf(registry.update_desired("d", {"fan": 2}))
        self.assertEqual(told, [(number, {"led": True}), (number, {"led": True, "fan": 2})])
        self.assertEqual(dict(registry.desired_of(number)), {"led": True, "fan": 2})
        self.assertIsNone(registry.desired_of(number + 1))
        watch.cancel()
        self.successResultOf(registry.update_desired("d", {"fan": 3}))
        self.assertEqual(len(told), 2)
