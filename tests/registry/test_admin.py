"""Tests for broker.registry.admin: broker-admin's changes beside a running broker.

broker-admin writes the database while a broker runs; the broker hands out
cursors broker-admin cannot see (changes not yet stored). A client that
resumes from any cursor it was given must hear of each device change once,
whatever the order of broker-admin's changes, the broker's reloads and its
restarts.
"""

import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.registry import RegistrySettings, open_registry
from broker.registry.admin import AdminDatabase
from broker.registry.database import DB_NAME
from broker.registry.restart import PENDING_CURSOR

from .helpers import admin_call


class Follower:
    """A client of the change feed: what it holds, and every entry it was sent."""

    def __init__(self, test):
        self.test = test
        self.cursor = 0
        self.copy = {}
        self.received = []
        self.entries = []     # (device number, version, removed): each change once

    def follow(self, registry):
        """Page through the feed from the held cursor (limit 1: every page boundary)."""
        more = True
        while more:
            batch = registry.changes_since(self.cursor, limit=1)
            self.test.assertFalse(batch.reset, f"reset from cursor {self.cursor}")
            for view in batch.devices:
                self.received.append((view.name, view.version, view.removed))
                self.entries.append((view.device_number, view.version, view.removed))
                if view.removed:
                    self.copy.pop(view.name, None)
                else:
                    self.copy[view.name] = view.version
            self.cursor, more = batch.cursor, batch.more


