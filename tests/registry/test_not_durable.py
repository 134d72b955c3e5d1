"""Tests that the stores fail an applied change's write with NotDurable themselves.

The registry applies a change in memory before the store writes it, so a
failed write of it is NotDurable (do not send it again), never a plain
StoreError. The store makes that error, once per failed commit, so that
``update_reported`` (the hot path) adds no errback per write.
"""

import os
import sqlite3

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import MemoryStore, errors, open_registry
from broker.registry.database import DB_NAME
from .helpers import make_registry


def break_storage(data_dir):
    """Make every write of a device's row fail (as a full disk would), from another
    connection; returns it (``DROP TRIGGER full_disk`` repairs the store)."""
    conn = sqlite3.connect(os.path.join(data_dir, DB_NAME), isolation_level=None)
    conn.execute("CREATE TRIGGER full_disk BEFORE UPDATE ON devices"
                 " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    return conn


class SQLiteNotDurableTests(TestCase):
    """Failed commits of the SQLite store, on the real reactor (writer thread)."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.data_dir = os.path.join(self.mktemp(), "data")
        self.registry = open_registry(self.data_dir, clock=task.Clock(), reactor=reactor)
        self.addCleanup(self.registry.stop)
        for name in ("a", "b", "c"):
            yield self.registry.add_device(name)

    def broken(self):
        conn = break_storage(self.data_dir)
        self.addCleanup(conn.close)
        return conn

    @defer.inlineCallbacks
    def test_failed_commit_answers_applied_writes_not_durable_with_their_tokens(self):
        """A report and a desired patch of one failed commit fail with NotDurable, each
        with its writer's token, while a write in it that changed nothing stays a
        StoreError (nothing of it was applied: sending it again is safe)."""
        self.broken()
        reported = self.registry.update_reported("a", {"t": 1}, token="r-1")
        desired = self.registry.update_desired("b", {"led": "on"}, token="w-2")
        unchanged = self.registry.update_reported("c", {}, token="n-3")
        first = yield self.assertFailure(reported, errors.NotDurable)
        second = yield self.assertFailure(desired, errors.NotDurable)
        plain = yield self.assertFailure(unchanged, errors.StoreError)
        self.assertEqual([(e.code, e.token) for e in (first, second, plain)],
                         [("not_durable", "r-1"), ("not_durable", "w-2"), ("store_error", None)])
        self.assertIn("database or disk is full", first.message)
        self.assertEqual((self.registry.device("a").reported, self.registry.device("b").desired),
                         ({"t": 1}, {"led": "on"}))

    @defer.inlineCallbacks
    def test_writes_without_a_token_share_one_error_per_failed_commit(self):
        """The token-less writes of one failed commit all fail with the same NotDurable:
        the store makes it once for the commit, not once per write."""
        self.broken()
        writes = [self.registry.update_reported(name, {"t": 2}) for name in ("a", "b", "c")]
        writes.append(self.registry.update_desired("a", {"mode": "eco"}))
        failed = []
        for d in writes:
            failed.append((yield self.assertFailure(d, errors.NotDurable)))
        self.assertEqual(len({id(e) for e in failed}), 1, failed)
        self.assertIsNone(failed[0].token)

    @defer.inlineCallbacks
    def test_offline_flip_of_a_failed_commit_is_not_durable(self):
        """A connection flip whose commit failed is NotDurable too: the registry shows
        it, and the store writes it again (a StoreError would read as not applied)."""
        self.broken()
        yield self.assertFailure(self.registry.set_connection("a", online=True),
                                 errors.NotDurable)
        self.assertTrue(self.registry.device("a").online)

    @defer.inlineCallbacks
    def test_state_write_to_a_closed_store_is_not_durable(self):
        """A change handed to a store that is closing fails with NotDurable and its
        token (it is in memory: sending it again would apply it twice)."""
        store = self.registry._store
        closed = store.close()
        error = yield self.assertFailure(
            self.registry.update_reported("a", {"t": 3}, token="late"), errors.NotDurable)
        self.assertEqual(error.token, "late")
        yield closed


class _FailingStates(MemoryStore):
    """A MemoryStore whose ``("state", ...)`` writes fail while ``failing`` (a full disk)."""

    failing = False

    def write(self, op, result=None):
        if self.failing and op[0] == "state":
            return defer.fail(errors.StoreError("storage failed: disk full"))
        return super().write(op, result)


class _OwnError(MemoryStore):
    """A MemoryStore whose own ``write_state`` fails with ``error``, as given."""

    error = None

    def write_state(self, dev, token=None):
        return defer.fail(self.error)


class MemoryStoreNotDurableTests(SynchronousTestCase):
    """The memory store (the reference behaviour) and stores built on Store's defaults."""

    def test_failed_state_write_is_not_durable_with_its_token(self):
        """A state write the store fails is NotDurable with its writer's token, for a
        desired patch as for a connection flip (which has none)."""
        store = _FailingStates()
        registry, _, _ = make_registry(store)
        self.successResultOf(registry.add_device("a"))
        store.failing = True
        desired = self.failureResultOf(registry.update_desired("a", {"led": "on"}, token="w"),
                                       errors.NotDurable)
        self.assertEqual((desired.value.token, registry.device("a").desired),
                         ("w", {"led": "on"}))
        self.failureResultOf(registry.set_connection("a", online=True), errors.NotDurable)
        self.assertIn("disk full", desired.value.message)

    def test_held_writes_failed_as_one_commit_are_not_durable(self):
        """Held state writes failed together (as a failed commit) fail with NotDurable;
        a barrier held with them stays a StoreError."""
        registry, store, _ = make_registry()
        self.successResultOf(registry.add_device("a"))
        store.hold()
        changed = registry.update_reported("a", {"t": 1}, token="r")
        unchanged = registry.update_reported("a", {})
        held, store._held = store._held, None
        for _, d, _ in held:
            d.errback(errors.StoreError("storage failed: disk full"))
        self.assertEqual(self.failureResultOf(changed, errors.NotDurable).value.token, "r")
        self.assertNotIsInstance(self.failureResultOf(unchanged, errors.StoreError).value,
                                 errors.NotDurable)

    def test_registry_passes_the_store_failure_on_as_it_is(self):
        """update_reported and update_desired answer with the store's own Deferred: the
        error the store gives is the answer (no errback per write in the registry)."""
        store = _OwnError()
        registry, _, _ = make_registry(store)
        self.successResultOf(registry.add_device("a"))
        for error in (errors.StoreError("storage failed"),
                      errors.NotDurable("kept, not stored", token="x")):
            store.error = error
            self.assertIs(self.failureResultOf(registry.update_reported("a", {"t": 1})).value,
                          error)
            self.assertIs(self.failureResultOf(registry.update_desired("a", {"m": 1})).value,
                          error)
