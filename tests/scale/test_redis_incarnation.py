"""The data set's marker ({ssp}:incarnation) on a real redis-server: set once,
adopted by every process and by broker-admin (an empty Redis, processes racing,
data from before markers), and a Redis emptied under running processes caught
at once, even after the fleet's new writes took its sequence past them."""

import threading

import redis
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from broker.registry import errors
from broker.registry.redis_admin import RedisAdmin
from broker.registry.redis_connection import RedisOptions
from broker.registry.redis_store import RedisStore
from broker.registry.shared import open_shared_registry

from .redis_support import CuttingProxy, start_server
from .support import capture_critical, wait_until

MARKER = "{ssp}:incarnation"


class RedisIncarnationTests(TestCase):
    """Each process knows which data set it loaded; another one, or none, is lost data."""

    timeout = 60

    def setUp(self):
        self.redis_port = start_server(self)
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.direct = redis.Redis(host="127.0.0.1", port=self.redis_port)
        self.addCleanup(self.direct.close)
        self.critical = capture_critical(self)

    def open_registry(self, port=None, **check):
        """A started registry on the test's Redis (or on ``port``: a proxy)."""
        registry = open_shared_registry(
            RedisOptions(url=f"redis://127.0.0.1:{port or self.redis_port}/0", timeout=2.0),
            reactor=reactor, lease_ttl=0, **check)
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def open_admin(self):
        admin = RedisAdmin.open(RedisOptions(url=self.url))
        self.addCleanup(admin.close)
        return admin

    def marker(self):
        value = self.direct.get(MARKER)
        return None if value is None else value.decode()

    @defer.inlineCallbacks
    def test_first_start_on_an_empty_redis_sets_the_marker_and_writes(self):
        """A process starting on an empty Redis sets the marker, takes it as its own
        (no loss declared) and writes; a second process adopts the same one."""
        a = self.open_registry()
        self.assertIsNotNone(self.marker())
        self.assertEqual(a._store.incarnation, self.marker())
        yield a.add_device("dev-1")
        result = yield a.update_reported("dev-1", {"t": 1})
        self.assertEqual(result.version, 2)
        b = self.open_registry()
        self.assertEqual(b._store.incarnation, a._store.incarnation)
        yield b.update_reported("dev-1", {"t": 2})
        yield wait_until(self, lambda: a.device("dev-1").version == 3, what="A hears B")
        self.assertEqual((a.readiness(), b.readiness(), self.critical), (None, None, []))

    @defer.inlineCallbacks
    def test_processes_starting_together_on_an_empty_redis_adopt_one_marker(self):
        """Six processes loading an empty Redis at the same instant (threads released by
        one barrier), five times over, all adopt the one marker Redis keeps."""
        options = RedisOptions(url=self.url)
        for _ in range(5):
            self.direct.flushall()
            stores = [RedisStore(options, reactor=None) for _ in range(6)]
            barrier = threading.Barrier(len(stores))

            def load(store):
                barrier.wait(10)
                store.load()
            try:
                yield defer.gatherResults([deferToThread(load, store) for store in stores])
            finally:
                for store in stores:
                    store.close()
            self.assertIsNotNone(self.marker())
            self.assertEqual({store.incarnation for store in stores}, {self.marker()})

    @defer.inlineCallbacks
    def test_data_written_before_markers_is_adopted_not_lost(self):
        """Data a broker without markers wrote (no marker key) is adopted by the first
        process to start: it loads every device, sets the marker, writes, and
        broker-admin and a second process share it."""
        a = self.open_registry()
        yield a.add_device("dev-1")
        yield a.update_reported("dev-1", {"t": 1})
        yield a.stop()
        self.direct.delete(MARKER)                  # as the previous version left it
        b = self.open_registry()
        self.assertEqual(dict(b.device("dev-1").reported), {"t": 1})
        self.assertIsNotNone(self.marker())
        self.assertEqual(b._store.incarnation, self.marker())
        yield b.update_reported("dev-1", {"t": 2})
        self.open_admin().add_device("dev-2")
        yield wait_until(self, lambda: b.device("dev-2") is not None, what="the admin's device")
        c = self.open_registry()
        self.assertEqual(c._store.incarnation, b._store.incarnation)
        self.assertEqual((b.readiness(), c.readiness(), self.critical), (None, None, []))

    @defer.inlineCallbacks
    def test_broker_admin_provisions_into_an_empty_redis(self):
        """broker-admin adding a device to an empty Redis starts the data set: a broker
        started afterwards adopts its marker, has the device and writes it."""
        admin = self.open_admin()
        admin.add_device("dev-1")
        self.assertIsNotNone(self.marker())
        a = self.open_registry()
        self.assertEqual(a._store.incarnation, self.marker())
        result = yield a.update_reported("dev-1", {"t": 1})
        self.assertEqual(result.version, 2)
        self.assertEqual(admin.device("dev-1").version, 2)
        self.assertEqual((a.readiness(), self.critical), (None, []))

    @defer.inlineCallbacks
    def test_the_fleet_taking_the_sequence_past_a_process_after_flushall_is_caught(self):
        """A quiet process cut off while Redis is flushed and the fleet (a process
        started afterwards, on a new data set) writes past the cursor it read refuses
        at its next read, without applying any of the new data set's changes, although
        its sequence check (every 0.2 s) finds the sequence ahead of it."""
        a = self.open_registry()
        proxy = CuttingProxy(self, self.redis_port)
        b = self.open_registry(proxy.port, sequence_check_interval=0.2)
        for name in ("dev-1", "dev-2"):
            yield a.add_device(name)
        yield a.update_reported("dev-1", {"t": 1})
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B in step")
        applied, loaded = b.cursor, self.marker()
        yield a.stop()
        proxy.hold()
        self.direct.flushall()
        c = self.open_registry()                    # the fleet, on a new data set
        for i in range(applied + 3):
            yield c.add_device(f"new-{i}")
        self.assertGreater(c.cursor, applied + 1)
        proxy.release()
        yield wait_until(self, lambda: b.counters["redis_lost"] == 1, timeout=10,
                         what="B noticing")
        self.assertIn(f"{MARKER} is {self.marker()}, not {loaded}", b.readiness())
        self.assertEqual(b.cursor, applied)
        self.assertEqual(len(b), 2)
        self.assertIsNone(b.device("new-0"))
        self.failureResultOf(b.update_reported("dev-1", {"t": 2}), errors.StoreError)
        self.assertIsNone(c.readiness())
        self.assertEqual(len(self.critical), 1)

    @defer.inlineCallbacks
    def test_a_quiet_process_notices_flushall_at_its_next_read(self):
        """A process that writes nothing notices FLUSHALL from its stream reader's next
        read (the marker is gone), long before its sequence check would look."""
        a = self.open_registry()
        b = self.open_registry(sequence_check_interval=600.0)
        yield a.add_device("dev-1")
        yield wait_until(self, lambda: b.cursor == a.cursor, what="B in step")
        self.direct.flushall()
        yield wait_until(self, lambda: b.counters["redis_lost"] == 1, timeout=10,
                         what="B noticing")
        self.assertIn(f"{MARKER} is gone", b.readiness())
        self.failureResultOf(b.update_reported("dev-1", {"t": 9}), errors.StoreError)

    @defer.inlineCallbacks
    def test_tokens_read_from_an_emptied_redis_are_not_taken(self):
        """A token re-read answered by a flushed Redis is refused as lost data, not
        taken for "no tokens": the tokens this process had stay valid."""
        a = self.open_registry()
        _, text = yield a.add_token("write")
        self.direct.flushall()
        yield self.assertFailure(a.reload(), errors.StoreError)
        self.assertEqual(a.check_token(text), "write")
        self.assertIn("Redis lost data", a.readiness())

    @defer.inlineCallbacks
    def test_a_process_starts_on_a_full_redis_and_serves_reads(self):
        """On a Redis at its memory limit (noeviction: writes refused) that holds a data
        set, a process still starts: it adopts the marker without writing, loads every
        device and serves reads, and its writes fail with StoreError, not lost data."""
        port = start_server(self, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
        options = RedisOptions(url=f"redis://127.0.0.1:{port}/0", timeout=2.0)
        a = open_shared_registry(options, reactor=reactor, lease_ttl=0)
        a.start()
        yield a.add_device("dev-1")
        yield a.update_reported("dev-1", {"t": 1})
        marker = a._store.incarnation
        yield a.stop()
        direct = redis.Redis(host="127.0.0.1", port=port)
        self.addCleanup(direct.close)
        with self.assertRaises(redis.ResponseError):
            for i in range(100_000):
                direct.set(f"filler:{i}", b"x" * 1000)      # up to the limit
        b = open_shared_registry(options, reactor=reactor, lease_ttl=0)
        b.start()
        self.addCleanup(b.stop)
        self.assertEqual(b._store.incarnation, marker)
        self.assertEqual(dict(b.device("dev-1").reported), {"t": 1})
        failure = yield self.assertFailure(b.update_reported("dev-1", {"t": 2}),
                                           errors.StoreError)
        self.assertNotIn("lost data", str(failure))
        self.assertEqual((b.readiness(), self.critical), (None, []))

    def test_broker_admin_on_a_redis_emptied_meanwhile_changes_nothing(self):
        """broker-admin's scripts against a Redis flushed after it opened fail with
        StoreError and write nothing (the marker is gone)."""
        admin = self.open_admin()
        admin.add_device("dev-1")
        self.direct.flushall()
        with self.assertRaises(errors.StoreError) as raised:
            admin.add_device("dev-2")
        self.assertIn("Redis lost data", str(raised.exception))
        self.assertEqual(self.direct.dbsize(), 0)
