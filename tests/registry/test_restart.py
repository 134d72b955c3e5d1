"""Tests for broker.registry.restart: cursors after a clean or an unclean stop.

The registry tells observers of a change (with its cursor) before the store
has made it durable. After a crash a dashboard may hold a cursor for changes
that were lost; the restarted registry must never issue those cursors again
for other changes, or the dashboard would resume past changes it never saw.
"""

import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import DeviceRegistry, RegistrySettings
from broker.registry.database import DB_NAME
from broker.registry import errors
from broker.registry.restart import (CURSOR_GAP, MAX_SAFE_CURSOR, PENDING_CURSOR,
                                     continue_cursors, merge, move_out)
from broker.registry.sqlite_store import SQLiteStore
from broker.registry.store import Loaded
from .helpers import make_registry


class StalledStore(SQLiteStore):
    """An SQLite store whose writer the test can stall after ``commits_left``
    more hand-overs: later writes stay queued (announced, never durable) until
    ``kill()`` drops them as ``kill -9`` would."""

    commits_left = None

    def _hand_over(self):
        if self.commits_left is not None:
            if self.commits_left <= 0:
                return
            self.commits_left -= 1
        super()._hand_over()

    def kill(self):
        """Stop like a killed process: queued writes are lost, no clean-stop mark."""
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        for queued in (self._ops, self._deferreds, self._results, self._versions, self._cursors):
            del queued[:]
        self._begun = False          # what a killed process never gets to write
        return self.close()


