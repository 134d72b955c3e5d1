"""Tests for broker.registry.feed: the change feed and observers."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import MemoryStore
from broker.registry.feed import MIN_COMPACT
from .helpers import make_registry


class ChangeFeedTests(SynchronousTestCase):
    """changes_since orders, coalesces and resets as documented."""

    def setUp(self):
        self.registry, self.store, self.clock = make_registry()
        for name in ("a", "b", "c"):
            self.successResultOf(self.registry.add_device(name))
        self.start = self.registry.cursor

    def test_order_and_coalescing(self):
        """Each changed device comes once, at its latest state, in order of last change."""
        r = self.registry
        r.update_reported("a", {"v": 1})
        r.update_reported("b", {"v": 1})
        r.update_reported("a", {"v": 2})
        r.update_reported("c", {"v": 1})
        r.update_reported("a", {"v": 3})
        batch = r.changes_since(self.start)
        self.assertEqual([(v.name, v.reported["v"]) for v in batch.devices],
                         [("b", 1), ("c", 1), ("a", 3)])
        self.assertEqual(batch.cursor, r.cursor)
        self.assertFalse(batch.more)
        self.assertFalse(batch.reset)

    def test_nothing_new(self):
        """A current cursor gets no devices and keeps its place."""
        batch = self.registry.changes_since(self.registry.cursor)
        self.assertEqual((batch.devices, batch.cursor, batch.more), ([], self.registry.cursor, False))

    def test_paging(self):
        """A limit splits the answer; resuming from the returned cursor gives the rest."""
        for i in range(5):
            self.registry.update_reported("abc"[i % 3], {"i": i})
        first = self.registry.changes_since(self.start, limit=2)
        self.assertTrue(first.more)
        rest = self.registry.changes_since(first.cursor, limit=10)
        names = [v.name for v in first.devices + rest.devices]
        self.assertEqual(names, ["c", "a", "b"])
        self.assertFalse(rest.more)

    def test_from_zero_is_a_snapshot(self):
        """Cursor 0 returns every device."""
        self.assertEqual(sorted(v.name for v in self.registry.changes_since(0).devices), ["a", "b", "c"])

    def test_removal_is_in_feed(self):
        """A removed device appears once as a tombstone."""
        self.registry.remove_device("b")
        batch = self.registry.changes_since(self.start)
        self.assertEqual([(v.name, v.removed) for v in batch.devices], [("b", True)])
        self.assertTrue(batch.devices[0].to_json()["removed"])

    def test_future_cursor_resets(self):
        """A cursor beyond the sequence (e.g. from before a crash) gets reset and a snapshot."""
        batch = self.registry.changes_since(self.registry.cursor + 10)
        self.assertTrue(batch.reset)
        self.assertEqual(sorted(v.name for v in batch.devices), ["a", "b", "c"])

    def test_expired_cursor_resets(self):
        """A cursor older than the oldest kept tombstone gets reset, without tombstones."""
        registry, _, _ = make_registry(feed_retention=1)
        for name in ("a", "b", "c"):
            self.successResultOf(registry.add_device(name))
        old = registry.cursor
        registry.remove_device("a")
        registry.remove_device("b")
        batch = registry.changes_since(old)
        self.assertTrue(batch.reset)
        self.assertEqual([v.name for v in batch.devices], ["c"])
        recent = registry.changes_since(old + 1)
        self.assertFalse(recent.reset)
        self.assertEqual([(v.name, v.removed) for v in recent.devices], [("b", True)])

    def test_snapshot_pages_below_the_horizon_end_above_it(self):
        """Paging a snapshot with a small limit terminates once tombstones were pruned:
        a page never ends on a cursor below the horizon (the next request would be
        reset to the same page, forever); it holds every device unchanged since."""
        registry, _, _ = make_registry(feed_retention=1)
        for name in "abcde":
            self.successResultOf(registry.add_device(name))
        registry.remove_device("d")
        registry.remove_device("e")
        self.assertGreater(registry._feed.horizon, 3)
        seen, cursor, pages = [], 0, 0
        while True:
            batch = registry.changes_since(cursor, limit=1)
            pages += 1
            self.assertLess(pages, 5, "snapshot paging never ends")
            seen += [v.name for v in batch.devices if not v.removed]
            cursor = batch.cursor
            if not batch.more:
                break
        self.assertEqual(seen, ["a", "b", "c"])
        self.assertFalse(registry.changes_since(cursor).reset)
        registry.update_reported("b", {"v": 1})
        page = registry.changes_since(cursor, limit=1)
        self.assertEqual(([v.name for v in page.devices], page.reset), (["b"], False))

    def test_cursor_survives_restart(self):
        """A cursor taken before a restart resumes with exactly the later changes."""
        self.registry.update_reported("a", {"v": 1})
        cursor = self.registry.cursor
        self.registry.update_reported("c", {"v": 2})
        again, _, _ = make_registry(self.store)
        batch = again.changes_since(cursor)
        self.assertFalse(batch.reset)
        self.assertEqual([(v.name, v.reported["v"]) for v in batch.devices], [("c", 2)])

    def test_compaction_keeps_answers(self):
        """After many rewrites (compaction) the feed still answers in order, once per device."""
        for i in range(MIN_COMPACT * 3):
            self.registry.update_reported("abc"[i % 3], {"i": i})
        self.assertLess(len(self.registry._feed), MIN_COMPACT * 2)
        batch = self.registry.changes_since(0)
        self.assertEqual([(v.name, v.reported["i"]) for v in batch.devices],
                         [("a", 3 * MIN_COMPACT - 3), ("b", 3 * MIN_COMPACT - 2),
                          ("c", 3 * MIN_COMPACT - 1)])


_NAMES = ("a", "b", "c")
_STEPS = st.lists(st.one_of(
    st.tuples(st.just("report"), st.sampled_from(_NAMES)),
    st.tuples(st.just("add"), st.sampled_from(_NAMES)),
    st.tuples(st.just("remove"), st.sampled_from(_NAMES)),
    st.tuples(st.sampled_from(("restart", "hold", "crash"))),
    st.tuples(st.just("follow"), st.integers(1, 3)),
), min_size=10, max_size=40)


class FollowerModelTests(SynchronousTestCase):
    """A client following the feed across clean restarts and crashes."""

    @settings(max_examples=150, deadline=None)
    @given(_STEPS)
    def test_follower_holds_versions_that_name_one_state(self, steps):
        """Whatever the changes, restarts and crashes (writes held, then lost), a
        version a client was told names one state of its device for good, and a
        follower paging the feed ends with the registry's devices and versions."""
        store = MemoryStore()
        named = {}                  # (number, version) -> the reported state told
        twice = []                  # versions told with two states
        copy, cursor = {}, 0

        def told(view):
            if not view.removed:
                key, state = (view.device_number, view.version), dict(view.reported)
                if named.setdefault(key, state) != state:
                    twice.append((key, named[key], state))

        def follow(limit):
            nonlocal copy, cursor
            more = True
            while more:
                batch = registry.changes_since(cursor, limit)
                if batch.reset:
                    copy = {}
                for view in batch.devices:
                    told(view)
                    if view.removed:
                        copy.pop(view.name, None)
                    else:
                        copy[view.name] = (view.device_number, view.version)
                cursor, more = batch.cursor, batch.more

        def opened():
            registry = make_registry(store, feed_retention=2, reload_interval=0)[0]
            registry.subscribe("*", told)
            return registry
        registry = opened()
        for i, step in enumerate(steps):
            kind = step[0]
            known = kind in ("report", "add", "remove") and registry.device(step[1]) is not None
            if kind == "report" and known:
                registry.update_reported(step[1], {"x": i})     # each report its own state
            elif kind == "add" and not known:
                registry.add_device(step[1])
            elif kind == "remove" and known:
                registry.remove_device(step[1])
            elif kind == "hold":
                store.hold()
            elif kind in ("restart", "crash"):
                if kind == "restart":
                    registry.stop()
                else:
                    store.crash()
                registry = opened()
            elif kind == "follow":
                follow(step[1])
        follow(2)
        self.assertEqual(twice, [])
        self.assertEqual(copy, {v.name: (v.device_number, v.version)
                                for v in registry.devices(limit=10)})


