"""A session record keeps the device's datagram sequence mark, so a captured
datagram replayed once the session left memory (evicted, or the broker
restarted) neither resumes the session nor points it at the replayer."""

import os

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from broker.registry.errors import StoreError
from broker.ssp.framing import build_header

from .helpers import Harness

ATTACKER = ("127.0.0.66", 6666)


def send_now(harness, node):
    """Hand the node's due datagrams to the endpoint; return them."""
    sent = node.datagrams(harness.clock.seconds())
    for data, _ in sent:
        harness.endpoint.datagramReceived(data, harness.address_of(node))
    return sent


class ReplayMarkTests(SynchronousTestCase):

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")
        self.node = self.h.node(self.device)
        self.node.report({"v": 1}, self.h.clock.seconds())
        self.captured = send_now(self.h, self.node)
        self.h.run(1.0)
        self.node.report({"v": 2}, self.h.clock.seconds())
        self.h.run(1.0)

    def record(self, harness=None):
        return (harness or self.h).registry.session_record(self.device.device_number)

    def assert_device_resumes(self, h2):
        """The real device, reporting after the restart, resumes its session there."""
        h2.nodes = self.h.nodes
        self.node.report({"v": 3}, h2.clock.seconds())
        h2.run(2.0)
        self.assertEqual(dict(h2.registry.device("dev").reported), {"v": 3})
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)

    def test_records_carry_the_mark(self):
        """The record written for a report holds the device's next expected sequence
        number at that time: above the captured datagram's, at most the session's now."""
        entry = self.h.endpoint.entry_of(self.device.device_number)
        expected = (entry.expected_seq() if hasattr(entry, "expected_seq")
                    else entry.session.expected_seq)
        record = self.record()
        self.assertGreater(record.remote_seq, 1)
        self.assertLessEqual(record.remote_seq, expected)

    def test_replay_after_restart_is_dropped(self):
        """After a restart a captured older datagram of the live session is dropped as a
        replay: no session is resumed, nothing is sent; the device itself resumes."""
        h2 = self.h.restart()
        for data, _ in self.captured:
            h2.endpoint.datagramReceived(data, ATTACKER)
        self.assertEqual(h2.endpoint.drops["replay"], len(self.captured))
        self.assertEqual(len(h2.endpoint), 0)
        self.assertEqual(h2.transport.written, [])
        self.assert_device_resumes(h2)
        self.assertEqual(self.node.sessions_started, 1)
        self.assertTrue(self.node.idle())

    def test_replay_after_eviction_is_dropped(self):
        """A session evicted after its device went offline keeps its mark (written as it
        leaves memory, heartbeats included): a replay of any datagram it took is dropped."""
        address = self.h.address_of(self.node)
        self.h.run(30.0, dt=0.05)          # a heartbeat: a newer mark than any report's
        heartbeat_mark = self.h.endpoint.entry_of(self.device.device_number).expected_seq()
        self.assertGreater(heartbeat_mark, self.record().remote_seq)
        del self.h.nodes[address]
        self.h.run(80.0, dt=0.5)
        self.assertIsNone(self.h.endpoint.entry_of(self.device.device_number))
        self.assertEqual(self.record().remote_seq, heartbeat_mark)
        for data, _ in self.captured:
            self.h.endpoint.datagramReceived(data, ATTACKER)
        self.assertEqual(self.h.endpoint.drops["replay"], len(self.captured))
        self.assertIsNone(self.h.endpoint.entry_of(self.device.device_number))
        self.assertEqual([a for _, a in self.h.transport.written if a == ATTACKER], [])
        self.h.nodes[address] = self.node
        self.node.report({"v": 4}, self.h.clock.seconds())
        self.h.run(1.0)
        self.assertEqual(dict(self.h.registry.device("dev").reported), {"v": 4})
        self.assertTrue(self.h.registry.device("dev").online)

    def test_unreadable_record_starts_no_session(self):
        """A session record that cannot be read (damaged, or written by a newer broker)
        drops the datagram: a session started over it would reuse its sequence numbers."""
        h2 = self.h.restart()

        def damaged(number):
            raise StoreError("damaged session record")
        h2.registry.session_record = damaged
        for data, _ in self.captured:
            h2.endpoint.datagramReceived(data, self.h.address_of(self.node))
        self.assertEqual(h2.endpoint.drops["bad_record"], len(self.captured))
        self.assertEqual(len(h2.endpoint), 0)
        self.assertEqual(h2.transport.written, [])
        self.flushLoggedErrors()

    def test_unreadable_record_of_a_parked_session_is_no_crash_and_no_log_flood(self):
        """Datagrams naming a parked session whose record cannot be read are dropped,
        never an internal error: forgeries unlogged, the device's own (``bad_record``)
        with at most one error line a second, and nothing is sent."""
        self.assertEqual(type(self.h.endpoint.entry_of(self.device.device_number)).__name__,
                         "Parked")

        def damaged(number):
            raise StoreError("damaged session record")
        self.h.registry.session_record = damaged
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        header = build_header(self.device.device_number, self.node.session_id)
        for i in range(100):
            self.h.endpoint.datagramReceived(header + os.urandom(60), ("127.0.0.66", 6000 + i))
        self.assertEqual([e for e in logged if e["log_level"] >= LogLevel.info], [])
        self.node.report({"v": 3}, self.h.clock.seconds())
        self.h.run(3.0)
        drops = self.h.endpoint.drops
        self.assertEqual(drops["internal_error"], 0)
        self.assertGreater(drops["bad_record"], 3)
        self.assertIsNone(self.h.endpoint.entry_of(self.device.device_number))
        self.assertEqual(self.flushLoggedErrors(), [])
        errors = [e for e in logged if e["log_level"] >= LogLevel.info]
        self.assertGreater(len(errors), 0)
        self.assertLessEqual(len(errors), 3)
        self.assertEqual(self.h.transport.written, [])

    def test_replay_after_a_clean_stop_is_dropped(self):
        """A clean stop writes every session's mark: a heartbeat sent after the last
        report, replayed after the restart, neither resumes the session nor gets a reply."""
        seen = []
        receive = self.h.endpoint.datagramReceived
        self.h.endpoint.datagramReceived = lambda data, addr: (seen.append(data),
                                                              receive(data, addr))
        self.h.run(30.0, dt=0.05)   # a heartbeat, newer than the last report's mark
        del self.h.endpoint.datagramReceived
        self.assertTrue(seen)
        h2 = self.h.restart()
        h2.endpoint.datagramReceived(seen[-1], ATTACKER)
        self.assertEqual(h2.endpoint.drops["replay"], 1)
        self.assertIsNone(h2.endpoint.entry_of(self.device.device_number))
        self.assertEqual(h2.transport.written, [])
        self.assert_device_resumes(h2)
        self.assertTrue(self.node.idle())
