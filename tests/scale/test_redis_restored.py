"""``broker-admin redis restored`` on a real redis-server: after Redis was
restored from an older copy, no client cursor is handed out again and every
one handed out before gets a reset (a snapshot), as after an unclean start of
the SQLite store (restart.py)."""

import io
import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from broker.registry import SessionRecord, cli, errors
from broker.registry.redis_marker import OlderCopy
from broker.registry.restart import CURSOR_GAP
from tests.udp.loopback import wait_until

from .redis_support import AdminOnRedis


class RedisRestoredTests(AdminOnRedis, TestCase):
    """A Redis put back to an older copy, then told so."""

    timeout = 60

    def snapshot(self):
        """Every key as DUMP gives it (what an RDB file would hold)."""
        return {key: self.direct.dump(key) for key in self.direct.keys("*")}

    def put_back(self, snapshot):
        """Redis as the snapshot had it (a restore from an older copy)."""
        self.direct.flushall()
        for key, value in snapshot.items():
            self.direct.restore(key, 0, value)

    @defer.inlineCallbacks
    def test_cursors_handed_out_after_the_copy_are_reset_and_never_reused(self):
        """A dashboard's cursor from after the copy gets a reset from the restarted
        broker, before and after the fleet writes past it, and a new change's
        cursor is above every cursor handed out before."""
        a = self.open_registry()
        yield a.add_device("porch")
        yield a.add_device("gone")
        yield a.update_reported("porch", {"v": 1})
        yield a.save_session(a.device("porch").device_number,
                             SessionRecord(7, 3, b"", 0, b"", 8192, 12))
        copy = self.snapshot()
        before_copy = a.cursor
        yield a.remove_device("gone")
        for value in range(2, 6):
            yield a.update_reported("porch", {"v": value})
        held = a.cursor                  # a dashboard's cursor, lost by the restore
        self.assertGreater(held, before_copy)
        yield a.stop()
        self.put_back(copy)

        code, out, err = self.admin("--json", "redis", "restored")
        self.assertEqual((code, err), (0, ""))
        answer = json.loads(out)
        self.assertEqual(answer, {"sequence_before": before_copy,
                                  "sequence": before_copy + CURSOR_GAP,
                                  "sessions_retired": 1, "versions_raised": 2})

        b = self.open_registry()
        self.assertEqual(b.cursor, before_copy + CURSOR_GAP)
        # The record of the copy is retired: that session never resumes over it.
        record = b.session_record(b.device("porch").device_number)
        self.assertEqual(record, SessionRecord.retired(7))
        self.assertFalse(record.resumable)
        batch = b.changes_since(held)
        self.assertTrue(batch.reset)
        self.assertEqual({view.name for view in batch.devices}, {"porch", "gone"})
        yield b.update_reported("porch", {"v": 7})
        self.assertEqual(b.cursor, before_copy + CURSOR_GAP + 1)
        self.assertEqual(b.counters["stream_resync"], 0)        # no gap after the marker
        self.assertTrue(b.changes_since(held).reset)
        self.assertTrue(b.changes_since(before_copy).reset)
        current = b.changes_since(before_copy + CURSOR_GAP)
        self.assertFalse(current.reset)
        self.assertEqual([view.name for view in current.devices], ["porch"])

    @defer.inlineCallbacks
    def test_versions_handed_out_after_the_copy_never_name_another_state(self):
        """A version a client saw after the copy was taken (its ETag) is never issued
        again: `redis restored` raises every version to the new sequence, and the
        history's cursors stay those of their changes."""
        a = self.open_registry()
        yield a.add_device("porch")
        yield a.update_reported("porch", {"v": 1})
        copy = self.snapshot()
        before = a.device("porch")
        yield a.update_reported("porch", {"v": 2})
        seen = a.device("porch").version          # a client's ETag, lost by the restore
        yield a.stop()
        self.put_back(copy)
        code, out, _ = self.admin("--json", "redis", "restored")
        self.assertEqual(code, 0)
        sequence = json.loads(out)["sequence"]
        b = self.open_registry()
        restored = b.device("porch")
        self.assertEqual(restored.reported, {"v": 1})
        self.assertEqual(restored.version, sequence)
        self.assertEqual([entry[:2] for entry in restored.history],
                         [entry[:2] for entry in before.history])
        yield b.update_reported("porch", {"v": 3})
        self.assertGreater(b.device("porch").version, seen)
        yield self.assertFailure(b.update_desired("porch", {"x": 1}, expected_version=seen),
                                 errors.VersionConflict)

    @defer.inlineCallbacks
    def test_a_broker_refuses_an_older_copy_until_told(self):
        """A broker started on a copy older than what its data directory saw (its
        writes after the copy were remembered at its clean stop) refuses, naming the
        command; after `redis restored` it starts; `redis adopt-new` also lets it."""
        a = self.open_registry()
        yield a.add_device("porch")
        copy = self.snapshot()
        yield a.update_reported("porch", {"v": 2})
        seen = a.cursor
        yield a.stop()
        self.put_back(copy)
        with self.assertRaises(OlderCopy) as refused:
            self.open_registry()
        message = str(refused.exception)
        self.assertIn(f"at change {seen - 1}", message)
        self.assertIn(f"saw it at change {seen}", message)
        self.assertIn("broker-admin redis restored", message)
        self.assertEqual(self.admin("redis", "restored")[0], 0)
        b = self.open_registry()
        self.assertEqual(b.cursor, seen - 1 + CURSOR_GAP)
        yield b.stop()
        # A deliberate new data set is another matter: no sequence is held against it.
        self.put_back(copy)
        with self.assertRaises(OlderCopy):
            self.open_registry()
        self.assertEqual(self.admin("redis", "adopt-new")[0], 0)
        self.assertEqual(self.open_registry().device("porch").reported, {})

    @defer.inlineCallbacks
    def test_a_copy_older_than_a_running_process_saw_is_refused_after_a_crash(self):
        """A running process remembers how far it followed the data set at most
        every ``progress_interval``: a copy taken before that and put back after
        the process died (no clean stop) is refused at the next start."""
        from twisted.internet import reactor
        from twisted.internet.task import Clock, LoopingCall

        from broker.registry.shared import open_shared_registry

        clock = Clock()
        a = open_shared_registry(self.options, reactor=reactor, clock=clock, lease_ttl=0,
                                 data_dir=self.data_dir, progress_interval=60.0)
        a.start()

        def written(d):
            """d, with the writes' flushes (calls at 0 s on the clock) run meanwhile."""
            flushes = LoopingCall(clock.advance, 0)
            flushes.start(0.01)
            return d.addBoth(lambda result: (flushes.stop(), result)[1])
        self.addCleanup(lambda: written(a.stop()))
        store = a._store

        def seen():
            return store.remembered.sequence_seen(store.incarnation) or 0
        at_start = seen()
        yield written(a.add_device("porch"))
        copy, copied_at = self.snapshot(), a.cursor
        yield written(a.update_reported("porch", {"v": 2}))
        self.assertEqual(seen(), at_start)      # not due yet
        clock.advance(60)
        yield written(a.update_reported("porch", {"v": 3}))
        yield wait_until(self, lambda: seen() > copied_at, what="a later cursor remembered")
        self.assertLessEqual(seen(), a.cursor)
        self.put_back(copy)                     # a's crash: no clean stop records it
        with self.assertRaises(OlderCopy) as refused:
            self.open_registry()
        self.assertIn(f"at change {copied_at} ", str(refused.exception))
        self.assertIn(f"saw it at change {seen()}", str(refused.exception))

    @defer.inlineCallbacks
    def test_a_sibling_recording_during_a_load_is_no_older_copy(self):
        """Workers sharing a data directory: one that records a newer sequence while
        another scans the devices (after it read Redis's sequence) gets that one
        refused as an older copy never (the file is read before Redis)."""
        from broker.registry import redis_store

        a = self.open_registry()
        yield a.add_device("porch")
        load = redis_store.RedisStore._load
        siblings = []

        def slow_load(store, client):
            loaded = load(store, client)
            if not siblings:
                siblings.append(None)
                # While this one scans: a change elsewhere, and a sibling starts.
                self.direct.incr(store.key_seq)
                sibling = redis_store.RedisStore(self.options, reactor=None,
                                                 data_dir=self.data_dir)
                siblings[0] = sibling.load().sequence
                sibling.close()
            return loaded
        self.patch(redis_store.RedisStore, "_load", slow_load)
        b = self.open_registry()
        self.assertEqual(siblings, [b.cursor + 1])

    @defer.inlineCallbacks
    def test_later_removals_never_set_the_horizon_back(self):
        """Tombstones from before the restore are dropped, so trimming newer ones
        keeps every cursor handed out before the restore below the horizon."""
        a = self.open_registry()
        for n in range(3):
            yield a.add_device(f"old-{n}")
        for n in range(3):
            yield a.remove_device(f"old-{n}")
        yield a.stop()
        code, out, _ = self.admin("--json", "redis", "restored")
        self.assertEqual(code, 0)
        horizon = json.loads(out)["sequence"]
        self.assertEqual(self.direct.zcard("{ssp}:tombs"), 0)
        b = self.open_registry()
        for n in range(3):
            yield b.add_device(f"new-{n}")
        for n in range(3):
            yield b.remove_device(f"new-{n}")
        self.assertGreaterEqual(int(self.direct.get("{ssp}:horizon") or 0), horizon)
        self.assertTrue(b.changes_since(horizon - 1).reset)

    @defer.inlineCallbacks
    def test_refused_while_a_broker_holds_a_lease(self):
        """With a broker process still running (its presence lease), nothing changes
        and the one-line error names it and says what to do."""
        a = self.open_registry(lease_ttl=15.0)
        yield a.add_device("porch")
        sequence = self.direct.get("{ssp}:seq")
        code, out, err = self.admin("redis", "restored")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("still hold a lease", err)
        self.assertIn("stop every broker", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertEqual(self.direct.get("{ssp}:seq"), sequence)

    @defer.inlineCallbacks
    def test_a_process_still_following_the_stream_stops_writing(self):
        """A process that kept running through the restore (its lease bypassed) reads
        the marker entry and refuses writes: its replica holds data Redis lost."""
        a = self.open_registry()
        yield a.add_device("porch")
        code, _, err = self.admin("redis", "restored")
        self.assertEqual((code, err), (0, ""))
        yield wait_until(self, lambda: a.readiness() is not None, what="the refusal")
        self.assertIn("Redis lost data", a.readiness())
        yield self.assertFailure(a.update_reported("porch", {"v": 2}), errors.StoreError)

    def test_needs_a_redis_config(self):
        """Without a Redis config the command says what it needs."""
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--data-dir", self.mktemp(), "redis", "restored"], out, err)
        self.assertEqual(code, 1)
        self.assertIn("redis restored needs --config", err.getvalue())