class AdminBesideBrokerTests(TestCase):
    """broker-admin's changes reach clients resuming from their cursors, once."""

    def setUp(self):
        self.data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))
        admin = AdminDatabase(self.data_dir, create=True)
        for name in ("y", "gone"):
            admin.add_device(name)
        admin.close()
        self.registry = None

    def open(self, **settings):
        """Open the broker's registry (no admin poll unless the test reloads)."""
        registry = open_registry(self.data_dir, clock=reactor,
                                 settings=RegistrySettings(reload_interval=0, **settings))
        self.addCleanup(registry.stop)
        self.registry = registry
        return registry

    def admin(self, method, *args):
        return admin_call(self.data_dir, method, *args)

    def query(self, sql):
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    @defer.inlineCallbacks
    def run_steps(self, steps):
        """Run ``steps`` (strings: "add NAME", "remove NAME", "report", "reload",
        "restart", "follow") with a follower; check it ends holding the registry's
        devices and versions, having been sent each change once."""
        follower = Follower(self)
        registry = self.open()
        n = 0
        for step in steps:
            kind, _, name = step.partition(" ")
            if kind == "add":
                self.admin("add_device", name)
            elif kind == "remove":
                self.admin("remove_device", name)
            elif kind == "report":
                n += 1
                yield registry.update_reported("y", {"n": n})
            elif kind == "reload":
                yield registry.reload()
            elif kind == "restart":
                yield registry.stop()
                registry = self.open()
            else:
                follower.follow(registry)
        follower.follow(registry)
        truth = {view.name: view.version for view in registry.devices(limit=100)}
        self.assertEqual(follower.copy, truth)
        self.assertEqual(len(follower.entries), len(set(follower.entries)),
                         f"sent twice: {follower.received}")
        return follower

    def test_admin_changes_take_no_cursor(self):
        """broker-admin stores an added device and a removal's tombstone at the pending
        cursor, and leaves the change sequence as the broker stored it."""
        sequence = self.query("SELECT value FROM meta WHERE key = 'sequence'")
        self.admin("add_device", "new")
        self.admin("remove_device", "gone")
        self.assertEqual(self.query("SELECT cursor FROM devices WHERE name = 'new'"),
                         [(PENDING_CURSOR,)])
        self.assertEqual(self.query("SELECT cursor FROM tombstones WHERE name = 'gone'"),
                         [(PENDING_CURSOR,)])
        self.assertEqual(self.query("SELECT value FROM meta WHERE key = 'sequence'"), sequence)

    @defer.inlineCallbacks
    def test_device_added_beside_the_broker_reaches_a_client_after_a_restart(self):
        """A device broker-admin added while the broker ran (no reload before a clean
        stop) is sent to a client resuming from the cursor of a later change."""
        follower = yield self.run_steps(["report", "follow", "add new", "report", "follow",
                                         "restart", "follow"])
        [entry] = [r for r in follower.received if r[0] == "new"]
        self.assertFalse(entry[2])
        self.assertGreater(entry[1], 1)     # its version starts at the cursor it was given

    @defer.inlineCallbacks
    def test_device_removed_beside_the_broker_reaches_a_client_after_a_restart(self):
        """A device broker-admin removed while the broker ran (no reload before a clean
        stop) is reported removed to a client resuming from a later cursor."""
        follower = yield self.run_steps(["report", "follow", "remove gone", "report",
                                         "follow", "restart", "follow"])
        self.assertEqual([r for r in follower.received if r[0] == "gone"][-1][2], True)

    @defer.inlineCallbacks
    def test_removal_applied_by_a_reload_is_one_entry(self):
        """A removal the running broker reloaded is one feed entry and one tombstone,
        also after a restart."""
        follower = yield self.run_steps(["report", "follow", "remove gone", "report",
                                         "follow", "reload", "follow", "restart", "follow"])
        self.assertEqual(len([r for r in follower.received if r[0] == "gone" and r[2]]), 1)
        self.assertEqual(len(self.query("SELECT 1 FROM tombstones WHERE name = 'gone'")), 1)

    @defer.inlineCallbacks
    def test_addition_applied_by_a_reload_is_sent_once(self):
        """A device the running broker reloaded keeps its cursor across a restart (it
        is not sent again), and its later removal by broker-admin arrives once."""
        follower = yield self.run_steps(["add new", "reload", "follow", "restart", "follow",
                                         "remove new", "report", "restart", "follow",
                                         "add late", "reload", "restart", "follow"])
        added, removed = [r for r in follower.received if r[0] == "new"]
        self.assertEqual((added[2], removed), (False, ("new", added[1] + 1, True)))

    @defer.inlineCallbacks
    def test_prune_keeps_the_tombstone_broker_admin_made(self):
        """A prune of old tombstones (a starting broker's) committed after broker-admin
        removed a device keeps broker-admin's tombstone: the removal still reaches a
        client at the next start."""
        registry = self.open()
        for name in ("a", "b"):
            yield registry.add_device(name)
        for name in ("a", "b"):
            yield registry.remove_device(name)
        follower = Follower(self)
        follower.follow(registry)
        yield registry.stop()
        registry = self.open(feed_retention=1)      # queues the prune of a's tombstone
        self.admin("remove_device", "gone")         # before that commit
        yield registry.stop()
        self.assertEqual(len(self.query("SELECT 1 FROM tombstones WHERE name = 'gone'")), 1)
        again = self.open(feed_retention=1)
        batch = again.changes_since(follower.cursor)
        self.assertFalse(batch.reset)
        self.assertEqual([(v.name, v.removed) for v in batch.devices], [("gone", True)])

    @defer.inlineCallbacks
    def test_name_removed_and_added_again_while_stopped_stays(self):
        """A name broker-admin removes and adds again before the next start is
        sent removed, then added: a client that held it holds the new device."""
        follower = yield self.run_steps(["report", "follow", "remove gone", "add gone",
                                         "restart", "follow"])
        self.assertIn("gone", follower.copy)
        self.assertEqual([r[2] for r in follower.received if r[0] == "gone"],
                         [False, True, False])

    @defer.inlineCallbacks
    def test_name_added_removed_and_added_within_one_reload_stays(self):
        """A device broker-admin adds and removes before the running broker reloads
        leaves no tombstone: the name's next device stays after a clean restart."""
        follower = yield self.run_steps(["report", "follow", "add x", "remove x", "add x",
                                         "reload", "follow", "restart", "follow"])
        self.assertIn("x", follower.copy)
        self.assertEqual(self.query("SELECT number FROM tombstones WHERE name = 'x'"), [])

    @defer.inlineCallbacks
    def test_name_removed_added_and_removed_again_while_stopped_is_gone(self):
        """remove, add, remove of one name before the next start: a client that
        held it holds it no more."""
        follower = yield self.run_steps(["report", "follow", "remove gone", "add gone",
                                         "remove gone", "restart", "follow"])
        self.assertNotIn("gone", follower.copy)

    @defer.inlineCallbacks
    def test_name_removed_and_added_twice_while_stopped_stays(self):
        """remove, add, remove, add of one name before the next start: a client that
        held it holds the last device."""
        follower = yield self.run_steps(["report", "follow", "remove gone", "add gone",
                                         "remove gone", "add gone", "restart", "follow"])
        self.assertIn("gone", follower.copy)

    @defer.inlineCallbacks
    def test_name_reprovisioned_beside_the_broker_in_every_order(self):
        """remove, add, remove of a name the broker holds, with a reload or not, before
        a clean restart: a client ends holding what the registry holds."""
        for steps in (["remove gone", "add gone", "remove gone", "reload"],
                      ["add x", "remove x", "reload", "add x", "remove x", "add x"],
                      ["add x", "remove x", "add x", "remove x", "reload"]):
            self.setUp()
            yield self.run_steps(["report", "follow"] + steps + ["follow", "restart",
                                                                 "follow"])
