"""A replayed datagram of a live session gets no answer (wire.md 3: no reply,
no amplification): neither a duplicate of a state the broker acknowledged nor
a diff from a state it no longer holds makes the broker send anything."""

from twisted.trial.unittest import SynchronousTestCase

from broker.udp.sessions import LiveSession

from .helpers import Harness

ATTACKER = ("127.0.0.66", 6666)


def run_capturing(harness, seconds):
    """Run the harness for ``seconds``; return the datagrams the endpoint received."""
    endpoint = harness.endpoint
    captured = []

    def receive(data, address):
        captured.append((data, address))
        type(endpoint).datagramReceived(endpoint, data, address)

    endpoint.datagramReceived = receive
    try:
        harness.run(seconds)
    finally:
        del endpoint.datagramReceived
    return captured


class LiveReplayTests(SynchronousTestCase):
    """Replays of a live (not parked) session's datagrams are answered with silence."""

    def setUp(self):
        # A long park_after keeps the session live: parked ones are covered elsewhere.
        self.h = Harness(self, park_after=60.0)
        self.device = self.h.provision("dev")
        self.node = self.h.node(self.device)
        self.address = self.h.address_of(self.node)

    def live(self):
        entry = self.h.endpoint.entry_of(self.device.device_number)
        self.assertIsInstance(entry, LiveSession)
        return entry

    def assert_silent_to(self, captured, source):
        """Replaying ``captured`` from ``source`` sends nothing, now or at the next ticks."""
        self.h.transport.written = []
        sent = self.h.transport.sent.copy()
        writes = self.h.store.writes
        next_seq = self.live().session.next_seq
        for data, _ in captured:
            self.h.endpoint.datagramReceived(data, source)
        self.h.clock.advance(0.5)   # past the ack delay: a scheduled answer would be due
        self.assertEqual(self.h.transport.written, [])
        self.assertEqual(self.h.transport.sent, sent)
        self.assertEqual(self.live().session.next_seq, next_seq)
        self.assertEqual(self.h.store.writes, writes)

    def test_replayed_acknowledged_state_is_not_answered(self):
        """A captured datagram of a state the broker already acknowledged, replayed from
        the device's own (spoofed) address or from elsewhere, gets no reply."""
        self.node.report({"v": 1}, self.h.clock.seconds())
        captured = run_capturing(self.h, 1.0)
        self.assertTrue(self.node.idle())
        self.assert_silent_to(captured, self.address)
        self.assert_silent_to(captured, ATTACKER)
        self.assertEqual(self.live().session.remote_address, self.address)

    def test_replayed_diff_from_a_forgotten_state_is_not_answered(self):
        """A captured diff from a state the broker no longer holds (it went on to newer
        ones) is an unknown reference: replayed, it gets no reply either."""
        self.node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(1.0)
        self.node.report({"v": 2}, self.h.clock.seconds())
        captured = run_capturing(self.h, 1.0)
        self.node.report({"v": 3}, self.h.clock.seconds())
        self.h.run(1.0)
        self.node.report({"v": 4}, self.h.clock.seconds())
        self.h.run(1.0)
        self.assertTrue(self.node.idle())
        self.assert_silent_to(captured, self.address)
        self.assertGreaterEqual(self.h.endpoint.drops["unknown_reference"], 1)

    def test_device_still_served_after_replays(self):
        """After replays were ignored the device's own new report is acknowledged as usual."""
        self.node.report({"v": 1}, self.h.clock.seconds())
        captured = run_capturing(self.h, 1.0)
        for data, _ in captured:
            self.h.endpoint.datagramReceived(data, self.address)
        self.node.report({"v": 2}, self.h.clock.seconds())
        self.h.run(1.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(dict(self.h.registry.device("dev").reported), {"v": 2})
