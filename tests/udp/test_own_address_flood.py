"""Forgeries that copy a live device's own source address (a spoofed flood)."""

import math
import os

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.framing import build_header
from broker.udp.admission import Admission

from tests.udp.helpers import Harness

A_ADDRESS = ("127.0.0.2", 40000)
B_ADDRESS = ("127.0.0.3", 40000)


class OwnAddressFloodTests(SynchronousTestCase):
    """A flood from one device's address costs about that device's share."""

    def setUp(self):
        self.h = h = Harness(self, max_datagrams_per_second=50)
        self.a = h.provision("a")
        self.b = h.provision("b")
        self.node_a = h.node(self.a, address=A_ADDRESS)
        self.node_b = h.node(self.b, address=B_ADDRESS)
        h.run(1.0)
        self.assertTrue(self.node_a.idle() and self.node_b.idle())
        self.header = build_header(self.a.device_number, self.node_a.session_id)

    def forge(self, count):
        """``count`` forgeries naming device a's session, from a's address."""
        for _ in range(count):
            self.h.endpoint.datagramReceived(self.header + os.urandom(60), A_ADDRESS)

    def start_of_second(self):
        now = self.h.clock.seconds()
        self.h.clock.advance(math.floor(now) + 1.0 - now)

    def test_other_devices_keep_the_ports_rate(self):
        """500 forgeries a second from device a's own address leave device b's
        reports within the port's rate: none of its datagrams is refused."""
        h = self.h
        before = h.endpoint.drops["global_rate_limited"]
        for second in range(3):
            self.node_b.report({"v": second}, h.clock.seconds())
            for _ in range(100):
                self.forge(5)
                h.step(0.01)
        h.run(2.0)
        self.assertEqual(h.endpoint.drops["global_rate_limited"], before)
        self.assertEqual(dict(h.registry.device("b").reported), {"v": 2})
        self.assertTrue(self.node_b.idle())

    def test_a_second_of_flood_opens_at_most_the_failure_budget(self):
        """Within one second, forgeries from the device's own address are
        decrypted only until its failure budget is spent; the rest are dropped
        unopened as rate_limited."""
        h = self.h
        self.start_of_second()
        drops = h.endpoint.drops
        failed, limited = drops["auth_failed"], drops["rate_limited"]
        self.forge(300)
        budget = h.settings.auth_failure_budget
        self.assertEqual(drops["auth_failed"] - failed, budget)
        self.assertEqual(drops["rate_limited"] - limited, 300 - budget)
        self.assertEqual(h.transport.written, [])

    def test_the_device_is_served_again_the_next_second(self):
        """Once the flood stops, device a's own datagrams are served again (from
        the next second on) and its report lands."""
        h = self.h
        self.start_of_second()
        self.forge(100)
        h.clock.advance(1.0)
        self.node_a.report({"back": True}, h.clock.seconds())
        h.run(1.0)
        self.assertEqual(dict(h.registry.device("a").reported), {"back": True})
        self.assertTrue(self.node_a.idle())

    def test_forgeries_from_strangers_leave_the_own_address_open(self):
        """Forgeries naming device a from another host spend a's budget for
        strangers only: a's own datagrams are still opened in that second."""
        h = self.h
        self.start_of_second()
        for _ in range(100):
            h.endpoint.datagramReceived(self.header + os.urandom(60),
                                        ("127.0.0.66", 6666))
        self.node_a.report({"own": 1}, h.clock.seconds())
        h.run(0.5)   # still within the second of the flood
        self.assertEqual(dict(h.registry.device("a").reported), {"own": 1})
        self.assertTrue(self.node_a.idle())


class OwnFailureBudgetTests(SynchronousTestCase):
    """Admission's own-address budget, alone."""

    def test_only_own_address_failures_close_it(self):
        """Failures from strangers do not close a device's own address;
        auth_failure_budget failures from it do, until the next second."""
        settings = Harness(self).settings
        admission = Admission(settings, 10.0)
        for _ in range(50):
            admission.failed_current(7, "192.0.2.1", 10.1)
        self.assertFalse(admission.own_address_closed(7, 10.2))
        for _ in range(settings.auth_failure_budget):
            self.assertFalse(admission.own_address_closed(7, 10.3))
            admission.failed_current(7, None, 10.3)
        self.assertTrue(admission.own_address_closed(7, 10.4))
        self.assertFalse(admission.own_address_closed(8, 10.4))
        self.assertFalse(admission.own_address_closed(7, 11.0))
