"""Sequence reservations as compare-and-set (wire.md 7): one process's registry
and endpoint, on a MemoryStore and task.Clock."""

from __future__ import annotations

import copy

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import MemoryStore, SessionRecord, errors
from broker.registry.provisioning import SessionConflict
from broker.udp.sessions import SEQ_PER_SECOND, SEQ_RESERVATION_BLOCK, clock_floor

from .helpers import Harness


class FailingStore(MemoryStore):
    """A MemoryStore whose session record writes fail while ``failing`` is set."""

    failing = False

    def write(self, op, result=None):
        if self.failing and op[0] == "session":
            return defer.fail(errors.StoreError("session writes are failing"))
        return super().write(op, result)


class RegistryReservationTests(SynchronousTestCase):
    """The single-process registry's reserve_session and the rules of plain record writes."""

    def setUp(self):
        self.h = Harness(self)
        self.number = self.h.provision("dev").device_number
        self.registry = self.h.registry

    def reserve(self, record, expected):
        return self.registry.reserve_session(self.number, record, expected)

    def test_start_once_per_session_id(self):
        """A new session's first reservation succeeds once; a second start of that id conflicts."""
        record = SessionRecord(session_id=5, seq_reservation=SEQ_RESERVATION_BLOCK)
        self.assertEqual(self.successResultOf(self.reserve(record, None)), record)
        self.failureResultOf(self.reserve(record, None), SessionConflict)
        self.assertEqual(self.registry.session_record(self.number), record)

    def test_start_of_older_session_conflicts(self):
        """A start of a session id below the stored one conflicts and leaves the record."""
        newer = SessionRecord(session_id=9, seq_reservation=100)
        self.successResultOf(self.reserve(newer, None))
        self.failureResultOf(self.reserve(SessionRecord(session_id=8, seq_reservation=5), None),
                             SessionConflict)
        self.assertEqual(self.registry.session_record(self.number), newer)

    def test_reserve_compares_the_stored_reservation(self):
        """A reservation succeeds only from the stored one; a stale expected value conflicts."""
        self.successResultOf(self.reserve(SessionRecord(session_id=5, seq_reservation=4096),
                                          None))
        taken = SessionRecord(session_id=5, seq_reservation=8192)
        self.successResultOf(self.reserve(taken, 4096))
        self.failureResultOf(self.reserve(SessionRecord(session_id=5, seq_reservation=8192),
                                          4096), SessionConflict)
        self.failureResultOf(self.reserve(SessionRecord(session_id=6, seq_reservation=8192),
                                          8192), SessionConflict)
        self.assertEqual(self.registry.session_record(self.number), taken)

    def test_plain_writes_never_lower_the_reservation_nor_steal(self):
        """save_session/save_sessions refuse a lower reservation or an older session id."""
        current = SessionRecord(session_id=5, seq_reservation=8192)
        self.successResultOf(self.reserve(current, None))
        self.failureResultOf(self.registry.save_session(
            self.number, SessionRecord(session_id=5, seq_reservation=4096)), SessionConflict)
        self.failureResultOf(self.registry.save_session(
            self.number, SessionRecord(session_id=4, seq_reservation=9999)), SessionConflict)
        results = self.successResultOf(self.registry.save_sessions(
            [(self.number, SessionRecord(session_id=5, acked_remote_num=3,
                                         seq_reservation=4096))]))
        self.assertIsInstance(results[0], SessionConflict)
        self.assertEqual(self.registry.session_record(self.number), current)
        same = current._replace(acked_remote_num=7)
        self.assertEqual(self.successResultOf(self.registry.save_session(self.number, same)),
                         same)

    def test_failed_reservation_write_is_not_kept_in_memory(self):
        """A reservation whose store write failed leaves the confirmed one in memory."""
        store = FailingStore()
        h = Harness(self, store=store)
        number = h.provision("dev").device_number
        self.successResultOf(h.registry.reserve_session(
            number, SessionRecord(session_id=5, seq_reservation=4096), None))
        store.failing = True
        self.failureResultOf(h.registry.reserve_session(
            number, SessionRecord(session_id=5, seq_reservation=8192), 4096), errors.StoreError)
        self.assertEqual(h.registry.session_record(number).seq_reservation, 4096)