class SubscriptionTests(SynchronousTestCase):
    """Observers by name and glob, and observer counts."""

    def setUp(self):
        self.registry, _, _ = make_registry()
        for name in ("greenhouse-1", "greenhouse-2", "barn"):
            self.successResultOf(self.registry.add_device(name))

    def test_exact_and_glob(self):
        """Observers get every change of matching devices only."""
        exact, glob = [], []
        self.registry.subscribe(["barn"], exact.append)
        self.registry.subscribe(["greenhouse-*"], glob.append)
        self.registry.update_reported("barn", {"a": 1})
        self.registry.update_reported("greenhouse-2", {"a": 1})
        self.registry.update_desired("greenhouse-2", {"a": 2})
        self.assertEqual([v.name for v in exact], ["barn"])
        first = self.registry.device("greenhouse-2").version - 2   # its creation's cursor
        self.assertEqual([(v.name, v.version) for v in glob],
                         [("greenhouse-2", first + 1), ("greenhouse-2", first + 2)])

    def test_counts_and_cancel(self):
        """observer_count counts distinct subscriptions; cancel removes them."""
        s1 = self.registry.subscribe(["greenhouse-1", "greenhouse-*"], lambda v: None)
        s2 = self.registry.subscribe(["*"], lambda v: None)
        self.assertEqual(self.registry.observer_count("greenhouse-1"), 2)
        self.assertEqual(self.registry.observer_count("barn"), 1)
        s1.cancel()
        s1.cancel()
        self.assertEqual(self.registry.observer_count("greenhouse-1"), 1)
        s2.cancel()
        self.assertEqual(self.registry.observer_count("greenhouse-1"), 0)

    def test_one_view_per_change(self):
        """A subscription matching twice is called once per change."""
        seen = []
        self.registry.subscribe(["barn", "b*"], seen.append)
        self.registry.update_reported("barn", {"a": 1})
        self.assertEqual(len(seen), 1)

    def test_raising_observer_is_contained(self):
        """An observer that raises neither stops others nor fails the write."""
        seen = []

        def bad(view):
            raise RuntimeError("boom")
        self.registry.subscribe(["barn"], bad)
        self.registry.subscribe(["barn"], seen.append)
        self.successResultOf(self.registry.update_reported("barn", {"a": 1}))
        self.assertEqual(len(seen), 1)
        self.assertEqual(self.registry._subs.errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_removal_notifies(self):
        """Observers learn of a removal with a removed view."""
        seen = []
        self.registry.subscribe(["barn"], seen.append)
        self.registry.remove_device("barn")
        self.assertTrue(seen[-1].removed)
