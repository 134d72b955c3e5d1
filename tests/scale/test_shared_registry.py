"""SharedRegistry: several registries (standing for broker processes) on one real Redis."""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.metrics import SAMPLE_EVERY, InstrumentedStore, Metrics
from broker.registry import SessionRecord, errors
from broker.registry.shared import open_shared_registry

from .support import (ClusterRedis, SingleRedis, TwoRegistries, open_registry_on,
                      redis_options, wait_until)


class SharedRegistryTestsMixin(TwoRegistries):
    """Behaviour every broker process must see the same way, whatever the Redis topology."""

    @defer.inlineCallbacks
    def test_change_on_one_process_reaches_the_other(self):
        """A report made through A shows on B with the same version and cursor, and B's observer hears it with its events."""
        yield self.a.add_device("dev-1")
        yield wait_until(self, lambda: self.b.device("dev-1") is not None, what="add on B")
        heard = []
        self.b.subscribe(["dev-*"], heard.append)
        result = yield self.a.update_reported("dev-1", {"t": 21.5}, events=["boot"])
        yield wait_until(self, lambda: heard, what="B's observer")
        view = self.b.device("dev-1")
        self.assertEqual((view.version, view.cursor), (result.version, result.cursor))
        self.assertEqual(dict(view.reported), {"t": 21.5})
        self.assertEqual(heard[-1].events, ("boot",))
        self.assertEqual(self.a.device("dev-1").version, result.version)

    @defer.inlineCallbacks
    def test_concurrent_expected_versions_exactly_one_wins(self):
        """Desired writes with the same expected version on A and B: one succeeds, the other gets VersionConflict."""
        yield self.a.add_device("dev-2")
        yield wait_until(self, lambda: self.b.device("dev-2") is not None, what="add on B")
        for round_ in range(5):
            yield wait_until(self, lambda: self.a.cursor == self.b.cursor, what="A and B in step")
            version = self.a.device("dev-2").version
            outcomes = yield defer.DeferredList([
                self.a.update_desired("dev-2", {"led": f"a{round_}"}, expected_version=version),
                self.b.update_desired("dev-2", {"led": f"b{round_}"}, expected_version=version)],
                consumeErrors=True)
            wins = [result for ok, result in outcomes if ok]
            losses = [result for ok, result in outcomes if not ok]
            self.assertEqual(len(wins), 1, outcomes)
            self.assertEqual(len(losses), 1)
            losses[0].trap(errors.VersionConflict)
            self.assertEqual(losses[0].value.to_json()["current_version"], version + 1)
            self.assertEqual(wins[0].version, version + 1)

    @defer.inlineCallbacks
    def test_writes_without_expected_version_from_both_are_merged(self):
        """Unconditional writes to one device from A and B both land: B retries on A's newer version."""
        yield self.a.add_device("dev-3")
        yield wait_until(self, lambda: self.b.device("dev-3") is not None, what="add on B")
        writes = []
        for i in range(10):
            writes.append(self.a.update_desired("dev-3", {f"a{i}": i}))
            writes.append(self.b.update_desired("dev-3", {f"b{i}": i}))
        results = yield defer.gatherResults(writes)
        self.assertEqual(len({r.version for r in results}), 20)
        yield wait_until(self, lambda: self.a.device("dev-3").version == 21
                         and self.b.device("dev-3").version == 21, what="A and B current")
        desired = dict(self.b.device("dev-3").desired)
        self.assertEqual(len(desired), 20)
        self.assertEqual(dict(self.a.device("dev-3").desired), desired)

    @defer.inlineCallbacks
    def test_cursor_taken_on_one_process_resumes_on_the_other(self):
        """changes_since on B with a cursor A handed out returns exactly the later changes."""
        yield self.a.add_device("dev-4")
        yield self.a.add_device("dev-5")
        cursor = self.a.cursor
        yield self.a.update_reported("dev-5", {"x": 1})
        yield wait_until(self, lambda: self.b.cursor >= self.a.cursor, what="B caught up")
        batch = self.b.changes_since(cursor)
        self.assertFalse(batch.reset)
        self.assertEqual([v.name for v in batch.devices], ["dev-5"])
        self.assertEqual(batch.cursor, self.a.cursor)

    @defer.inlineCallbacks
    def test_cursor_ahead_of_a_lagging_replica_waits_instead_of_reset(self):
        """A cursor B has not reached yet but Redis has is answered with an empty batch, not a reset."""
        yield self.a.add_device("dev-6")
        self.b._top = self.a.cursor + 5
        batch = self.b.changes_since(self.a.cursor + 5)
        self.assertEqual((batch.devices, batch.reset, batch.cursor),
                         ([], False, self.a.cursor + 5))

    @defer.inlineCallbacks
    def test_session_record_and_key_changes_reach_the_other_process(self):
        """A session record saved on A is B's record; a rotated key and a removal reach B's key watchers."""
        provisioned = yield self.a.add_device("dev-7")
        number = provisioned.device_number
        yield wait_until(self, lambda: self.b.secret_for(number) == provisioned.secret, what="secret")
        record = SessionRecord(session_id=77, acked_remote_num=3, seq_reservation=4096)
        yield self.a.save_session(number, record)
        yield wait_until(self, lambda: self.b.session_record(number) == record, what="record")
        changed = []
        self.b.watch_keys(changed.append)
        rotated = yield self.a.rotate_key("dev-7")
        yield wait_until(self, lambda: self.b.secret_for(number) == rotated.secret, what="key")
        yield self.a.remove_device("dev-7")
        yield wait_until(self, lambda: self.b.device("dev-7") is None, what="removal")
        self.assertEqual(changed, [number, number])
        batch = self.b.changes_since(0)
        self.assertEqual([v.removed for v in batch.devices if v.name == "dev-7"], [True])

    @defer.inlineCallbacks
    def test_device_added_again_never_repeats_a_version(self):
        """A device removed and added again under its name starts at its creation's
        cursor, above every version its predecessor had, here and on the other process
        (an ETag of the removed device never matches its successor)."""
        yield self.a.add_device("dev-again")
        for value in range(3):
            yield self.a.update_desired("dev-again", {"v": value})
        old = self.a.device("dev-again").version
        yield self.a.remove_device("dev-again")
        yield self.a.add_device("dev-again")
        new = self.a.device("dev-again")
        self.assertGreater(new.version, old)
        self.assertEqual(new.version, new.cursor)
        yield wait_until(self, lambda: getattr(self.b.device("dev-again"), "cursor", None)
                         == new.cursor, what="the new device on B")
        self.assertEqual(self.b.device("dev-again").version, new.version)
        for registry in (self.a, self.b):     # its "created" entry names them too
            entry = registry.device("dev-again").to_json()["history"][0]
            self.assertEqual((entry["kind"], entry["version"], entry["cursor"]),
                             ("created", new.version, new.cursor))

    @defer.inlineCallbacks
    def test_update_reported_many_answers_each_update_in_order(self):
        """update_reported_many (the UDP endpoint's per-turn batch) applies each accepted
        update, answers a refused one and an unknown device in their places, and the
        accepted change reaches the other process."""
        yield self.a.add_device("dev-m1")
        results = yield self.a.update_reported_many([
            ("dev-m1", {"t": 21.5}), ("dev-missing", {"t": 1.0}), ("dev-m1", {"": 1})])
        self.assertEqual(results[0].name, "dev-m1")
        self.assertIsInstance(results[1], errors.UnknownDevice)
        self.assertIsInstance(results[2], errors.RegistryError)
        self.assertNotIsInstance(results[2], errors.StoreError)
        yield wait_until(self, lambda: getattr(self.b.device("dev-m1"), "reported", {}).get("t")
                         == 21.5, what="report on B")

    @defer.inlineCallbacks
    def test_save_sessions_keeps_each_record_and_answers_in_order(self):
        """save_sessions (the UDP endpoint's per-turn batch) keeps every known device's record,
        on both processes, and answers an unknown device's in its place."""
        numbers = []
        for name in ("dev-s1", "dev-s2"):
            provisioned = yield self.a.add_device(name)
            numbers.append(provisioned.device_number)
        records = [SessionRecord(session_id=5, acked_remote_num=2), SessionRecord(session_id=6)]
        results = yield self.a.save_sessions([(numbers[0], records[0]), (987654321, records[0]),
                                              (numbers[1], records[1])])
        self.assertEqual(results[0], records[0])
        self.assertIsInstance(results[1], errors.UnknownDevice)
        self.assertEqual(results[2], records[1])
        for number, record in zip(numbers, records):
            self.assertEqual(self.a.session_record(number), record)
            yield wait_until(self, lambda n=number, r=record: self.b.session_record(n) == r,
                             what="record on B")

    @defer.inlineCallbacks
    def test_desired_change_on_one_process_reaches_desired_watchers_of_the_other(self):
        """B's watch_desired hears a desired write made on A (what its UDP endpoint forwards to the device)."""
        provisioned = yield self.a.add_device("dev-8")
        heard = []
        self.b.watch_desired(lambda number, desired: heard.append((number, dict(desired))))
        yield self.a.update_reported("dev-8", {"t": 1})
        yield self.a.update_desired("dev-8", {"led": "on"})
        yield wait_until(self, lambda: heard, what="desired on B")
        self.assertEqual(heard, [(provisioned.device_number, {"led": "on"})])

    @defer.inlineCallbacks
    def test_tokens_are_valid_on_every_process(self):
        """A token made on A is accepted by B; revoked on A, B refuses it."""
        token_id, text = yield self.a.add_token("write")
        yield wait_until(self, lambda: self.b.check_token(text) == "write", what="token on B")
        yield self.a.revoke_token(token_id)
        yield wait_until(self, lambda: self.b.check_token(text) is None, what="revocation on B")

    @defer.inlineCallbacks
    def test_new_process_loads_everything(self):
        """A process started later loads devices, versions, the cursor and session records from Redis."""
        provisioned = yield self.a.add_device("dev-9")
        yield self.a.update_reported("dev-9", {"t": 2})
        record = SessionRecord(session_id=5, seq_reservation=8192)
        yield self.a.save_session(provisioned.device_number, record)
        c = open_registry_on(self, self.url)
        view = c.device("dev-9")
        self.assertEqual((view.version, view.cursor, dict(view.reported)),
                         (self.a.device("dev-9").version, self.a.device("dev-9").cursor, {"t": 2}))
        self.assertEqual(c.cursor, self.a.cursor)
        self.assertEqual(c.session_record(provisioned.device_number), record)
        self.assertEqual([h[1] for h in view.history], [h[1] for h in self.a.device("dev-9").history])

    @defer.inlineCallbacks
    def test_too_large_state_is_refused_and_nothing_is_written(self):
        """A patch that would exceed max_state_bytes fails with StateTooLarge and bumps no version."""
        small = open_registry_on(self, self.url, max_state_bytes=300)
        yield small.add_device("dev-10")
        with self.assertRaises(errors.StateTooLarge):
            yield small.update_reported("dev-10", {"blob": "x" * 400})
        self.assertEqual(small.device("dev-10").version, 1)

    @defer.inlineCallbacks
    def test_online_count_follows_every_process(self):
        """A flip made on A is counted on A and B once applied; a removal uncounts it; a new process loads it online."""
        yield self.a.add_device("dev-11")
        yield self.a.add_device("dev-12")
        yield wait_until(self, lambda: self.b.device("dev-12") is not None, what="adds on B")
        yield self.a.set_connection("dev-11", online=True)
        yield self.b.set_connection("dev-12", online=True)
        yield wait_until(self, lambda: (self.a.online_count, self.b.online_count) == (2, 2),
                         what="both flips counted on A and B")
        c = open_registry_on(self, self.url)
        self.assertEqual(c.online_count, 2)
        yield self.a.remove_device("dev-11")
        yield wait_until(self, lambda: self.b.online_count == 1, what="removal counted on B")
        self.assertEqual(self.a.online_count, 1)


