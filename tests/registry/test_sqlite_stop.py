"""Tests for the SQLite store's close: what it reports, and how long it waits for a lock.

Storage failures are a trigger raising "database or disk is full" (as in
test_sqlite_store.FailedCommitTests); another process's write lock is a
second sqlite3 connection in BEGIN IMMEDIATE. The writer's pauses between
tries for that lock are recorded instead of slept (``lock_sleep``), so the
bound on a stop's waiting is counted, not timed.
"""

import os
import sqlite3
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from broker.registry import errors, open_registry
from broker.registry.database import BUSY_TIMEOUT_MS, DB_NAME


class _StoreTestCase(TestCase):
    """A registry over SQLite: real writer thread, a Clock for the retry timer."""

    timeout = 60

    def setUp(self):
        self.data_dir = os.path.join(self.mktemp(), "data")
        self.clock = task.Clock()
        self.registry = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(self.registry.stop)
        self.store = self.registry._store

    def connect(self):
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME), isolation_level=None,
                               check_same_thread=False)
        self.addCleanup(conn.close)
        return conn

    def break_storage(self):
        """Make every write of a device's row fail, as a full disk would."""
        conn = self.connect()
        conn.execute("CREATE TRIGGER full_disk BEFORE UPDATE ON devices"
                     " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        return conn

    def reopened(self):
        again = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(again.stop)
        return again


class CloseReportTests(_StoreTestCase):
    """``close`` says whether the store holds every change, and names the devices it lost."""

    @defer.inlineCallbacks
    def test_clean_stop_reports_clean(self):
        """A stop after commits that all succeeded reports a clean stop and nothing lost."""
        yield self.registry.add_device("a")
        yield self.registry.update_desired("a", {"mode": "eco"})
        report = yield self.registry.stop()
        self.assertEqual((report.clean, report.unstored, report.error), (True, [], None))

    @defer.inlineCallbacks
    def test_last_try_that_fails_names_the_unstored_devices(self):
        """When the last try fails too, the report names (sorted) every device whose
        change is not stored, with the storage error; the next start is unclean."""
        for name in ("b", "a", "c"):
            yield self.registry.add_device(name)
        broken = self.break_storage()
        for name in ("b", "a"):
            yield self.assertFailure(self.registry.update_desired(name, {"fan": "on"}),
                                     errors.StoreError)
        report = yield self.registry.stop()
        self.assertFalse(report.clean)
        self.assertEqual(report.unstored, ["a", "b"])
        self.assertIn("database or disk is full", report.error)
        # The report tells the truth: those desired values are not in the store.
        broken.execute("DROP TRIGGER full_disk")
        again = self.reopened()
        self.assertEqual([again.device(n).desired for n in "abc"], [{}, {}, {}])

    @defer.inlineCallbacks
    def test_device_stored_by_its_last_try_is_not_reported(self):
        """A commit failing while the store closes gives its devices their last try;
        when that one is stored, nothing is reported lost (only an unclean start)."""
        yield self.registry.add_device("a")
        broken = self.break_storage()
        done = self.store._done

        def storage_back(batch, results, failures):
            if isinstance(failures, Failure):
                broken.execute("DROP TRIGGER IF EXISTS full_disk")
            done(batch, results, failures)
        self.store._done = storage_back
        desired = self.registry.update_desired("a", {"mode": "eco"})
        stopped = self.registry.stop()               # that commit is under way
        yield self.assertFailure(desired, errors.StoreError)
        report = yield stopped
        self.assertEqual((report.clean, report.unstored), (False, []))
        self.assertEqual(self.reopened().device("a").desired, {"mode": "eco"})


class _Pauses:
    """Stands in for ``time.sleep`` between the writer's tries for the write lock:
    records each pause (while running, or once closing) and returns at once.
    With ``hold_first`` the first pause waits until ``go()`` (the test begins
    the stop meanwhile); ``release`` is called at the ``release_at``-th pause
    taken while closing."""

    def __init__(self, store, hold_first=False, release=None, release_at=None):
        self.store = store
        self.running = []
        self.closing = []
        self.first = defer.Deferred()
        self._hold = hold_first
        self._go = threading.Event()
        self._release = release
        self._release_at = release_at

    def __call__(self, seconds):
        closing = self.store._closing
        (self.closing if closing else self.running).append(seconds)
        if len(self.running) + len(self.closing) == 1:
            reactor.callFromThread(self.first.callback, None)
            if self._hold:
                self._go.wait(30)
        if closing and len(self.closing) == self._release_at:
            self._release()

    def go(self):
        self._go.set()


class CloseLockWaitTests(_StoreTestCase):
    """Another process holding the write lock holds a stop for at most
    ``close_lock_wait`` seconds in all, not BUSY_TIMEOUT_MS per commit."""

    def hold_lock(self):
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        self.addCleanup(lambda: conn.in_transaction and conn.execute("ROLLBACK"))
        return conn

    @defer.inlineCallbacks
    def test_running_writer_waits_the_busy_timeout(self):
        """While the broker runs, a commit still waits BUSY_TIMEOUT_MS for the lock
        (broker-admin's short transactions), then fails; nothing is lost for good."""
        yield self.registry.add_device("a")
        pauses = self.store.lock_sleep = _Pauses(self.store)
        self.hold_lock()
        yield self.assertFailure(self.registry.update_desired("a", {"mode": "eco"}),
                                 errors.StoreError)
        self.assertAlmostEqual(sum(pauses.running), BUSY_TIMEOUT_MS / 1000)
        self.assertLessEqual(max(pauses.running), 0.1)
        self.assertEqual(pauses.closing, [])

    @defer.inlineCallbacks
    def test_stop_during_a_wait_for_the_lock_is_bounded(self):
        """A stop that begins while the writer waits for a lock another connection
        holds cuts that wait short: all the close's commits together wait at most
        ``close_lock_wait``, and the report names the device whose change is lost."""
        yield self.registry.add_device("a")
        pauses = self.store.lock_sleep = _Pauses(self.store, hold_first=True)
        self.hold_lock()
        desired = self.registry.update_desired("a", {"mode": "eco"})
        yield pauses.first.addTimeout(10, reactor)    # the commit waits for the lock
        started = time.monotonic()
        stopped = self.registry.stop()
        pauses.go()
        yield self.assertFailure(desired, errors.StoreError)
        report = yield stopped
        elapsed = time.monotonic() - started
        self.assertEqual(pauses.running, [0.001])
        self.assertGreater(len(pauses.closing), 1)
        self.assertLessEqual(sum(pauses.closing), self.store.close_lock_wait + 1e-9)
        self.assertEqual((report.clean, report.unstored), (False, ["a"]))
        self.assertIn("database is locked", report.error)
        # The pauses are counted above; real time only shows that no SQLite
        # busy handler waited (it would take BUSY_TIMEOUT_MS, 10 s, per commit).
        # Generous for a slow shared machine, far below one such wait.
        self.assertLess(elapsed, BUSY_TIMEOUT_MS / 1000 / 2)

    @defer.inlineCallbacks
    def test_lock_freed_during_the_close_lets_it_commit(self):
        """A write queued as the stop begins is committed once the other process lets
        the lock go within the close's wait: a clean stop, the change stored."""
        yield self.registry.add_device("a")
        lock = self.hold_lock()
        pauses = self.store.lock_sleep = _Pauses(
            self.store, release=lambda: lock.execute("ROLLBACK"), release_at=3)
        desired = self.registry.update_desired("a", {"mode": "eco"})
        report = yield self.registry.stop()          # in the same turn: queued, not begun
        yield desired
        self.assertEqual((pauses.running, len(pauses.closing)), ([], 3))
        self.assertEqual((report.clean, report.unstored), (True, []))
        self.assertEqual(self.reopened().device("a").desired, {"mode": "eco"})
