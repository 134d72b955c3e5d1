"""The interlock against starting on an emptied Redis, on a real redis-server: the
data directory remembers the data set's marker ({ssp}:incarnation), a start on a
Redis without it (or with another) is refused with one line, and
``broker-admin redis adopt-new`` is the deliberate way out."""

import json
import os
import stat
import subprocess
import sys
import threading

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import errors
from broker.registry import redis_marker
from broker.registry.redis_admin import RedisAdmin
from broker.registry.redis_marker import MarkerMismatch, RememberedMarker
from broker.registry.redis_store import RedisStore

from .redis_support import AdminOnRedis, free_port

MARKER = "{ssp}:incarnation"


class RedisMarkerTests(AdminOnRedis, TestCase):
    """A broker or broker-admin starting on a Redis that lost the data set it served refuses."""

    timeout = 60

    def marker(self):
        value = self.direct.get(MARKER)
        return None if value is None else value.decode()

    def remembered(self):
        return RememberedMarker.for_options(self.data_dir, self.options)

    @defer.inlineCallbacks
    def test_a_start_after_flushall_is_refused_with_one_line(self):
        """A registry that served a data set and stopped, Redis flushed, a new start is
        refused with one line naming the Redis, both facts and the two remedies, and
        Redis stays empty (no new marker hides what happened)."""
        a = self.open_registry()
        yield a.add_device("dev-1")
        served = a._store.incarnation
        yield a.stop()
        self.direct.flushall()
        with self.assertRaises(MarkerMismatch) as raised:
            self.open_registry()
        message = str(raised.exception)
        self.assertIsInstance(raised.exception, errors.StoreError)
        self.assertEqual(len(message.splitlines()), 1)
        for words in (f"Redis at {self.url}", f"has no data set marker {MARKER}", served,
                      self.data_dir, "emptied", "Restore Redis",
                      "broker-admin redis adopt-new"):
            self.assertIn(words, message)
        self.assertEqual(self.direct.dbsize(), 0)
        self.assertEqual(self.remembered().read(), served)

    @defer.inlineCallbacks
    def test_another_data_set_in_redis_is_refused(self):
        """A Redis holding another data set's marker (emptied, and a new data set
        started by someone else) is refused too, naming both markers."""
        a = self.open_registry()
        served = a._store.incarnation
        yield a.stop()
        self.direct.flushall()
        self.direct.set(MARKER, "f" * 32)
        with self.assertRaises(MarkerMismatch) as raised:
            self.open_registry()
        self.assertIn(f"holds the data set marked {'f' * 32}", str(raised.exception))
        self.assertIn(f"last served the one marked {served}", str(raised.exception))

    @defer.inlineCallbacks
    def test_adopt_new_lets_the_broker_start_on_the_new_data_set(self):
        """After the refusal, ``broker-admin redis adopt-new`` sets and records a new
        marker; the broker then starts on it, writes, and remembers it."""
        a = self.open_registry()
        served = a._store.incarnation
        yield a.stop()
        self.direct.flushall()
        self.assertRaises(MarkerMismatch, self.open_registry)
        code, out, err = self.admin("--json", "redis", "adopt-new")
        self.assertEqual((code, err), (0, ""))
        answer = json.loads(out)
        self.assertEqual((answer["previous"], answer["marker"]), (served, self.marker()))
        self.assertNotEqual(self.marker(), served)
        self.assertEqual(self.remembered().read(), self.marker())
        b = self.open_registry()
        self.assertEqual(b._store.incarnation, self.marker())
        result = yield b.add_device("dev-2")
        self.assertTrue(result)
        self.assertEqual(b.readiness(), None)

    @defer.inlineCallbacks
    def test_a_first_start_adopts_and_records_the_marker_privately(self):
        """A first start on an empty Redis (no data directory yet) works as before and
        records the marker in a 0700 directory, in a 0600 file beside its 0600 lock,
        with no temporary file left behind; a restart on the same data set starts."""
        a = self.open_registry()
        yield a.add_device("dev-1")
        self.assertEqual(self.remembered().read(), self.marker())
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        marker_file = self.remembered().path
        lock_file = marker_file[:-len(".json")] + ".lock"
        for path in (marker_file, lock_file):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.data_dir)),
                         [os.path.basename(marker_file), os.path.basename(lock_file)])
        yield a.stop()
        b = self.open_registry()
        self.assertIsNotNone(b.device("dev-1"))

    def test_broker_admin_on_an_emptied_redis_is_refused(self):
        """broker-admin that wrote a data set (and remembered it) is refused on the
        emptied Redis, one line, for reads and writes alike, and writes nothing."""
        code, out, err = self.admin("device", "add", "dev-1")
        self.assertEqual(code, 0, err)
        served = self.marker()
        self.assertEqual(self.remembered().read(), served)
        self.direct.flushall()
        for argv in (("device", "list"), ("device", "add", "dev-2")):
            code, out, err = self.admin(*argv)
            self.assertEqual((code, out), (1, ""))
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(served, err)
            self.assertIn("broker-admin redis adopt-new", err)
        self.assertEqual(self.direct.dbsize(), 0)

    def test_broker_admin_reads_record_nothing(self):
        """A read-only broker-admin command creates no data directory and records nothing."""
        code, _, err = self.admin("device", "list")
        self.assertEqual(code, 0, err)
        self.assertFalse(os.path.exists(self.data_dir))

    @defer.inlineCallbacks
    def test_workers_starting_together_on_an_empty_redis_do_not_refuse_each_other(self):
        """Six processes sharing one data directory load an empty Redis at the same
        instant (one barrier), five times over: all adopt and record one marker."""
        for _ in range(5):
            self.direct.flushall()
            self.data_dir = os.path.abspath(self.mktemp())
            stores = [RedisStore(self.options, reactor=None, data_dir=self.data_dir)
                      for _ in range(6)]
            barrier = threading.Barrier(len(stores))

            def load(store):
                barrier.wait(10)
                store.load()
            try:
                yield defer.gatherResults([deferToThread(load, store) for store in stores],
                                          consumeErrors=True)
            finally:
                for store in stores:
                    store.close()
            self.assertEqual({store.incarnation for store in stores}, {self.marker()})
            self.assertEqual(self.remembered().read(), self.marker())

    def test_admin_open_without_a_data_directory_is_unchanged(self):
        """broker-admin's store opened with no data directory adopts as before."""
        admin = RedisAdmin.open(self.options)
        self.addCleanup(admin.close)
        admin.add_device("dev-1")
        self.assertIsNotNone(self.marker())

    def test_a_worker_restarted_on_an_emptied_redis_is_refused(self):
        """A worker (``python -m broker.worker``, as its supervisor restarts it) on a
        Redis flushed since the data directory it shares recorded the marker exits
        with status 2 and one line on stderr, and sets no new marker."""
        with open(self.config, "a") as handle:
            handle.write('[ssp]\nenabled = false\n[http]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                         '[log]\nlevel = "warn"\n')
        store = RedisStore(self.options, reactor=None, data_dir=self.data_dir)
        store.load()                                 # the worker's first life
        store.close()
        self.direct.flushall()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            worker = subprocess.run(
                [sys.executable, "-m", "broker.worker", "--index", "0", "--http-port",
                 str(free_port()), "--config", self.config],
                cwd=root, stdin=subprocess.PIPE, capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            self.fail("the worker started on the emptied Redis")
        err = worker.stderr.decode()
        self.assertEqual(worker.returncode, 2, err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("broker worker 0: Redis at "), err)
        self.assertIn("broker-admin redis adopt-new", err)
        self.assertEqual(self.direct.dbsize(), 0)



class RememberedMarkerTests(SynchronousTestCase):
    """The remembered marker's file: private, replaced atomically, no password in it."""

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.url = "redis://user:s3cret@127.0.0.1:6379/0"
        self.remembered = RememberedMarker(self.data_dir, self.url, "ssp")

    def test_a_failed_write_keeps_the_old_file(self):
        """A write that fails before the rename leaves the remembered marker and no
        temporary file: the file is never seen half written."""
        self.remembered.record("a" * 32)

        def broken(fd):
            raise OSError(5, "Input/output error")
        self.patch(redis_marker.os, "fsync", broken)
        with self.assertRaises(errors.StoreError):
            self.remembered.record("b" * 32)
        self.assertEqual(self.remembered.read(), "a" * 32)
        self.assertEqual(os.listdir(self.data_dir), [os.path.basename(self.remembered.path)])

    def test_no_password_is_written_or_shown(self):
        """The file and the refusal name the Redis URL with its password redacted."""
        self.remembered.record("a" * 32)
        with open(self.remembered.path) as handle:
            self.assertNotIn("s3cret", handle.read())
        with self.assertRaises(MarkerMismatch) as raised:
            self.remembered.check(None, MARKER, self.remembered.read())
        self.assertNotIn("s3cret", str(raised.exception))
        self.assertIn("redis://user:***@127.0.0.1:6379/0", str(raised.exception))

    def test_each_redis_and_prefix_is_remembered_apart(self):
        """Another key prefix (or Redis URL) has its own remembered marker."""
        self.remembered.record("a" * 32)
        self.assertIsNone(RememberedMarker(self.data_dir, self.url, "other").read())
        self.assertIsNone(RememberedMarker(self.data_dir, self.url.replace("/0", "/1"),
                                           "ssp").read())

    def test_a_damaged_file_is_refused(self):
        """A damaged file is a StoreError naming it, not an empty memory."""
        os.makedirs(self.data_dir, mode=0o700)
        with open(self.remembered.path, "w") as handle:
            handle.write("{not json")
        with self.assertRaises(errors.StoreError) as raised:
            self.remembered.read()
        self.assertIn(self.remembered.path, str(raised.exception))

    def test_a_sibling_recording_while_the_lock_is_awaited_is_not_overwritten(self):
        """Raising the remembered sequence reads it under the marker's lock: a
        sibling worker that recorded a higher one while this process waited
        for the lock keeps it (a read before the lock would write 110 over 120)."""
        self.remembered.record("a" * 32, 100)
        sibling = RememberedMarker(self.data_dir, self.url, "ssp")
        real_flock = redis_marker.fcntl.flock
        taken = []

        def flock_after_sibling(fd, operation):
            if operation == redis_marker.fcntl.LOCK_EX and not taken:
                taken.append(fd)
                sibling.record("a" * 32, 120)   # the sibling held the lock first
            return real_flock(fd, operation)
        self.patch(redis_marker.fcntl, "flock", flock_after_sibling)
        self.remembered.raise_sequence("a" * 32, 110)
        self.assertEqual(len(taken), 1)
        self.assertEqual(self.remembered.sequence_seen("a" * 32), 120)
        self.remembered.raise_sequence("a" * 32, 130)
        self.assertEqual(self.remembered.sequence_seen("a" * 32), 130)
        lock = os.stat(self.remembered.path[:-len(".json")] + ".lock")
        self.assertEqual(stat.S_IMODE(lock.st_mode), 0o600)
