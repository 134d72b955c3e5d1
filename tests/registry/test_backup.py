"""broker-admin backup and restore of the SQLite registry (broker/registry/sqlite_backup.py).

Real SQLite files throughout: backups taken while another connection or a
registry's store commits, restores over databases with WAL files left by a
crash, a real broker holding the data directory's lock.
"""

import fcntl
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from broker.registry import DeviceRegistry, RegistrySettings, SessionRecord, cli, sqlite_backup
from broker.registry.admin import AdminDatabase
from broker.registry.database import DB_NAME, SCHEMA_VERSION
from broker.registry.restart import CURSOR_GAP
from broker.registry.sqlite_store import SQLiteStore
from tests.registry.test_cli import (NOBODY, admin_as_other_user, admin_command, run,
                                     shared_directory)


def run_admin(*argv):
    """broker-admin in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def query(path, sql):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def names(path):
    return [row[0] for row in query(path, "SELECT name FROM devices ORDER BY name")]


def meta(path):
    return dict(query(path, "SELECT key, value FROM meta"))


class Fixture:
    """Data directories with a registry database made by broker-admin's own code."""

    def make_data_dir(self, devices=("a", "b"), tokens=1):
        data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))
        admin = AdminDatabase(data_dir, create=True)
        for name in devices:
            admin.add_device(name)
        for _ in range(tokens):
            admin.add_token("read")
        admin.close()
        return data_dir

    def add_device(self, data_dir, name):
        admin = AdminDatabase(data_dir)
        admin.add_device(name)
        admin.close()

    def backup_of(self, data_dir):
        dest = os.path.abspath(self.mktemp())
        sqlite_backup.backup(data_dir, dest)
        return dest

    def refused(self, *argv):
        """Run broker-admin expecting exit status 1 and one line on stderr; returns it."""
        status, out, err = run_admin(*argv)
        self.assertEqual((status, out), (1, ""), err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        return err


class BackupTests(Fixture, SynchronousTestCase):
    """broker-admin backup: a private, consistent copy without the clean-stop mark."""

    def test_backup_is_a_private_copy_without_the_clean_stop_mark(self):
        """The copy (mode 0600, one file in rollback-journal mode) holds the devices and
        tokens, lacks the clean-stop mark the live database keeps, and --json says so."""
        data_dir = self.make_data_dir()
        live = os.path.join(data_dir, DB_NAME)
        dest = os.path.abspath(self.mktemp())
        status, out, err = run_admin("--data-dir", data_dir, "--json", "backup", dest)
        self.assertEqual(status, 0, err)
        report = json.loads(out)
        self.assertEqual(report, {"backup": dest, "devices": 2, "tokens": 1,
                                  "bytes": os.path.getsize(dest), "schema": SCHEMA_VERSION})
        self.assertEqual(mode(dest), 0o600)
        self.assertEqual(names(dest), ["a", "b"])
        self.assertIn("clean_stop", meta(live))
        self.assertNotIn("clean_stop", meta(dest))
        self.assertEqual(query(dest, "PRAGMA journal_mode"), [("delete",)])
        self.assertEqual(sorted(os.listdir(os.path.dirname(dest))), [os.path.basename(dest)])

    def test_copy_is_private_from_its_first_byte(self):
        """Even with umask 000 the file being written is 0600 before any page of the
        database (device secrets, token digests) reaches it."""
        data_dir = self.make_data_dir()
        modes = []
        write_copy = sqlite_backup._write_copy

        def watched(conn, temporary, floor=0):
            modes.append(mode(temporary))
            return write_copy(conn, temporary, floor)
        self.patch(sqlite_backup, "_write_copy", watched)
        previous = os.umask(0)
        try:
            dest = self.backup_of(data_dir)
        finally:
            os.umask(previous)
        self.assertEqual((modes, mode(dest)), ([0o600], 0o600))

    def test_human_output(self):
        """Without --json the output names the file, the counts and the size."""
        data_dir = self.make_data_dir()
        dest = os.path.abspath(self.mktemp())
        status, out, err = run_admin("--data-dir", data_dir, "backup", dest)
        self.assertEqual(status, 0, err)
        self.assertIn(f"wrote {dest} (mode 0600): 2 devices, 1 token, "
                      f"{os.path.getsize(dest)} bytes", out)

    def test_existing_dest_is_refused_unless_forced(self):
        """An existing DEST is left alone (exit 1, one line); --force replaces it,
        and the new file is 0600 even where the old one was world-readable."""
        data_dir = self.make_data_dir()
        dest = os.path.abspath(self.mktemp())
        with open(dest, "w") as handle:
            handle.write("keep me\n")
        os.chmod(dest, 0o644)
        err = self.refused("--data-dir", data_dir, "backup", dest)
        self.assertIn("exists", err)
        with open(dest) as handle:
            self.assertEqual(handle.read(), "keep me\n")
        status, _, err = run_admin("--data-dir", data_dir, "backup", "--force", dest)
        self.assertEqual(status, 0, err)
        self.assertEqual((names(dest), mode(dest)), (["a", "b"], 0o600))

    def test_copies_retire_every_session_record(self):
        """A copy's session records keep their ids (older sessions stay refused) but
        never resume: the devices went on past the copy (SessionRecord.retired)."""
        data_dir = self.make_data_dir()
        live = os.path.join(data_dir, DB_NAME)
        number = query(live, "SELECT number FROM devices WHERE name = 'a'")[0][0]
        conn = sqlite3.connect(live)
        conn.execute("INSERT INTO sessions VALUES (?, 77, 5, X'a0', 3, X'', 8192, 40)",
                     (number,))
        conn.commit()
        conn.close()
        dest = os.path.abspath(self.mktemp())
        sqlite_backup.backup(data_dir, dest)
        store = SQLiteStore(dest, reactor=reactor)
        self.addCleanup(store.close)
        sessions = dict(store.load().sessions)
        self.assertEqual(sessions[number], SessionRecord.retired(77))
        self.assertFalse(sessions[number].resumable)
        self.assertTrue(SessionRecord(77, 5).resumable)

    def test_force_never_replaces_a_database_in_use(self):
        """--force onto the registry database itself, or onto any database with a
        -wal beside it, is refused: replaced, it would get that log replayed into it."""
        data_dir = self.make_data_dir()
        live = os.path.join(data_dir, "registry.sqlite3")
        err = self.refused("--data-dir", data_dir, "backup", "--force", live)
        self.assertIn("is the registry database itself", err)
        other = os.path.abspath(self.mktemp())
        with open(other, "w") as handle:
            handle.write("a database\n")
        with open(other + "-wal", "w") as handle:
            handle.write("its log\n")
        err = self.refused("--data-dir", data_dir, "backup", "--force", other)
        self.assertIn("in use", err)
        with open(other) as handle:
            self.assertEqual(handle.read(), "a database\n")

    def test_dest_appearing_during_the_copy_is_not_overwritten(self):
        """A DEST created by someone else while the copy is written is not replaced:
        the finished copy is linked to its name, which fails if the name exists."""
        data_dir = self.make_data_dir()
        dest = os.path.abspath(self.mktemp())
        write_copy = sqlite_backup._write_copy

        def racing(conn, temporary, floor=0):
            counts = write_copy(conn, temporary, floor)
            with open(dest, "w") as handle:
                handle.write("theirs\n")
            return counts
        self.patch(sqlite_backup, "_write_copy", racing)
        self.assertIn("exists", self.refused("--data-dir", data_dir, "backup", dest))
        with open(dest) as handle:
            self.assertEqual(handle.read(), "theirs\n")
        self.assertEqual(os.listdir(os.path.dirname(dest)), [os.path.basename(dest)])

    def test_missing_database(self):
        """A data directory without a registry database is an error, and nothing is written."""
        dest = os.path.abspath(self.mktemp())
        err = self.refused("--data-dir", os.path.abspath(self.mktemp()), "backup", dest)
        self.assertIn("does not exist", err)
        self.assertFalse(os.path.exists(dest))

    def test_consistent_while_another_connection_commits(self):
        """Backups taken while another connection keeps committing (and checkpointing)
        each hold one committed state: each transaction sets one device's version
        and a counter in meta to the same number, and every copy agrees on them."""
        data_dir = self.make_data_dir(devices=[])
        live = os.path.join(data_dir, DB_NAME)
        conn = sqlite3.connect(live)
        conn.executemany("INSERT INTO devices VALUES (?, ?, x'00', 0, ?, randomblob(200))",
                         [(n, f"d{n}", n) for n in range(500)])
        conn.execute("INSERT INTO meta VALUES ('test_counter', 0)")
        conn.commit()
        conn.close()
        done = threading.Event()
        committed = threading.Event()
        commits = [0]
        failures = []

        def writer():
            conn = sqlite3.connect(live, isolation_level=None)
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("PRAGMA wal_autocheckpoint = 1")    # the file itself changes all along
            try:
                while not done.is_set() and commits[0] < 1_000_000:
                    i = commits[0] + 1
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("UPDATE devices SET version = ?, state = randomblob(200)"
                                 " WHERE number = ?", (i, i % 500))
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'test_counter'", (i,))
                    conn.execute("COMMIT")
                    commits[0] = i
                    committed.set()
            except sqlite3.Error as e:
                failures.append(e)
                committed.set()
            finally:
                conn.close()
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            self.assertTrue(committed.wait(30))
            before = commits[0]
            states = []
            for _ in range(50):
                dest = self.backup_of(data_dir)
                self.assertEqual(query(dest, "PRAGMA quick_check"), [("ok",)])
                states.append((query(dest, "SELECT max(version) FROM devices")[0][0],
                               meta(dest)["test_counter"]))
                os.unlink(dest)
            during = commits[0] - before
        finally:
            done.set()
            thread.join(30)
        self.assertEqual(failures, [])
        self.assertGreater(during, 0)     # the writer did commit while the backups ran
        self.assertGreater(len(set(states)), 1)
        for version, counter in states:
            self.assertEqual(version, counter)


class ReadOnlyTests(Fixture, SynchronousTestCase):
    """An intact database SQLite cannot create side files beside is never called damaged."""

    def test_backup_by_a_user_who_may_only_read(self):
        """backup by a user who may read the database but not write its directory says
        that SQLite needs to create the -shm there, not "damaged"; nothing is written."""
        tmp = shared_directory(self)
        data_dir = os.path.join(tmp, "data")
        shutil.copytree(self.make_data_dir(), data_dir)
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        database = os.path.join(data_dir, DB_NAME)
        if os.getuid() == 0:
            for path in (data_dir, database, out):
                os.chown(path, NOBODY, NOBODY)
        os.chmod(database, 0o400)
        os.chmod(data_dir, 0o500)
        self.addCleanup(os.chmod, data_dir, 0o700)
        status, _, err = admin_as_other_user(
            self, "--data-dir", data_dir, "backup", os.path.join(out, "b.sqlite3"))
        self.assertEqual((status, err), (
            1, f"broker-admin: cannot open {database}: this user may not write in {data_dir}, "
               "and SQLite must create registry.sqlite3-shm there to read a database in WAL "
               "mode: run as the broker's user\n"))
        self.assertEqual(os.listdir(out), [])

    def test_read_only_file_system(self):
        """On a read-only file system (a tmpfs remounted read-only in a mount namespace of
        its own) list and backup name the read-only file system, never damage."""
        if shutil.which("unshare") is None:
            if os.environ.get("CI"):
                self.fail("unshare (util-linux) is missing")
            raise SkipTest("unshare (util-linux) is needed")
        unshare = ["unshare", "-m"] if os.getuid() == 0 else ["unshare", "-r", "-m"]
        if subprocess.run(unshare + ["true"], capture_output=True).returncode != 0:
            raise SkipTest("this kernel or container allows no mount namespace here")
        source = self.make_data_dir()
        mount = os.path.abspath(self.mktemp())
        os.mkdir(mount)
        data_dir = os.path.join(mount, "data")
        dest = os.path.abspath(self.mktemp())
        script = ('mount -t tmpfs -o size=8m tmpfs "$1"; cp -a "$2" "$1/data"; '
                  'mount -o remount,ro "$1"; shift 2; exec "$@"')
        for command in (["device", "list"], ["backup", dest]):
            status, _, err = run(unshare + ["sh", "-ec", script, "sh", mount, source,
                                            *admin_command("--data-dir", data_dir, *command)])
            self.assertEqual((status, err), (
                1, f"broker-admin: cannot open {os.path.join(data_dir, DB_NAME)}: {data_dir} is "
                   "on a read-only file system, and SQLite must create registry.sqlite3-shm "
                   "there to read a database in WAL mode (to read it, copy the data directory "
                   "to a writable place)\n"))
        self.assertFalse(os.path.exists(dest))


class RestoreTests(Fixture, SynchronousTestCase):
    """broker-admin restore: checked source, atomic replacement, the replaced database kept."""

    def test_restore_replaces_the_database_and_keeps_the_old_one(self):
        """The restored database (0600) holds the backup's devices and no clean-stop
        mark; the replaced one is kept as .before-restore (0600, also without the
        mark); no temporary or stale side file is left; broker-admin works on it."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        self.add_device(data_dir, "late")
        live = os.path.join(data_dir, DB_NAME)
        status, out, err = run_admin("--data-dir", data_dir, "--json", "restore", dest)
        self.assertEqual(status, 0, err)
        kept = live + ".before-restore"
        self.assertEqual(json.loads(out), {
            "restored": dest, "database": live, "devices": 2, "tokens": 1,
            "bytes": os.path.getsize(live), "schema": SCHEMA_VERSION, "before_restore": kept})
        self.assertEqual(sorted(os.listdir(data_dir)),
                         ["broker.lock", DB_NAME, DB_NAME + ".before-restore"])
        self.assertEqual((mode(live), mode(kept)), (0o600, 0o600))
        self.assertEqual((names(live), names(kept)), (["a", "b"], ["a", "b", "late"]))
        self.assertNotIn("clean_stop", meta(live))
        self.assertNotIn("clean_stop", meta(kept))
        admin = AdminDatabase(data_dir)
        self.addCleanup(admin.close)
        admin.add_device("after")
        self.assertEqual([v.name for v in admin.devices()], ["a", "after", "b"])

    def test_human_output_and_no_keep(self):
        """--no-keep keeps no copy; the human output names source, database and the next step."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        status, out, err = run_admin("--data-dir", data_dir, "restore", "--no-keep", dest)
        self.assertEqual(status, 0, err)
        self.assertIn(f"restored {dest} into {os.path.join(data_dir, DB_NAME)}: 2 devices", out)
        self.assertIn("start the broker", out)
        self.assertIn("a token revoked or a key rotated since is valid again", out)
        self.assertNotIn("before-restore", out)
        self.assertEqual(sorted(os.listdir(data_dir)), ["broker.lock", DB_NAME])

    def test_an_earlier_kept_copy_is_never_overwritten(self):
        """A second restore refuses while .before-restore exists (it holds the database
        the first restore replaced), changing nothing; with --no-keep it goes ahead."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        self.add_device(data_dir, "original")
        self.assertEqual(run_admin("--data-dir", data_dir, "restore", dest)[0], 0)
        live = os.path.join(data_dir, DB_NAME)
        kept = live + ".before-restore"
        before = digest(live), digest(kept)
        err = self.refused("--data-dir", data_dir, "restore", dest)
        self.assertIn("before-restore exists", err)
        self.assertEqual((digest(live), digest(kept)), before)
        self.assertEqual(run_admin("--data-dir", data_dir, "restore", "--no-keep", dest)[0], 0)
        self.assertEqual(names(kept), ["a", "b", "original"])

    def test_undo_by_restoring_the_kept_copy(self):
        """The kept copy is itself a backup: restoring it with --no-keep brings the
        replaced database back."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        self.add_device(data_dir, "late")
        self.assertEqual(run_admin("--data-dir", data_dir, "restore", dest)[0], 0)
        kept = os.path.join(data_dir, DB_NAME + ".before-restore")
        status, _, err = run_admin("--data-dir", data_dir, "restore", "--no-keep", kept)
        self.assertEqual(status, 0, err)
        self.assertEqual(names(os.path.join(data_dir, DB_NAME)), ["a", "b", "late"])

    def test_stale_wal_of_the_replaced_database_is_never_applied(self):
        """Over a crashed broker's database whose -wal holds committed changes, the
        restored database is exactly the backup (those changes not replayed into
        it), and the kept copy has them (checkpointed before the -wal went)."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        live = os.path.join(data_dir, DB_NAME)
        holder = sqlite3.connect(live)          # keeps the -wal from being checkpointed
        holder.execute("PRAGMA wal_autocheckpoint = 0")
        holder.execute("SELECT count(*) FROM devices").fetchall()
        self.add_device(data_dir, "in-wal")
        crashed = os.path.abspath(os.path.join(self.mktemp(), "data"))
        os.makedirs(crashed, mode=0o700)
        for suffix in ("", "-wal"):            # what kill -9 leaves on disk
            shutil.copy(live + suffix, os.path.join(crashed, DB_NAME + suffix))
        holder.close()
        self.assertGreater(os.path.getsize(os.path.join(crashed, DB_NAME + "-wal")), 0)
        status, _, err = run_admin("--data-dir", crashed, "restore", dest)
        self.assertEqual(status, 0, err)
        restored = os.path.join(crashed, DB_NAME)
        self.assertEqual(sorted(os.listdir(crashed)),
                         ["broker.lock", DB_NAME, DB_NAME + ".before-restore"])
        self.assertEqual(names(restored), ["a", "b"])
        self.assertEqual(names(restored + ".before-restore"), ["a", "b", "in-wal"])

    def test_crash_before_the_rename_leaves_the_old_database_whole(self):
        """Interrupted after the old -wal was removed and before the rename, the data
        directory still holds the old database with every committed change in its
        file (checkpointed first), even while another connection had it open."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        live = os.path.join(data_dir, DB_NAME)
        holder = sqlite3.connect(live)          # another reader: no checkpoint on close
        self.addCleanup(holder.close)
        holder.execute("PRAGMA wal_autocheckpoint = 0")
        holder.execute("SELECT count(*) FROM devices").fetchall()
        self.add_device(data_dir, "in-wal")
        replace = os.replace

        def crash(source, target):
            if target == live:
                raise OSError(5, "Input/output error", target)
            return replace(source, target)
        self.patch(os, "replace", crash)
        self.refused("--data-dir", data_dir, "restore", "--no-keep", dest)
        self.assertFalse(os.path.exists(live + "-wal"))
        file_only = sqlite3.connect(f"file:{live}?immutable=1", uri=True)   # ignores any -wal
        self.addCleanup(file_only.close)
        self.assertEqual([n for (n,) in file_only.execute("SELECT name FROM devices")],
                         ["a", "b", "in-wal"])
        self.assertEqual(sorted(os.listdir(data_dir)), ["broker.lock", DB_NAME])

    def test_damaged_current_database_is_refused_until_moved_away(self):
        """A current database SQLite cannot read is not replaced blindly (its -wal
        could not be checkpointed): one line says to move it away; then restore works."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        live = os.path.join(data_dir, DB_NAME)
        with open(live, "wb") as handle:
            handle.write(b"SQLite format 3\x00" + bytes(range(256)) * 16)
        before = digest(live)
        err = self.refused("--data-dir", data_dir, "restore", dest)
        self.assertIn("cannot be read", err)
        self.assertIn("move it and its -wal and -shm files out", err)
        self.assertEqual(digest(live), before)
        self.assertEqual([n for n in os.listdir(data_dir) if n.startswith(".")], [])
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(live + suffix):
                os.rename(live + suffix, self.mktemp() + suffix)
        self.assertEqual(run_admin("--data-dir", data_dir, "restore", dest)[0], 0)
        self.assertEqual(names(live), ["a", "b"])

    def test_lone_wal_is_refused(self):
        """A -wal with changes but no database beside it (moved away without it) is
        refused: it would be replayed into the restored database."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        empty = os.path.abspath(os.path.join(self.mktemp(), "data"))
        os.makedirs(empty, mode=0o700)
        with open(os.path.join(empty, DB_NAME + "-wal"), "wb") as handle:
            handle.write(b"\x37\x7f\x06\x82" + bytes(60))
        err = self.refused("--data-dir", empty, "restore", dest)
        self.assertIn("-wal holds changes", err)
        self.assertFalse(os.path.exists(os.path.join(empty, DB_NAME)))

    def test_restore_into_a_new_data_directory(self):
        """A data directory that does not exist yet is created 0700 with the database 0600."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        fresh = os.path.abspath(os.path.join(self.mktemp(), "new-data"))
        status, out, err = run_admin("--data-dir", fresh, "--json", "restore", dest)
        self.assertEqual(status, 0, err)
        self.assertIsNone(json.loads(out)["before_restore"])
        self.assertEqual((mode(fresh), mode(os.path.join(fresh, DB_NAME))), (0o700, 0o600))
        self.assertEqual(names(os.path.join(fresh, DB_NAME)), ["a", "b"])

    def test_file_copy_of_a_stopped_broker_loses_its_clean_stop_mark(self):
        """A plain copy of a stopped broker's registry.sqlite3 (which has the clean-stop
        mark) is accepted, and the restored database has no mark."""
        data_dir = self.make_data_dir()
        copy = os.path.abspath(self.mktemp())
        shutil.copy(os.path.join(data_dir, DB_NAME), copy)
        self.assertIn("clean_stop", meta(copy))
        target = self.make_data_dir(devices=["other"])
        self.assertEqual(run_admin("--data-dir", target, "restore", copy)[0], 0)
        restored = os.path.join(target, DB_NAME)
        self.assertEqual(names(restored), ["a", "b"])
        self.assertNotIn("clean_stop", meta(restored))
        self.assertIn("clean_stop", meta(copy))       # the source is not changed

    def test_crashed_restore_leftovers_are_removed(self):
        """A temporary file left by a restore that crashed is removed by the next one."""
        data_dir = self.make_data_dir()
        dest = self.backup_of(data_dir)
        for name in (".restore-abc123", ".restore-abc123-journal"):
            with open(os.path.join(data_dir, name), "wb") as handle:
                handle.write(b"partial")
        self.assertEqual(run_admin("--data-dir", data_dir, "restore", "--no-keep", dest)[0], 0)
        self.assertEqual(sorted(os.listdir(data_dir)), ["broker.lock", DB_NAME])

    def test_older_schema_is_restored_for_the_broker_to_migrate(self):
        """A backup of an older schema of ours is restored as it is (the broker
        migrates it when it starts), and says which schema it has."""
        data_dir = self.make_data_dir()
        old = self.backup_of(data_dir)
        conn = sqlite3.connect(old)
        conn.execute("ALTER TABLE sessions DROP COLUMN remote_seq")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
        conn.close()
        target = self.make_data_dir(devices=[])
        status, out, err = run_admin("--data-dir", target, "--json", "restore", old)
        self.assertEqual(status, 0, err)
        self.assertEqual(json.loads(out)["schema"], 1)
        self.assertEqual(query(os.path.join(target, DB_NAME), "PRAGMA user_version"), [(1,)])


class RestoreRefusalTests(Fixture, SynchronousTestCase):
    """A restore from something that is not a registry backup changes nothing."""

    def setUp(self):
        self.data_dir = self.make_data_dir()
        self.live = os.path.join(self.data_dir, DB_NAME)
        self.before = digest(self.live)

    def refused_source(self, source, expected):
        err = self.refused("--data-dir", self.data_dir, "restore", source)
        self.assertIn(expected, err)
        self.assertEqual(digest(self.live), self.before)
        self.assertNotIn(DB_NAME + ".before-restore", os.listdir(self.data_dir))
        return err

    def write(self, data):
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def test_missing_source(self):
        """A source that does not exist is named as such."""
        self.refused_source(os.path.abspath(self.mktemp()), "does not exist")

    def test_not_a_database(self):
        """A file that is not SQLite (text, an empty file) is refused as not a database."""
        self.refused_source(self.write(b"device,key\nx,y\n"), "is not an SQLite database")
        self.refused_source(self.write(b""), "is not an SQLite database")

    def test_damaged_database(self):
        """A file with SQLite's magic and garbage after it is refused as damaged."""
        self.refused_source(self.write(b"SQLite format 3\x00" + os.urandom(4080)),
                            "damaged or not a database")

    def test_database_of_another_program(self):
        """An SQLite database without our application id is refused, naming the id."""
        path = os.path.abspath(self.mktemp())
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
        conn.execute("PRAGMA application_id = 42")
        conn.commit()
        conn.close()
        err = self.refused_source(path, "another program (application_id 0x2a)")
        self.assertIn("not an ssp-broker registry", err)

    def test_newer_schema(self):
        """A registry database of a newer schema is refused, saying which versions."""
        path = self.backup_of(self.data_dir)
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
        conn.close()
        self.refused_source(path, f"has registry schema {SCHEMA_VERSION + 1}, newer than this "
                                  f"broker's {SCHEMA_VERSION}")

    def test_the_database_itself(self):
        """Restoring the data directory's own database onto itself is refused."""
        self.refused_source(self.live, "is the data directory's database itself")

    def test_held_lock_without_a_pid(self):
        """A lock held by a process that wrote no pid is refused all the same."""
        fd = os.open(os.path.join(self.data_dir, "broker.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = self.refused_source(self.backup_of(self.data_dir), "a broker is running on")
        self.assertIn("pid unknown", err)


class OtherBackendTests(SynchronousTestCase):
    """With the Redis (or memory) backend, backup and restore say what to do instead."""

    def config(self, backend):
        path = os.path.abspath(self.mktemp() + ".toml")
        data_dir = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write(f'[broker]\ndata_dir = "{data_dir}"\n[registry]\nbackend = "{backend}"\n'
                         + ('redis_url = "redis://127.0.0.1:1/0"\n' if backend == "redis" else ""))
        return path, data_dir

    def test_redis_backups_are_redis_own(self):
        """Both commands exit 1 naming RDB/AOF and docs/scaling.md, and touch nothing."""
        config, data_dir = self.config("redis")
        dest = os.path.abspath(self.mktemp())
        for command in (["backup", dest], ["restore", dest]):
            status, out, err = run_admin("--config", config, *command)
            self.assertEqual((status, out), (1, ""))
            for words in ("Redis's own", "RDB", "AOF", "docs/scaling.md"):
                self.assertIn(words, err)
            status, _, err = run_admin("--config", config, "--json", *command)
            self.assertEqual((status, json.loads(err)["error"]), (1, "store_error"))
        self.assertFalse(os.path.exists(dest))
        self.assertFalse(os.path.exists(data_dir))

    def test_memory_backend(self):
        """The memory backend has nothing to back up: exit 1, one line."""
        config, _ = self.config("memory")
        status, _, err = run_admin("--config", config, "backup", os.path.abspath(self.mktemp()))
        self.assertEqual(status, 1)
        self.assertIn("memory backend keeps nothing", err)


class RunningBrokerTests(Fixture, TestCase):
    """Beside a real running broker: backup works, restore is refused naming its pid."""

    timeout = 60

    @defer.inlineCallbacks
    def test_backup_works_and_restore_is_refused(self):
        """While a broker holds the data directory, a backup has its devices and a
        restore exits 1 naming the broker's pid, leaving the database alone."""
        from tests.helpers import loopback_config, start_broker
        config = loopback_config(self)
        running = yield start_broker(self, config)
        yield running.service.registry.add_device("live-1")
        data_dir = os.path.abspath(config.broker.data_dir)
        dest = os.path.abspath(self.mktemp())
        status, out, err = run_admin("--data-dir", data_dir, "--json", "backup", dest)
        self.assertEqual(status, 0, err)
        self.assertEqual(json.loads(out)["devices"], 1)
        self.assertEqual(names(dest), ["live-1"])
        live = os.path.join(data_dir, DB_NAME)
        before = digest(live)
        err = self.refused("--data-dir", data_dir, "restore", dest)
        self.assertIn(f"a broker is running on {data_dir} (pid {os.getpid()}", err)
        self.assertIn("stop it first", err)
        self.assertEqual(digest(live), before)


class RestoredStartTests(Fixture, TestCase):
    """A registry loaded from a restored backup starts unclean: cursors issued after
    the backup's durable mark are dead, so dashboards holding them are reset."""

    timeout = 60

    def setUp(self):
        self.data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))

    def open(self, data_dir=None):
        settings = RegistrySettings()
        store = SQLiteStore.in_directory(data_dir or self.data_dir, reactor=reactor,
                                         settings=settings)
        self.addCleanup(store.close)
        return DeviceRegistry(store, clock=reactor, settings=settings)

    @defer.inlineCallbacks
    def test_restored_backup_taken_while_running_starts_unclean(self):
        """Backup taken while the store commits, more changes made and the broker
        stopped cleanly, backup restored: the restarted registry has the backup's
        values, resumes the backup's durable cursor, resets every cursor above it
        that the live store issued, and continues above all of them."""
        registry = self.open()
        for name in ("a", "b"):
            yield registry.add_device(name)
        yield registry.update_reported("a", {"x": 0})
        pending = [registry.update_reported("a", {"x": i}) for i in range(1, 200)]
        last_version = registry.device("a").version
        yield task.deferLater(reactor, 0, lambda: None)    # the writer thread has them
        dest = os.path.abspath(self.mktemp())
        sqlite_backup.backup(self.data_dir, dest)          # while it commits
        yield defer.gatherResults(pending)
        durable = meta(dest)["durable"]
        backed_up = query(dest, "SELECT max(cursor) FROM devices")[0][0]
        for i in range(5):
            yield registry.update_reported("b", {"y": i})
        seen = registry.cursor
        self.assertGreater(seen, durable)
        yield registry.stop()
        self.assertIn("clean_stop", meta(os.path.join(self.data_dir, DB_NAME)))
        sqlite_backup.restore(self.data_dir, dest)
        again = self.open()
        self.assertGreaterEqual(again.cursor, seen + CURSOR_GAP)
        self.assertEqual(again.device("b").reported, {})
        # The live store issued versions of "a" past the backup's; the restart
        # raised them above every one of those (restart.py).
        self.assertGreater(again.device("a").version, last_version)
        self.assertFalse(again.changes_since(durable).reset)
        for cursor in (durable + 1, backed_up, seen, again.cursor - 3):   # (2 devices moved)
            if cursor > durable:
                self.assertTrue(again.changes_since(cursor).reset, cursor)
        result = yield again.update_reported("b", {"y": 99})
        self.assertEqual(result.cursor, again.cursor)
        self.assertTrue(again.changes_since(seen).reset)
        batch = again.changes_since(result.cursor - 1)
        self.assertEqual(([v.name for v in batch.devices], batch.reset), (["b"], False))
        yield again.stop()

    @defer.inlineCallbacks
    def test_backup_of_a_cleanly_stopped_registry_restores_unclean(self):
        """Restored into a new data directory (no replaced database to learn from), a
        backup of a cleanly stopped registry starts RESTORE_GAP and CURSOR_GAP above
        its cursors: a cursor the lost brokers issued later, even across 255 unclean
        starts of theirs, is never issued again."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.update_reported("a", {"x": 1})
        yield registry.stop()
        top = registry.cursor
        dest = self.backup_of(self.data_dir)
        fresh = os.path.abspath(os.path.join(self.mktemp(), "data"))
        sqlite_backup.restore(fresh, dest)
        again = self.open(fresh)
        # (then the device moved above that: restart.py)
        self.assertEqual(again.cursor, top + sqlite_backup.RESTORE_GAP + CURSOR_GAP + 1)
        self.assertFalse(again.changes_since(top).reset)
        self.assertTrue(again.changes_since(top + 1).reset)
        self.assertEqual(again.device("a").reported, {"x": 1})
        yield again.stop()

    @defer.inlineCallbacks
    def test_restore_clears_cursors_of_a_run_past_the_gap(self):
        """The replaced database's run went more than CURSOR_GAP past the backup (an
        unclean start of its own): the restored registry still continues above every
        cursor it issued, and a dashboard holding one stays reset after new changes."""
        registry = self.open()
        yield registry.add_device("a")
        yield registry.update_reported("a", {"x": 1})
        dest = self.backup_of(self.data_dir)
        yield registry.stop()
        conn = sqlite3.connect(os.path.join(self.data_dir, DB_NAME))
        conn.execute("DELETE FROM meta WHERE key = 'clean_stop'")     # as after kill -9
        conn.commit()
        conn.close()
        second = self.open()
        result = yield second.update_reported("a", {"x": 2})
        seen = result.cursor
        self.assertGreater(seen, registry.cursor + CURSOR_GAP)
        yield second.stop()
        sqlite_backup.restore(self.data_dir, dest)
        again = self.open()
        self.assertGreater(again.cursor, seen)
        yield again.update_reported("a", {"x": 3})
        self.assertTrue(again.changes_since(seen).reset)
        self.assertEqual(again.device("a").reported, {"x": 3})
        yield again.stop()