class EndpointReservationTests(SynchronousTestCase):
    """The endpoint's reservations: rolled back and asked again after a store failure."""

    def test_failed_reservation_is_asked_again(self):
        """A resumed session whose first reservation write failed sends again once the store recovers."""
        store = FailingStore()
        h = Harness(self, store=store)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        before = h.registry.session_record(device.device_number).seq_reservation
        store.failing = True
        h2 = h.restart()
        h2.nodes = h.nodes
        node.report({"v": 2}, h.clock.seconds())
        h2.run(2.0)
        live = h2.endpoint.session_of(device.device_number)
        self.assertEqual(live.reserved, before)   # rolled back: nothing confirmed
        self.assertGreater(h2.endpoint.counters["store_failures"], 0)
        store.failing = False
        acked = node.acknowledged
        node.report({"v": 3}, h.clock.seconds())
        h2.run(5.0)
        self.assertGreater(node.acknowledged, acked)
        self.assertGreater(h2.registry.session_record(device.device_number).seq_reservation,
                           before)
        self.assertEqual(h2.endpoint.session_of(device.device_number).session_id,
                         node.session_id)
        self.flushLoggedErrors(errors.StoreError)

    def test_failed_start_is_written_again(self):
        """A new session whose start write failed is started once the store recovers."""
        store = FailingStore()
        h = Harness(self, store=store)
        device = h.provision("dev")
        store.failing = True
        node = h.node(device)
        started = h.clock.seconds()
        node.report({"v": 1}, started)
        h.run(2.0)
        self.assertEqual(h.delivered, 0)
        store.failing = False
        for value in range(2, 6):
            node.report({"v": value}, h.clock.seconds())
            h.run(1.0)
        self.assertGreater(node.acknowledged, 0)
        record = h.registry.session_record(device.device_number)
        self.assertEqual(record.session_id, node.session_id)
        self.assertEqual(record.seq_reservation, clock_floor(started) + SEQ_RESERVATION_BLOCK)
        self.flushLoggedErrors(errors.StoreError)

    def test_conflicting_reservation_retires_the_session(self):
        """A reservation refused because another process moved the record on retires the session."""
        h = Harness(self)
        device = h.provision("dev")
        number = device.device_number
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        live = h.endpoint.session_of(number)
        record = h.registry.session_record(number)
        # Another process resumed the session and reserved the next block.
        self.successResultOf(h.registry.reserve_session(
            number, record._replace(seq_reservation=record.seq_reservation + 4096),
            record.seq_reservation))
        h.endpoint._writes.reserve(live, live.reserved + SEQ_RESERVATION_BLOCK)
        self.assertIsNot(h.endpoint.entry_of(number), live)
        self.assertEqual(h.endpoint.counters["reservation_conflicts"], 1)
        self.assertEqual(h.registry.session_record(number).seq_reservation,
                         record.seq_reservation + 4096)


class CommitFailingStore(MemoryStore):
    """A MemoryStore whose held writes can fail together, as one failed commit."""

    def fail_held(self):
        held, self._held = self._held or [], None
        for _, d, _ in held:
            d.errback(errors.StoreError("the commit failed"))


class FailedCommitTests(SynchronousTestCase):
    """A reservation and a report record failing in one commit (an asynchronous store)."""

    def test_reservation_failed_with_a_report_is_asked_again(self):
        """A reservation whose write failed in the commit of a report record is written
        again with the next datagram: the session is neither retired nor stuck."""
        store = CommitFailingStore()
        h = Harness(self, store=store)
        device = h.provision("dev")
        number = device.device_number
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        live = h.endpoint.session_of(number)
        confirmed, acked = live.reserved, node.acknowledged
        store.hold()
        h.endpoint._writes.reserve(live, confirmed + SEQ_RESERVATION_BLOCK)
        node.report({"v": 2}, h.clock.seconds())
        h.run(0.2)
        self.assertGreater(live.writes, 1)    # the reservation and the report, held
        store.fail_held()
        for value in range(3, 6):
            node.report({"v": value}, h.clock.seconds())
            h.run(1.0)
        self.assertEqual(h.endpoint.counters["reservation_conflicts"], 0)
        self.assertEqual(h.endpoint.counters["sessions_retired"], 0)
        now = h.endpoint.session_of(number)     # (possibly parked meanwhile)
        self.assertEqual(now.session_id, live.session_id)
        self.assertEqual(now.reserved, confirmed + SEQ_RESERVATION_BLOCK)
        self.assertEqual(h.registry.session_record(number).seq_reservation, now.reserved)
        self.assertGreater(node.acknowledged, acked)
        self.flushLoggedErrors(errors.StoreError)

    def test_failed_start_with_a_record_after_it_can_start_again(self):
        """A start failing in one commit with a plain record of its session (which carried
        its reservation) leaves no reservation in memory: the start can be asked again."""
        store = CommitFailingStore()
        h = Harness(self, store=store)
        number = h.provision("dev").device_number
        registry = h.registry
        start = SessionRecord(session_id=5, seq_reservation=SEQ_RESERVATION_BLOCK)
        store.hold()
        started = registry.reserve_session(number, start, None)
        saved = registry.save_session(number, start._replace(acked_remote_num=1))
        store.fail_held()
        self.failureResultOf(started, errors.StoreError)
        self.failureResultOf(saved, errors.StoreError)
        self.assertEqual(registry.session_record(number).seq_reservation, 0)
        self.assertEqual(self.successResultOf(registry.reserve_session(number, start, None)),
                         start)