class InstrumentedRedisTests(SingleRedis, TestCase):
    """The broker's metrics wrapper sees the writes a SharedRegistry sends to Redis."""

    timeout = 60

    @defer.inlineCallbacks
    def test_writes_counted_by_kind_and_timed(self):
        """Adds, state changes, session records and tokens are counted by kind; sampled commits are timed."""
        metrics = Metrics()
        registry = open_shared_registry(
            redis_options(self, self.start_redis()), reactor=reactor,
            store_wrapper=lambda store: InstrumentedStore(store, metrics))
        registry.start()
        self.addCleanup(registry.stop)
        provisioned = yield registry.add_device("dev-1")
        for i in range(SAMPLE_EVERY):
            yield registry.update_reported("dev-1", {"t": float(i)})
        yield registry.save_session(provisioned.device_number, SessionRecord(session_id=3))
        yield registry.add_token("read")
        self.assertEqual(dict(metrics.commits.kinds), {
            "add": 1, "state": SAMPLE_EVERY, "session": 1, "token_add": 1})
        self.assertEqual(sum(metrics.commits.counts), 1)


class SingleRedisTests(SingleRedis, SharedRegistryTestsMixin, TestCase):
    """SharedRegistry on one Redis server."""


class ClusterRedisTests(ClusterRedis, SharedRegistryTestsMixin, TestCase):
    """SharedRegistry on a three-node Redis Cluster."""