class CrashTests(TestCase):
    """A registry over SQLite killed with announced but uncommitted changes."""

    def setUp(self):
        self.data_dir = os.path.join(self.mktemp(), "data")

    def open(self, store_type=SQLiteStore, **settings):
        settings = RegistrySettings(**settings)
        store = store_type.in_directory(self.data_dir, reactor=reactor, settings=settings)
        registry = DeviceRegistry(store, clock=reactor, settings=settings)
        self.addCleanup(store.close)
        return registry

    @defer.inlineCallbacks
    def crashed(self):
        """A registry that announced changes of "a" and was killed before committing
        them; returns (durable cursor, the last cursor an observer saw)."""
        registry = self.open(StalledStore)
        for name in ("a", "b"):
            yield registry.add_device(name)
        yield registry.update_reported("a", {"x": 0})
        durable = registry.cursor
        seen = []
        registry.subscribe("*", lambda view: seen.append(view.cursor))
        registry._store.commits_left = 0
        for i in range(1, 4):
            registry.update_reported("a", {"x": i})
        self.assertEqual(seen, [durable + 1, durable + 2, durable + 3])
        yield registry._store.kill()
        return durable, seen[-1]

    @defer.inlineCallbacks
    def test_cursor_of_lost_changes_resets_after_new_changes(self):
        """A client holding a cursor of changes lost in a crash gets reset (and a
        snapshot with the rolled-back value), even once the restarted registry has
        made more changes than were lost."""
        durable, seen = yield self.crashed()
        again = self.open()
        for i in range(5):
            yield again.update_reported("b", {"y": i})
        self.assertGreater(again.cursor, seen)
        batch = again.changes_since(seen)
        self.assertTrue(batch.reset)
        views = {v.name: v for v in batch.devices}
        self.assertEqual(views["a"].reported["x"], 0)
        self.assertEqual(views["b"].reported["y"], 4)
        self.assertEqual(batch.cursor, again.cursor)

    @defer.inlineCallbacks
    def test_unclean_start_skips_the_gap(self):
        """After a crash cursors continue CURSOR_GAP above the loaded ones: the durable
        cursor still resumes, any cursor above it up to the restart's own is reset,
        and the restart's own cursor (a fresh snapshot's) resumes normally."""
        durable, seen = yield self.crashed()
        again = self.open()
        start = durable + CURSOR_GAP          # then each device moved above it
        self.assertEqual(again.cursor, start + 2)
        self.assertLess(again.cursor, MAX_SAFE_CURSOR)
        self.assertFalse(again.changes_since(durable).reset)
        for cursor in (durable + 1, seen, start - 1):
            self.assertTrue(again.changes_since(cursor).reset, cursor)
        for cursor in (start, start + 1, again.cursor):
            self.assertFalse(again.changes_since(cursor).reset, cursor)
        top = again.cursor
        result = yield again.update_reported("b", {"y": 1})
        self.assertEqual(result.cursor, top + 1)
        batch = again.changes_since(top)
        self.assertEqual(([v.name for v in batch.devices], batch.reset), (["b"], False))
        self.assertEqual([v.name for v in again.changes_since(durable).devices], ["a", "b"])

    @defer.inlineCallbacks
    def test_clean_stop_moves_no_cursor(self):
        """A clean stop commits everything: the next start continues at the same
        cursor, and every cursor handed out before the stop resumes without reset."""
        registry = self.open()
        yield registry.add_device("a")
        pending = [registry.update_reported("a", {"x": i}) for i in range(20)]
        middle = registry.cursor - 10
        yield registry.stop()
        yield defer.gatherResults(pending)
        again = self.open()
        self.assertEqual(again.cursor, registry.cursor)
        self.assertFalse(again.changes_since(middle).reset)
        result = yield again.update_reported("a", {"x": 20})
        self.assertEqual(result.cursor, registry.cursor + 1)

    @defer.inlineCallbacks
    def test_dead_range_survives_later_restarts(self):
        """The dead range is durable: after a clean stop and start, and after a
        second crash, a cursor of the first crash's lost changes still resets, and
        the second crash adds its own range above the first restart's cursors."""
        durable, seen = yield self.crashed()
        second = self.open(StalledStore)
        yield second.update_reported("b", {"y": 1})
        legit = second.cursor
        yield second.stop()
        third = self.open(StalledStore)
        self.assertEqual(third.cursor, legit)
        self.assertTrue(third.changes_since(seen).reset)
        self.assertFalse(third.changes_since(legit).reset)
        observed = []
        third.subscribe("b", lambda view: observed.append(view.cursor))
        third._store.commits_left = 0
        third.update_reported("b", {"y": 2})
        yield third._store.kill()
        fourth = self.open()
        yield fourth.update_reported("a", {"x": 9})
        self.assertEqual(fourth.cursor, legit + CURSOR_GAP + 3)   # a and b moved, then a
        self.assertTrue(fourth.changes_since(seen).reset)
        self.assertTrue(fourth.changes_since(observed[0]).reset)
        batch = fourth.changes_since(legit)
        self.assertFalse(batch.reset)
        self.assertEqual([(v.name, v.reported) for v in batch.devices],
                         [("b", {"y": 1}), ("a", {"x": 9})])

    @defer.inlineCallbacks
    def test_crash_right_after_an_unclean_start(self):
        """The dead range and the running mark are durable before the restarted
        registry announces anything: if it crashes before its first commit, the
        next start still resets the cursors of both crashes."""
        durable, seen = yield self.crashed()
        second = self.open(StalledStore)
        second._store.commits_left = 0
        observed = []
        second.subscribe("b", lambda view: observed.append(view.cursor))
        second.update_reported("b", {"y": 1})
        yield second._store.kill()
        third = self.open()
        for i in range(3):
            yield third.update_reported("a", {"x": 10 + i})
        self.assertTrue(third.changes_since(seen).reset)
        self.assertTrue(third.changes_since(observed[0]).reset)
        self.assertGreater(third.cursor, observed[0])

    @defer.inlineCallbacks
    def versions_seen_then_crash(self):
        """Like ``crashed``, but returns the versions an observer saw of "a" (the
        last three never durable) and the version of "b" stored."""
        registry = self.open(StalledStore)
        for name in ("a", "b"):
            yield registry.add_device(name)
        yield registry.update_reported("a", {"x": 0})
        seen = []
        registry.subscribe("a", lambda view: seen.append(view.version))
        stored_b = registry.device("b").version
        registry._store.commits_left = 0
        for i in range(1, 4):
            registry.update_reported("a", {"x": i})
        yield registry._store.kill()
        return seen, stored_b

    @defer.inlineCallbacks
    def test_versions_seen_before_a_crash_are_never_issued_again(self):
        """Versions announced before a crash and lost with it are never issued again
        for another state: every device's version starts above them, and a write
        with If-Match on one of them is a conflict."""
        seen, stored_b = yield self.versions_seen_then_crash()
        again = self.open()
        self.assertEqual(again.device("a").reported, {"x": 0})
        self.assertGreaterEqual(again.device("b").version, stored_b + CURSOR_GAP)
        for name in ("a", "b"):
            self.assertGreater(again.device(name).version, max(seen))
            self.assertEqual(again.device(name).version, again.device(name).cursor)
        result = yield again.update_reported("a", {"x": 7})
        self.assertNotIn(result.version, seen)
        for version in seen:
            yield self.assertFailure(again.update_desired("a", {"led": "on"},
                                                          expected_version=version),
                                     errors.VersionConflict)
        self.assertLess(again.device("a").version, MAX_SAFE_CURSOR)

    @defer.inlineCallbacks
    def test_raised_versions_are_durable_before_anything_is_announced(self):
        """The raised versions are stored with the dead range: after a second crash
        before any commit, the versions of both runs stay behind, and after a clean
        stop the versions stay where they are."""
        seen, _ = yield self.versions_seen_then_crash()
        second = self.open(StalledStore)
        observed = []
        second.subscribe("*", lambda view: observed.append(view.version))
        second._store.commits_left = 0
        second.update_reported("a", {"x": 5})
        second.update_reported("b", {"y": 5})
        yield second._store.kill()
        third = self.open()
        for name in ("a", "b"):
            self.assertGreater(third.device(name).version, max(seen + observed))
        versions = {name: third.device(name).version for name in ("a", "b")}
        yield third.stop()
        fourth = self.open()
        self.assertEqual({name: fourth.device(name).version for name in ("a", "b")}, versions)

    @defer.inlineCallbacks
    def test_resumed_client_gets_every_device_with_its_new_version(self):
        """A client resuming from a durable cursor after a crash is sent every device
        once, with its raised version, so what it holds matches the registry."""
        registry = self.open(StalledStore)
        for name in ("a", "b", "c"):
            yield registry.add_device(name)
        held = registry.cursor
        registry._store.commits_left = 0
        registry.update_reported("a", {"x": 1})
        yield registry._store.kill()
        again = self.open()
        batch = again.changes_since(held, limit=2)
        names = [v.name for v in batch.devices]
        while batch.more:
            batch = again.changes_since(batch.cursor, limit=2)
            names += [v.name for v in batch.devices]
        self.assertFalse(batch.reset)
        self.assertEqual(sorted(names), ["a", "b", "c"])
        self.assertEqual(again.changes_since(batch.cursor).devices, [])

    @defer.inlineCallbacks
    def test_cut_commit_marks_only_the_durable_prefix(self):
        """A commit cut by max_batch writes a device as it is now (a later cursor)
        while an earlier change of another device waits: the dead range starts below
        that waiting change, so a client that saw it is reset after a crash."""
        registry = self.open(StalledStore, max_batch=2)
        for name in ("a", "b", "c"):
            yield registry.add_device(name)
        base = registry.cursor
        registry._store.commits_left = 1
        first = registry.update_reported("a", {"x": 1})     # base + 1, written as base + 4
        registry.update_reported("b", {"x": 1})             # base + 2
        registry.update_reported("c", {"x": 1})             # base + 3: never committed
        registry.update_reported("a", {"x": 2})             # base + 4
        yield first
        yield registry._store.kill()
        again = self.open()
        self.assertEqual(again.device("a").reported["x"], 2)
        self.assertEqual(again.device("c").reported, {})
        self.assertFalse(again.changes_since(base + 2).reset)
        batch = again.changes_since(base + 4)
        self.assertTrue(batch.reset)
        self.assertEqual({v.name: v.reported for v in batch.devices}["c"], {})

    @defer.inlineCallbacks
    def test_snapshot_pages_never_end_inside_a_dead_range(self):
        """Devices stored above the durable mark (a cut commit wrote them as they
        were later) are given cursors above the restart's: a client paging through
        a snapshot one device at a time is never handed a dead cursor, so it is
        reset once and reaches the end instead of starting over forever."""
        registry = self.open(StalledStore, max_batch=2)
        for name in ("a", "b", "c"):
            yield registry.add_device(name)
        base = registry.cursor
        registry._store.commits_left = 1
        first = registry.update_reported("a", {"x": 1})     # written as base + 4
        registry.update_reported("b", {"x": 1})             # written as base + 5
        registry.update_reported("c", {"x": 1})             # base + 3: never committed
        registry.update_reported("a", {"x": 2})
        registry.update_reported("b", {"x": 2})
        yield first
        yield registry._store.kill()
        again = self.open()
        self.assertEqual((again.device("a").reported, again.device("b").reported),
                         ({"x": 2}, {"x": 2}))
        cursor, seen, resets = base + 4, [], 0
        for _ in range(10):
            batch = again.changes_since(cursor, limit=1)
            resets += batch.reset
            seen += [v.name for v in batch.devices]
            cursor = batch.cursor
            if not batch.more:
                break
        self.assertEqual((sorted(seen), resets, batch.more), (["a", "b", "c"], 1, False))
        self.assertEqual(cursor, again.cursor)
        # The new cursors are durable: after a clean stop nothing is dead any more.
        yield again.stop()
        third = self.open()
        self.assertEqual(third.cursor, again.cursor)
        for name in ("a", "b"):
            view = third.device(name)
            self.assertFalse(third.changes_since(view.cursor).reset, name)
            self.assertGreater(view.cursor, base + 4 + CURSOR_GAP - 1)

    @defer.inlineCallbacks
    def test_database_of_an_older_broker_starts_unclean(self):
        """A database without the clean-stop mark (an older broker's, whose last stop
        is unknown) starts as after a crash: every cursor above 0 is reset once."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.update_reported("a", {"x": 1})
        cursor = registry.cursor
        yield registry.stop()
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        conn.execute("DELETE FROM meta WHERE key IN ('clean_stop', 'durable')")
        conn.commit()
        conn.close()
        again = self.open()
        # The device, stored inside the dead range, moved just above it.
        self.assertEqual(again.cursor, cursor + CURSOR_GAP + 1)
        self.assertEqual(again.device("a").cursor, again.cursor)
        self.assertTrue(again.changes_since(1).reset)
        self.assertFalse(again.changes_since(0).reset)
        self.assertFalse(again.changes_since(again.cursor).reset)

    @defer.inlineCallbacks
    def test_fresh_database_starts_clean(self):
        """A new database (also one broker-admin created) starts at cursor 0, no gap."""
        from broker.registry.admin import AdminDatabase
        admin = AdminDatabase(self.data_dir, create=True)
        admin.add_device("a")
        admin.close()
        registry = self.open()
        self.assertLess(registry.cursor, 10)
        yield registry.stop()

    @defer.inlineCallbacks
    def test_dead_ranges_below_the_horizon_are_dropped(self):
        """A dead range wholly below the stored horizon (pruned tombstones) is
        forgotten at the next start: such cursors are reset by the horizon anyway."""
        durable, seen = yield self.crashed()
        second = self.open(feed_retention=1)
        for name in ("c", "d", "e"):
            yield second.add_device(name)
        for name in ("c", "d"):
            yield second.remove_device(name)
        yield second.stop()

        def dead_rows():
            conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
            try:
                return conn.execute("SELECT key FROM meta WHERE key LIKE 'dead:%'").fetchall()
            finally:
                conn.close()
        self.assertEqual(len(dead_rows()), 1)
        third = self.open(feed_retention=1)
        self.assertEqual(len(dead_rows()), 1)       # until the new horizon is durable
        self.assertTrue(third.changes_since(seen).reset)
        self.assertTrue(third.changes_since(second.cursor - 3).reset)
        yield third.stop()
        fourth = self.open(feed_retention=1)
        self.assertEqual(dead_rows(), [])
        self.assertTrue(fourth.changes_since(seen).reset)
        self.assertEqual(fourth.cursor, second.cursor)
        yield fourth.stop()


class MemoryStoreRestartTests(SynchronousTestCase):
    """The MemoryStore: a new registry over it is a clean restart (its writes are
    durable at once), unless writes were held, or ``crash()`` dropped them."""

    def test_new_registry_is_a_clean_restart(self):
        """A new registry over the same MemoryStore continues at the same cursor."""
        registry, store, _ = make_registry()
        self.successResultOf(registry.add_device("a"))
        registry.update_reported("a", {"x": 1})
        again, _, _ = make_registry(store)
        self.assertEqual(again.cursor, registry.cursor)
        self.assertEqual(store.dead, [])

    def test_crash_drops_held_writes_and_leaves_a_dead_range(self):
        """crash() loses the held writes like kill -9: the next registry skips the
        gap, and the cursors of the lost changes are reset."""
        registry, store, _ = make_registry()
        self.successResultOf(registry.add_device("a"))
        durable = registry.cursor
        store.hold()
        held = registry.update_reported("a", {"x": 1})
        seen = registry.cursor
        store.crash()
        self.assertNoResult(held)
        again, _, _ = make_registry(store)
        self.assertEqual(again.device("a").reported, {})
        self.assertEqual(again.cursor, durable + CURSOR_GAP + 1)     # "a" moved above
        self.assertEqual(store.dead, [(durable, durable + CURSOR_GAP)])
        again.update_reported("a", {"x": 2})
        self.assertTrue(again.changes_since(seen).reset)
        self.assertFalse(again.changes_since(durable).reset)

    def test_crash_raises_every_version(self):
        """After crash() every device's version is above any version announced before
        it, and a feed follower of the old registry ends with the new versions."""
        registry, store, _ = make_registry()
        for name in ("a", "b"):
            self.successResultOf(registry.add_device(name))
        follower = registry.cursor
        store.hold()
        registry.update_reported("a", {"x": 1})
        seen = registry.device("a").version
        store.crash()
        again, _, _ = make_registry(store)
        for name in ("a", "b"):
            self.assertGreater(again.device(name).version, seen)
        self.assertEqual({row.name: row.version for row in store.devices.values()},
                         {name: again.device(name).version for name in ("a", "b")})
        batch = again.changes_since(follower)
        self.assertEqual({v.name: v.version for v in batch.devices},
                         {name: again.device(name).version for name in ("a", "b")})

    def test_held_writes_at_restart_count_as_a_crash(self):
        """A new registry over a MemoryStore still holding writes of the old one is
        an unclean start (those writes were announced and are not stored)."""
        registry, store, _ = make_registry()
        self.successResultOf(registry.add_device("a"))
        store.hold()
        registry.update_reported("a", {"x": 1})
        again, _, _ = make_registry(store)
        self.assertEqual(again.cursor, registry.cursor - 1 + CURSOR_GAP + 1)


class ContinueCursorsTests(SynchronousTestCase):
    """continue_cursors and merge: the arithmetic of dead ranges."""

    def test_clean_keeps_the_top(self):
        """A clean start continues at the highest cursor known, dead ranges included."""
        loaded = Loaded(dead=[(5, 50)])
        self.assertEqual(continue_cursors(loaded, 10, 0), (50, [(5, 50)]))

    def test_unclean_starts_from_the_durable_prefix(self):
        """An unclean start's range begins at the durable prefix (or the top if the
        store has no better mark) and ends CURSOR_GAP above the top."""
        loaded = Loaded(clean=False, durable=7)
        self.assertEqual(continue_cursors(loaded, 10, 0),
                         (10 + CURSOR_GAP, [(7, 10 + CURSOR_GAP)]))
        loaded = Loaded(clean=False)
        self.assertEqual(continue_cursors(loaded, 10, 0),
                         (10 + CURSOR_GAP, [(10, 10 + CURSOR_GAP)]))

    def test_ranges_below_the_horizon_go(self):
        """A range ending at or below the horizon is dropped; one above stays."""
        loaded = Loaded(dead=[(1, 5), (6, 20)])
        self.assertEqual(continue_cursors(loaded, 30, 5), (30, [(6, 20)]))

    def test_move_out_of_dead_ranges(self):
        """Devices and tombstones strictly inside a dead range get new cursors above
        the start, in cursor order; those at a range's ends or outside keep theirs."""
        from broker.registry.model import Device
        devs = [Device(n, i, b"k" * 16, 1, c) for i, (n, c) in
                enumerate([("a", 5), ("b", 12), ("c", 20), ("d", 15)], 1)]
        stones = [(11, "x", 9, 2), (10, "y", 8, 2)]
        top, moves = move_out(devs, stones, [(10, 20)], 100)
        self.assertEqual(top, 103)
        self.assertEqual(moves, [("tombstone", 9, 11, 101, 2), ("device", 2, 12, 102, 1),
                                 ("device", 4, 15, 103, 1)])
        self.assertEqual([d.cursor for d in devs], [5, 102, 20, 103])
        self.assertEqual(stones, [(101, "x", 9, 2), (10, "y", 8, 2)])
        self.assertEqual(move_out(devs, stones, [], 103), (103, []))

    def test_move_out_after_an_unclean_stop_moves_every_device(self):
        """After an unclean stop every device moves above the start, in cursor order,
        its version raised to its new cursor (at least CURSOR_GAP above its own);
        tombstones move only out of dead ranges, with their versions."""
        from broker.registry.model import Device
        devs = [Device("a", 1, b"k" * 16, 3, 5), Device("b", 2, b"k" * 16, 4, 4)]
        stones = [(6, "x", 9, 2)]
        start = 6 + CURSOR_GAP
        top, moves = move_out(devs, stones, [(6, start)], start, unclean=True)
        self.assertEqual(top, start + 2)
        self.assertEqual(moves, [("device", 2, 4, start + 1, start + 1),
                                 ("device", 1, 5, start + 2, start + 2)])
        self.assertEqual([(d.cursor, d.version) for d in devs],
                         [(start + 2, start + 2), (start + 1, start + 1)])
        self.assertEqual(stones, [(6, "x", 9, 2)])
        odd = [Device("c", 3, b"k" * 16, 50, 1)]      # a version above its cursor
        move_out(odd, [], [], 10, unclean=True)
        self.assertEqual(odd[0].version, 50 + CURSOR_GAP)

    def test_move_out_gives_pending_entries_cursors(self):
        """Entries broker-admin stored (PENDING_CURSOR) move above the start, also on
        a clean start; a tombstone keeps its version, a device's starts at its cursor."""
        from broker.registry.model import Device
        devs = [Device("a", 1, b"k" * 16, 1, PENDING_CURSOR), Device("b", 2, b"k" * 16, 4, 7)]
        stones = [(PENDING_CURSOR, "x", 9, 3), (5, "y", 8, 2)]
        top, moves = move_out(devs, stones, [], 20)
        self.assertEqual(top, 22)
        self.assertEqual(moves, [("tombstone", 9, 0, 21, 3), ("device", 1, 0, 22, 22)])
        self.assertEqual((devs[0].cursor, devs[0].version), (22, 22))
        self.assertEqual((devs[1].cursor, devs[1].version), (7, 4))
        self.assertEqual(stones[1], (5, "y", 8, 2))

    def test_move_out_sends_pending_tombstones_before_any_device_of_their_name(self):
        """A name's tombstones (broker-admin's or in a dead range) get cursors below its
        device's, also a device that would not move: a device is its name's latest."""
        from broker.registry.model import Device
        devs = [Device("x", 1, b"k" * 16, 1, PENDING_CURSOR),
                Device("z", 3, b"k" * 16, 2, 7)]
        stones = [(15, "x", 8, 2), (PENDING_CURSOR, "x", 9, 2), (PENDING_CURSOR, "z", 4, 2)]
        top, moves = move_out(devs, stones, [(10, 20)], 20)
        self.assertEqual(top, 25)
        self.assertEqual(moves, [("tombstone", 9, 0, 21, 2), ("tombstone", 4, 0, 22, 2),
                                 ("device", 3, 7, 23, 2), ("tombstone", 8, 15, 24, 2),
                                 ("device", 1, 0, 25, 25)])

    def test_merge(self):
        """Overlapping ranges merge; touching ones stay apart (their shared end is a
        live cursor)."""
        self.assertEqual(merge([(10, 20), (1, 5), (5, 8), (15, 30)]),
                         [(1, 5), (5, 8), (10, 30)])

    def test_feed_dead_ranges(self):
        """The feed resets exactly the cursors strictly inside a dead range."""
        registry, store, _ = make_registry()
        self.successResultOf(registry.add_device("a"))
        registry._feed.set_dead([(0, 0), (100, 200), (300, 400)])
        registry.cursor = 1000
        answers = {c: registry.changes_since(c).reset
                   for c in (1, 100, 101, 199, 200, 250, 301, 400, 1000)}
        self.assertEqual(answers, {1: False, 100: False, 101: True, 199: True, 200: False,
                                   250: False, 301: True, 400: False, 1000: False})
        self.assertIs(make_registry()[0].changes_since(0).reset, False)    # JSON false, not []