class RestoredStoreTests(SynchronousTestCase):
    """A store restored from a backup holds reservations older than numbers
    already sent, or no record of a later session: the broker still never
    seals two datagrams with one nonce (sessions.clock_floor)."""

    def assert_fresh_nonces(self, before, after):
        """``after`` sent something, and no nonce of it was used in ``before``."""
        self.assertTrue(after)
        used = {data[17:25] for data in before}
        self.assertEqual([data for data in after if data[17:25] in used], [])

    def test_session_started_after_the_backup_is_replayed_after_a_restore(self):
        """A replayed first datagram of a session the backup never saw starts it
        again, numbering above everything sent in it before."""
        h = Harness(self)
        device = h.provision("dev")
        backup = copy.deepcopy(h.store)
        first = []
        receive = h.endpoint.datagramReceived

        def capturing(data, addr):
            first.append((data, addr))
            receive(data, addr)
        h.endpoint.datagramReceived = capturing
        before = h.transport.log
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(2.0)
        self.assertEqual(h.endpoint.counters["sessions_started"], 1)
        h.clock.advance(5.0)
        h2 = Harness(self, store=backup, clock=h.clock)
        after = h2.transport.log
        h2.endpoint.datagramReceived(*first[0])
        h2.run(1.0)
        self.assertEqual(h2.endpoint.counters["sessions_started"], 1)
        self.assertEqual(h2.endpoint.session_of(device.device_number).session_id,
                         node.session_id)
        self.assert_fresh_nonces(before, after)

    def test_session_resumed_from_a_stale_record_numbers_above_what_it_sent(self):
        """A session resumed from a record whose reservation is older than numbers
        it already used (a backup) seals none of those numbers again."""
        h = Harness(self)
        device = h.provision("dev")
        before = h.transport.log
        node = h.node(device)
        for value in range(5):
            node.report({"v": value}, h.clock.seconds())
            h.run(0.5)
        backup = copy.deepcopy(h.store)
        record = backup.sessions[device.device_number]
        first_sent = int.from_bytes(before[0][17:25], "big") & ((1 << 63) - 1)
        # Restored: the reservation it holds is below numbers already sent.
        backup.sessions[device.device_number] = record._replace(seq_reservation=first_sent + 1)
        h.clock.advance(5.0)
        h2 = Harness(self, store=backup, clock=h.clock)
        h2.nodes = h.nodes
        after = h2.transport.log
        node.report({"v": 99}, h.clock.seconds())
        h2.run(2.0)
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(dict(h2.registry.device("dev").reported), {"v": 99})
        self.assert_fresh_nonces(before, after)

    def test_clock_floor_leaves_room(self):
        """Clock floors grow a million numbers a second, and stay exact in a double until 2242."""
        self.assertEqual(clock_floor(1002.9) - clock_floor(1000.0), 2 * SEQ_PER_SECOND)
        self.assertEqual(clock_floor(-5.0), 0)
        self.assertLess(clock_floor(8_589_934_591), 1 << 53)   # 2242-03-16

    def test_retired_record_is_never_resumed_and_the_device_starts_over(self):
        """A restored backup's records are retired: the device's session (which went on
        past the backup) is not resumed over the backup's state, so the registry never
        mixes the two; the device starts a new session and the registry then holds
        exactly the device's state."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"a": 1, "b": 1}, h.clock.seconds())
        h.run(1.0)
        backup = copy.deepcopy(h.store)
        node.report({"a": 2, "b": 2}, h.clock.seconds())
        h.run(1.0)
        self.assertTrue(node.idle())
        old_session = node.session_id
        backup.sessions = {number: SessionRecord.retired(record.session_id)
                           for number, record in backup.sessions.items()}
        h2 = Harness(self, store=backup, clock=h.clock)
        h2.nodes = h.nodes
        node.report({"a": 2, "b": 3}, h.clock.seconds())
        h2.run(5.0)
        self.assertGreater(h2.endpoint.drops["old_session"], 0)
        self.assertEqual(dict(h2.registry.device("dev").reported), {"a": 1, "b": 1})
        h2.run(80.0, dt=0.1)                       # the node's rekey_after is 75 s
        self.assertNotEqual(node.session_id, old_session)
        self.assertEqual(h2.endpoint.counters["sessions_started"], 1)
        self.assertEqual(dict(h2.registry.device("dev").reported), {"a": 2, "b": 3})

    def test_new_sessions_number_states_from_their_first_sequence_number(self):
        """A new session's states are numbered above its clock floor too, so a device
        holding states of that key from a lost run takes the new ones."""
        h = Harness(self, park_after=3600.0)     # parked and woken, it would resume
        device = h.provision("dev")
        node = h.node(device)
        started = h.clock.seconds()
        node.report({"v": 1}, started)
        h.run(1.0)
        self.successResultOf(h.registry.update_desired("dev", {"led": "on"}))
        h.run(1.0)
        self.assertEqual(h.endpoint.counters["sessions_parked"], 0)
        session = h.endpoint.session_of(device.device_number).session
        self.assertGreater(session.newest_sent_num, clock_floor(started))
        self.assertEqual(node.desired, {"led": "on"})
