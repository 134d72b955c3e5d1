"""Tests for broker.registry.sqlite_store and database: the embedded SQLite store."""

import os
import sqlite3
import stat

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from broker.registry import RegistrySettings, SessionRecord, errors, open_registry
from broker.registry.admin import AdminDatabase
from broker.registry import database as database_module
from broker.registry.database import DB_NAME, SCHEMA_VERSION, decode_state


class SQLiteRegistryTests(TestCase):
    """A registry over SQLite on the real reactor (writer thread, group commit)."""

    def setUp(self):
        self.data_dir = os.path.join(self.mktemp(), "data")
        self.registries = []

    def open(self, **settings):
        registry = open_registry(self.data_dir, clock=reactor,
                                 settings=RegistrySettings(**settings))
        self.registries.append(registry)
        self.addCleanup(registry.stop)
        return registry

    @defer.inlineCallbacks
    def test_schema_1_is_migrated(self):
        """A database of schema 1 (no sequence mark in session records) is brought to
        the current schema by a starting broker (broker-admin refuses: an older broker
        may still run on it); its records load with mark 0 and take marks from then on."""
        registry = self.open()
        prov = yield registry.add_device("a")
        yield registry.save_session(prov.device_number, SessionRecord(9, seq_reservation=64))
        yield registry.stop()
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        conn.execute("ALTER TABLE sessions DROP COLUMN remote_seq")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
        conn.close()
        with self.assertRaises(errors.StoreError) as caught:
            AdminDatabase(self.data_dir)           # broker-admin never migrates
        self.assertIn("start the broker", str(caught.exception))
        again = self.open()
        self.assertEqual(again.session_record(prov.device_number),
                         SessionRecord(9, seq_reservation=64, remote_seq=0))
        yield again.save_session(prov.device_number,
                                 SessionRecord(9, seq_reservation=64, remote_seq=12))
        yield again.stop()
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(conn.execute("SELECT remote_seq FROM sessions").fetchall(), [(12,)])

    @defer.inlineCallbacks
    def test_restart_restores_everything(self):
        """Devices, state, versions, tokens, sessions and the change sequence survive a restart."""
        registry = self.open()
        prov = yield registry.add_device("a")
        yield registry.add_device("b")
        yield registry.update_reported("a", {"t": 1.25, "m": {"x": [1, b"\x00"]}, "s": "é"})
        yield registry.update_desired("a", {"t": 2})
        yield registry.remove_device("b")
        _, text = yield registry.add_token("write")
        record = SessionRecord(session_id=(1 << 64) - 2, acked_remote_num=3,
                               acked_remote_state=b"abc", local_num=4, local_state=b"",
                               seq_reservation=(1 << 63) + 5, remote_seq=(1 << 63) - 7)
        yield registry.save_session(prov.device_number, record)
        cursor = registry.cursor
        before = registry.device("a")
        yield registry.stop()
        again = self.open()
        after = again.device("a")
        self.assertEqual((after.version, after.reported, after.desired, after.updated_at, after.history),
                         (before.version, before.reported, before.desired, before.updated_at,
                          before.history))
        self.assertEqual(again.secret_for(prov.device_number), prov.secret)
        self.assertEqual(again.session_record(prov.device_number), record)
        self.assertEqual(again.check_token(text), "write")
        self.assertIsNone(again.device("b"))
        self.assertEqual(again.cursor, cursor)
        removed = again.changes_since(before.cursor)
        self.assertEqual([(v.name, v.removed) for v in removed.devices], [("b", True)])

    @defer.inlineCallbacks
    def test_group_commit(self):
        """Writes issued together are made durable by a few commits, each acked with its version."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.add_device("b")
        store = registry._store
        commits = store.commits
        results = yield defer.gatherResults(
            [registry.update_reported("ab"[i % 2], {"i": i}) for i in range(2000)])
        self.assertEqual([r.cursor for r in results], list(range(3, 2003)))
        self.assertLess(store.commits - commits, 100)
        yield registry.stop()
        again = self.open()
        self.assertEqual(again.device("a").reported["i"], 1998)
        self.assertEqual(again.device("b").reported["i"], 1999)

    @defer.inlineCallbacks
    def test_writes_of_one_turn_share_a_commit(self):
        """Writes queued in one reactor turn, even at an idle store, land in ONE transaction."""
        registry = self.open()
        prov = yield registry.add_device("a")
        store = registry._store
        commits = store.commits
        report = registry.update_reported("a", {"t": 1.0}, events=("e",))
        saved = registry.save_session(prov.device_number, SessionRecord(7, acked_remote_num=1))
        yield defer.gatherResults([report, saved])
        self.assertEqual(store.commits - commits, 1)

    @defer.inlineCallbacks
    def test_update_reported_many_is_one_durable_write(self):
        """A batch is one store write in one commit and survives a restart."""
        registry = self.open()
        for name in "abc":
            yield registry.add_device(name)
        store = registry._store
        commits, operations = store.commits, store.operations
        results = yield registry.update_reported_many(
            [(name, {"t": float(i)}) for i, name in enumerate("abcabc")])
        self.assertEqual([r.version for r in results], [2, 3, 4, 3, 4, 5])  # begun at 1, 2, 3
        self.assertEqual((store.commits - commits, store.operations - operations), (1, 1))
        yield registry.stop()
        again = self.open()
        self.assertEqual([again.device(n).reported["t"] for n in "abc"], [3.0, 4.0, 5.0])
        self.assertEqual(again.device("c").version, 5)

    @defer.inlineCallbacks
    def test_save_sessions_is_one_durable_write(self):
        """Session records saved together are one write in one commit, and survive a restart."""
        registry = self.open()
        added = yield defer.gatherResults([registry.add_device(name) for name in "abc"])
        numbers = [prov.device_number for prov in added]
        store = registry._store
        commits, operations = store.commits, store.operations
        records = [SessionRecord(10 + i, acked_remote_num=i, acked_remote_state=b"s%d" % i,
                                 seq_reservation=64, remote_seq=i) for i in range(3)]
        results = yield registry.save_sessions(list(zip(numbers, records)))
        self.assertEqual(results, records)
        self.assertEqual((store.commits - commits, store.operations - operations), (1, 1))
        yield registry.stop()
        again = self.open()
        self.assertEqual([again.session_record(n) for n in numbers], records)

    @defer.inlineCallbacks
    def test_latest_session_record_of_a_turn_wins(self):
        """Several records of one device queued in one turn leave its latest in the database."""
        registry = self.open()
        number = (yield registry.add_device("a")).device_number
        first = registry.save_session(number, SessionRecord(5, acked_remote_num=1))
        batch = registry.save_sessions([(number, SessionRecord(5, acked_remote_num=2))])
        last = registry.save_session(number, SessionRecord(5, acked_remote_num=3))
        yield defer.gatherResults([first, batch, last])
        batch = registry.save_sessions([(number, SessionRecord(5, acked_remote_num=4))])
        last = registry.save_session(number, SessionRecord(5, acked_remote_num=5))
        yield defer.gatherResults([batch, last])
        yield registry.stop()
        self.assertEqual(self.open().session_record(number).acked_remote_num, 5)

    def read_committed(self, result, stored):
        """Append what the database holds (the session rows' acked numbers, the one
        device's reported values) to ``stored``; pass ``result`` on."""
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        acked = conn.execute("SELECT acked_remote_num FROM sessions").fetchall()
        [(blob,)] = conn.execute("SELECT state FROM devices").fetchall()
        conn.close()
        rkeys, rvals = decode_state(blob)[:2]
        stored.append((acked, dict(zip(rkeys, rvals))))
        return result

    @defer.inlineCallbacks
    def test_session_records_commit_as_saved(self):
        """A batch of records commits the records it was given, not newer ones saved after it
        that a later commit carries (here max_batch puts every write in its own commit)."""
        registry = self.open(max_batch=1)
        number = (yield registry.add_device("a")).device_number
        stored = []
        first = registry.save_sessions([(number, SessionRecord(5, acked_remote_num=1))])
        first.addCallback(self.read_committed, stored)
        second = registry.save_session(number, SessionRecord(5, acked_remote_num=2))
        yield defer.gatherResults([first, second])
        self.assertEqual([acked for acked, _ in stored], [[(1,)]])
        yield registry.stop()
        self.assertEqual(self.open().session_record(number).acked_remote_num, 2)

    @defer.inlineCallbacks
    def test_cut_commit_carries_the_record_of_the_state_it_writes(self):
        """When max_batch cuts the queue, a device written as it is now (with a later
        report's values) commits with that report's session record, never the older one:
        after a crash the stored state and the record that names it agree."""
        registry = self.open(max_batch=1)
        number = (yield registry.add_device("a")).device_number
        stored = []
        first = registry.update_reported_many([(number, {"n": 1})])
        first.addCallback(self.read_committed, stored)
        writes = [first, registry.save_sessions([(number, SessionRecord(5, acked_remote_num=1))]),
                  registry.update_reported_many([(number, {"n": 2})]),
                  registry.save_sessions([(number, SessionRecord(5, acked_remote_num=2))])]
        yield defer.gatherResults(writes)
        [(acked, reported)] = stored
        self.assertEqual((acked, reported["n"]), ([(2,)], 2))
        yield registry.stop()
        reopened = self.open()
        self.assertEqual(reopened.session_record(number).acked_remote_num, 2)
        self.assertEqual(reopened.device("a").reported["n"], 2)

    @defer.inlineCallbacks
    def test_removal_after_session_records_of_its_turn(self):
        """A device removed in the turn its session record was saved in leaves no record behind."""
        registry = self.open()
        kept = (yield registry.add_device("a")).device_number
        gone = (yield registry.add_device("b")).device_number
        saved = registry.save_sessions([(kept, SessionRecord(3)), (gone, SessionRecord(4))])
        removed = registry.remove_device("b")
        yield defer.gatherResults([saved, removed])
        yield registry.stop()
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT number, session_id FROM sessions").fetchall(),
                         [(kept, 3)])

    @defer.inlineCallbacks
    def test_stop_in_the_same_turn_commits(self):
        """stop() right after writes (before the end-of-turn hand-over) still commits them."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.stop()
        registry = self.open()
        pending = registry.update_reported("a", {"t": 2.0})
        yield registry.stop()
        self.assertEqual((yield pending).version, 2)
        self.assertEqual(self.open().device("a").reported["t"], 2.0)

    @defer.inlineCallbacks
    def test_files_are_private(self):
        """The data directory is created 0700 and the database 0600."""
        registry = self.open()
        yield registry.add_device("a")
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.data_dir, DB_NAME)).st_mode), 0o600)
        for suffix in ("-wal", "-shm"):
            path = os.path.join(self.data_dir, DB_NAME + suffix)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, suffix)

    @defer.inlineCallbacks
    def test_loose_existing_files_made_private(self):
        """A data directory and database that others could read are made private on open."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.stop()
        database = os.path.join(self.data_dir, DB_NAME)
        os.chmod(self.data_dir, 0o755)
        os.chmod(database, 0o644)
        registry = self.open()
        self.assertEqual(registry.device("a").name, "a")
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(database).st_mode), 0o600)

    @defer.inlineCallbacks
    def test_loose_wal_and_shm_files_made_private(self):
        """Leftover -wal and -shm files that others could read are made private on open."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.stop()
        database = os.path.join(self.data_dir, DB_NAME)
        for suffix in ("-wal", "-shm"):
            with open(database + suffix, "ab"):
                pass
            os.chmod(database + suffix, 0o644)
        self.open()
        for suffix in ("-wal", "-shm"):
            self.assertEqual(stat.S_IMODE(os.stat(database + suffix).st_mode), 0o600, suffix)

    @defer.inlineCallbacks
    def test_file_that_cannot_be_made_private_is_a_store_error(self):
        """A loose database file the broker may not chmod is a StoreError naming the file."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.stop()
        database = os.path.join(self.data_dir, DB_NAME)
        os.chmod(database, 0o644)

        def refuse(path, mode):
            raise PermissionError(1, "Operation not permitted", path)
        self.patch(database_module.os, "chmod", refuse)
        with self.assertRaises(errors.StoreError) as caught:
            self.open()
        self.assertIn(f"cannot make {database} private", str(caught.exception))

    @defer.inlineCallbacks
    def test_read_only_database_refused_at_open(self):
        """A database this user may only read is refused when the broker opens it, not at
        its first write; broker-admin still reads it."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.stop()
        database = os.path.join(self.data_dir, DB_NAME)
        with open(database, "rb") as f:
            before = f.read()
        real_connect = database_module.sqlite3.connect

        def read_only(path, **kwargs):
            # What SQLite does with a file its user may not write (root may write any).
            return real_connect(f"file:{path}?mode=ro", uri=True, **kwargs)
        self.patch(database_module.sqlite3, "connect", read_only)
        with self.assertRaises(errors.StoreError) as caught:
            self.open()
        self.assertIn("read-only for this user", str(caught.exception))
        admin = AdminDatabase(self.data_dir)
        self.addCleanup(admin.close)
        self.assertEqual([view.name for view in admin.devices()], ["a"])
        with open(database, "rb") as f:
            self.assertEqual(f.read(), before)

    @defer.inlineCallbacks
    def test_stop_commits_pending(self):
        """stop() makes everything already written durable before it fires."""
        registry = self.open()
        yield registry.add_device("a")
        pending = [registry.update_reported("a", {"i": i}) for i in range(50)]
        yield registry.stop()
        self.assertEqual((yield pending[-1]).version, 51)
        again = self.open()
        self.assertEqual(again.device("a").reported["i"], 49)

    @defer.inlineCallbacks
    def test_admin_changes_reach_running_registry(self):
        """Devices and tokens changed by broker-admin appear in a running registry after reload."""
        registry = self.open()
        yield registry.add_device("old")
        yield registry.update_reported("old", {"x": 1})
        admin = AdminDatabase(self.data_dir)
        self.addCleanup(admin.close)
        number, secret = admin.add_device("new")
        _, text = admin.add_token("read")
        told = []
        registry.watch_keys(told.append)
        yield registry.reload()
        self.assertEqual(registry.secret_for(number), secret)
        self.assertEqual(registry.check_token(text), "read")
        self.assertGreater(registry.device("new").cursor, registry.device("old").cursor)
        _, rotated = admin.rotate_key("new")
        admin.remove_device("old")
        yield registry.reload()
        self.assertEqual(registry.secret_for(number), rotated)
        self.assertIsNone(registry.device("old"))
        self.assertEqual(len(told), 2)
        yield registry.update_reported("new", {"t": 1})
        yield registry.stop()
        again = self.open()
        self.assertEqual(again.device("new").reported["t"], 1)
        self.assertIsNone(again.device("old"))

    @defer.inlineCallbacks
    def test_add_of_a_name_broker_admin_just_took(self):
        """A device added while broker-admin's device of the same name is not reloaded
        yet is refused and leaves nothing behind; the reload then serves the admin's."""
        registry = self.open()
        admin = AdminDatabase(self.data_dir)
        self.addCleanup(admin.close)
        number, secret = admin.add_device("twin")
        yield self.assertFailure(registry.add_device("twin"), errors.DeviceExists)
        self.assertIsNone(registry.device("twin"))
        yield registry.reload()
        self.assertEqual(registry.device("twin").device_number, number)
        self.assertEqual(registry.secret_for(number), secret)
        result = yield registry.update_reported("twin", {"t": 1})
        yield registry.stop()
        again = self.open()
        self.assertEqual(again.device("twin").version, result.version)

    @defer.inlineCallbacks
    def test_cli_process_beside_running_registry(self):
        """broker-admin run as a separate process adds a device a running registry then serves."""
        import json
        import subprocess
        import sys
        registry = self.open()
        yield registry.add_device("first")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        done = subprocess.run([sys.executable, "-m", "broker.registry.cli", "--json",
                               "--data-dir", os.path.abspath(self.data_dir),
                               "device", "add", "second"],
                              cwd=root, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        added = json.loads(done.stdout)
        yield registry.reload()
        view = registry.device_by_number(int(added["device_number"]))
        self.assertEqual(view.name, "second")
        result = yield registry.update_reported("second", {"t": 1.0})
        self.assertEqual(result.version, view.version + 1)

    @defer.inlineCallbacks
    def test_reload_polls_after_start(self):
        """After start() the registry picks up admin changes by itself, every reload_interval."""
        clock = task.Clock()
        registry = open_registry(self.data_dir, clock=clock,
                                 settings=RegistrySettings(reload_interval=5.0))
        self.addCleanup(registry.stop)
        polls = []
        reload = registry.reload
        registry.reload = lambda: polls.append(reload()) or polls[-1]
        yield registry.start()
        admin = AdminDatabase(self.data_dir)
        self.addCleanup(admin.close)
        admin.add_device("late")
        clock.advance(4.9)
        self.assertEqual(polls, [])
        clock.advance(0.1)
        self.assertEqual(len(polls), 1)
        yield polls[0]
        self.assertIsNotNone(registry.device("late"))


class DatabaseGuardTests(TestCase):
    """Damaged or foreign files stop startup with a clear error and stay untouched."""

    def setUp(self):
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.path = os.path.join(self.data_dir, DB_NAME)

    def assertRefused(self, fragment):
        with open(self.path, "rb") as f:
            before = f.read()
        with self.assertRaises(errors.StoreError) as caught:
            open_registry(self.data_dir, clock=reactor)
        self.assertIn(fragment, str(caught.exception))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_junk_file(self):
        """A file that is not SQLite is refused."""
        with open(self.path, "wb") as f:
            f.write(b"not a database at all" * 100)
        self.assertRefused("not an SQLite database")

    def test_foreign_sqlite(self):
        """Another program's SQLite database is refused."""
        conn = sqlite3.connect(self.path)
        conn.execute("CREATE TABLE photos (id INTEGER)")
        conn.commit()
        conn.close()
        self.assertRefused("another program")

    def test_other_application_id(self):
        """An SQLite database with another application_id is refused."""
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA application_id = 1234")
        conn.execute("CREATE TABLE t (id INTEGER)")
        conn.commit()
        conn.close()
        self.assertRefused("another program")

    def test_newer_schema(self):
        """Our database with an unknown schema version is refused."""
        open_registry(self.data_dir, clock=reactor)._store.close()
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
        conn.close()
        self.assertRefused("schema 99")

    def test_truncated_database(self):
        """A database cut short (damaged) is refused."""
        store = open_registry(self.data_dir, clock=reactor)._store
        store.close()
        admin = AdminDatabase(self.data_dir)
        for i in range(200):
            admin.add_device(f"d{i}")
        admin._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        admin.close()
        size = os.path.getsize(self.path)
        with open(self.path, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * (size - 4096))
        self.assertRefused("damaged")


class DamagedRowTests(TestCase):
    """A damaged row stops startup with a clear error."""

    def test_damaged_state_blob(self):
        """A device whose stored state is not CBOR stops the registry from opening."""
        data_dir = self.mktemp()
        admin = AdminDatabase(data_dir, create=True)
        admin.add_device("a")
        admin._conn.execute("UPDATE devices SET state = x'ff00ff'")
        admin.close()
        with self.assertRaises(errors.StoreError) as caught:
            open_registry(data_dir, clock=reactor)
        self.assertIn("damaged device state", str(caught.exception))


class FailedCommitTests(TestCase):
    """A commit that fails (here: a trigger raising, as a full disk would) loses
    nothing the registry in memory holds: its devices are written again."""

    def setUp(self):
        self.data_dir = os.path.join(self.mktemp(), "data")
        self.clock = task.Clock()
        self.registry = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(self.registry.stop)
        self.store = self.registry._store

    def break_storage(self):
        """Make every write of a device's row fail, from another connection."""
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME), isolation_level=None)
        conn.execute("CREATE TRIGGER full_disk BEFORE UPDATE ON devices"
                     " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        return conn

    def stored(self, name):
        """(online, session id) of ``name`` as the database holds them now."""
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        self.addCleanup(conn.close)
        state, = conn.execute("SELECT state FROM devices WHERE name = ?", (name,)).fetchone()
        sid = conn.execute("SELECT s.session_id FROM sessions s JOIN devices d"
                           " ON s.number = d.number WHERE d.name = ?", (name,)).fetchone()
        return decode_state(state)[6], sid and sid[0]

    @defer.inlineCallbacks
    def settle(self):
        """Let queued commits finish (a barrier is committed with or after them)."""
        yield self.store.barrier().addErrback(lambda failure: failure.trap(errors.StoreError))

    @defer.inlineCallbacks
    def test_offline_flip_of_a_failed_commit_is_stored_later(self):
        """A device going offline while storage fails is stored offline once storage
        is back, by the retry timer, although the device never writes again."""
        prov = yield self.registry.add_device("a")
        yield self.registry.set_connection("a", online=True)
        yield self.registry.save_session(prov.device_number, SessionRecord(5))
        self.assertEqual(self.stored("a"), (True, 5))
        broken = self.break_storage()
        with self.assertRaises(errors.StoreError):
            yield self.registry.set_connection("a", online=False)
        self.assertFalse(self.registry.device("a").online)   # memory keeps the change
        self.assertEqual(self.store.unsaved.failed_commits, 1)
        self.clock.advance(0.99)
        self.assertEqual(self.store.unsaved.rewritten_devices, 0)     # not before RETRY_DELAY
        self.clock.advance(0.01)                              # still broken: fails again
        yield self.settle()
        self.assertEqual((self.store.unsaved.rewritten_devices, self.store.unsaved.failed_commits), (1, 2))
        self.assertEqual(self.stored("a"), (True, 5))
        broken.execute("DROP TRIGGER full_disk")
        broken.close()
        self.clock.advance(1.99)                              # the delay doubled
        self.assertEqual(self.store.unsaved.rewritten_devices, 1)
        self.clock.advance(0.01)
        yield self.settle()
        self.assertEqual(self.store.unsaved.rewritten_devices, 2)
        self.assertEqual(self.stored("a"), (False, 5))
        self.assertEqual(self.clock.getDelayedCalls(), [])   # nothing left to retry
        # Exported with the registry's events (broker_registry_events_total).
        self.assertEqual((self.registry.counters["store_commit_failed"],
                          self.registry.counters["store_devices_rewritten"]), (2, 2))

    @defer.inlineCallbacks
    def test_later_commit_writing_the_device_cancels_the_retry(self):
        """A device written by a later successful commit is not written again, and the
        timer goes when no device is left unsaved."""
        yield self.registry.add_device("a")
        broken = self.break_storage()
        with self.assertRaises(errors.StoreError):
            yield self.registry.update_desired("a", {"mode": "eco"})
        broken.execute("DROP TRIGGER full_disk")
        broken.close()
        yield self.registry.update_reported("a", {"t": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self.store.unsaved.rewritten_devices, 0)
        yield self.registry.stop()
        again = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(again.stop)
        self.assertEqual(again.device("a").desired, {"mode": "eco"})

    @defer.inlineCallbacks
    def test_stop_writes_the_unsaved_devices(self):
        """Stopping the registry writes a failed commit's devices once more, with
        their session records."""
        prov = yield self.registry.add_device("a")
        broken = self.break_storage()
        desired = self.registry.update_desired("a", {"mode": "eco"})
        saved = self.registry.save_session(prov.device_number, SessionRecord(9))
        yield self.assertFailure(desired, errors.StoreError)
        yield self.assertFailure(saved, errors.StoreError)
        broken.execute("DROP TRIGGER full_disk")
        broken.close()
        yield self.registry.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        again = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(again.stop)
        self.assertEqual(again.device("a").desired, {"mode": "eco"})
        self.assertEqual(again.session_record(prov.device_number), SessionRecord(9))

    @defer.inlineCallbacks
    def test_stop_during_a_commit_that_fails_writes_its_devices(self):
        """A commit that fails while the registry stops gets the last try too: its
        devices (and their session records) are written once more before the store
        closes."""
        prov = yield self.registry.add_device("a")
        broken = self.break_storage()
        done = self.store._done

        def storage_back(batch, results, failures):
            if isinstance(failures, Failure):
                broken.execute("DROP TRIGGER IF EXISTS full_disk")
            done(batch, results, failures)
        self.store._done = storage_back
        desired = self.registry.update_desired("a", {"mode": "eco"})
        saved = self.registry.save_session(prov.device_number, SessionRecord(4))
        stopped = self.registry.stop()            # the commit of both is under way
        yield self.assertFailure(desired, errors.StoreError)
        yield self.assertFailure(saved, errors.StoreError)
        yield stopped
        broken.close()
        self.assertEqual(self.store.unsaved.rewritten_devices, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        again = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(again.stop)
        self.assertEqual(again.device("a").desired, {"mode": "eco"})
        self.assertEqual(again.session_record(prov.device_number), SessionRecord(4))

    @defer.inlineCallbacks
    def test_stop_while_storage_fails_leaves_no_timer(self):
        """A registry stopping while storage still fails stops, with no retry left armed."""
        yield self.registry.add_device("a")
        broken = self.break_storage()
        self.addCleanup(broken.close)
        yield self.assertFailure(self.registry.update_desired("a", {"mode": "eco"}),
                                 errors.StoreError)
        yield self.registry.stop()
        self.assertEqual(self.store.unsaved.failed_commits, 2)   # the last try failed too
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def stored_version(self, name):
        """The version of ``name`` the database holds now."""
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        self.addCleanup(conn.close)
        return conn.execute("SELECT version FROM devices WHERE name = ?", (name,)).fetchone()[0]

    @defer.inlineCallbacks
    def test_no_change_write_after_a_failed_commit_is_not_acknowledged_unstored(self):
        """While a device's state cannot be stored after a failed commit, a write
        that changes nothing (an empty patch, alone or in a batch) fails instead of
        claiming the unstored version; once storage is back it stores that state
        before it answers with its version."""
        yield self.registry.add_device("a")
        broken = self.break_storage()
        yield self.assertFailure(self.registry.update_reported("a", {"t": 7}), errors.StoreError)
        version = self.registry.device("a").version
        self.assertLess(self.stored_version("a"), version)
        for empty in (lambda: self.registry.update_reported("a", {}),
                      lambda: self.registry.update_desired("a", {}),
                      lambda: self.registry.update_reported_many([("a", {})]),
                      lambda: self.registry.update_reported_many([("a", {}), ("a", {"u": 1})])):
            yield self.assertFailure(empty(), errors.StoreError)
        broken.execute("DROP TRIGGER full_disk")
        broken.close()
        version = self.registry.device("a").version
        result = yield self.registry.update_desired("a", {})
        self.assertEqual(result.version, version)
        self.assertEqual(self.stored_version("a"), version)
        results = yield self.registry.update_reported_many([("a", {})])
        self.assertEqual([r.version for r in results], [version])

    @defer.inlineCallbacks
    def test_no_change_write_during_a_failing_commit_waits_for_the_state(self):
        """A write that changes nothing, made while the commit of the device's change
        is under way and then fails, is not acknowledged before that state is stored."""
        yield self.registry.add_device("a")
        broken = self.break_storage()
        done = self.store._done
        during = []

        def failing(batch, results, failures):
            if not during:      # the commit has failed; the registry does not know yet
                during.append(self.registry.update_reported("a", {}))
            done(batch, results, failures)
        self.store._done = failing
        yield self.assertFailure(self.registry.update_reported("a", {"t": 7}), errors.StoreError)
        self.store._done = done
        yield self.assertFailure(during[0], errors.StoreError)
        broken.execute("DROP TRIGGER full_disk")
        broken.close()
        result = yield self.registry.update_reported("a", {})
        self.assertEqual(self.stored_version("a"), result.version)

    @defer.inlineCallbacks
    def test_session_record_after_a_failed_commit_carries_the_state(self):
        """A session record written after a failed commit commits with its device's
        state as the registry holds it: never durable ahead of what it acknowledges."""
        prov = yield self.registry.add_device("a")
        broken = self.break_storage()
        yield self.assertFailure(self.registry.update_reported("a", {"t": 7}, events=("e1",)),
                                 errors.StoreError)
        broken.execute("DROP TRIGGER full_disk")
        broken.close()
        commits = self.store.commits
        yield self.registry.save_session(prov.device_number, SessionRecord(3, acked_remote_num=4))
        self.assertEqual(self.store.commits - commits, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])          # nothing left unsaved
        yield self.registry.stop()
        again = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(again.stop)
        self.assertEqual(again.device("a").reported, {"t": 7})
        self.assertEqual(again.session_record(prov.device_number).acked_remote_num, 4)

    @defer.inlineCallbacks
    def test_failed_rollback_keeps_the_writer(self):
        """A ROLLBACK that fails after a failed COMMIT (the same broken disk) fails
        that commit's writes but keeps the writer thread, and the next commit rolls
        the transaction left open back first: later writes are stored."""
        yield self.registry.add_device("a")
        conn = self.store._conn
        self.store._conn = _BrokenDisk(conn)
        yield self.assertFailure(self.registry.update_desired("a", {"mode": "eco"}),
                                 errors.StoreError)
        self.assertEqual(self.store._conn.failed, ["COMMIT", "ROLLBACK"])
        self.assertTrue(conn.in_transaction)
        self.store._conn = conn
        yield self.registry.update_desired("a", {"mode": "away"})
        yield self.registry.stop()
        again = open_registry(self.data_dir, clock=self.clock, reactor=reactor)
        self.addCleanup(again.stop)
        self.assertEqual(again.device("a").desired, {"mode": "away"})


class _BrokenDisk:
    """A connection whose COMMIT and ROLLBACK fail without running (so the
    transaction stays open), as on a disk that has just failed."""

    def __init__(self, conn):
        self._conn = conn
        self.failed = []

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def execute(self, sql, *args):
        if sql in ("COMMIT", "ROLLBACK"):
            self.failed.append(sql)
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)
