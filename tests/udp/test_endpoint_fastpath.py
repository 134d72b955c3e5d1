"""Edge cases the endpoint's per-datagram fast path relies on (endpoint, admission,
limits, table): the budgets in one call, a bucket's cap, a wake-up read once."""

from twisted.trial.unittest import SynchronousTestCase

from broker.config import SSPSettings
from broker.udp.admission import Admission
from broker.udp.drops import EndpointDrop
from broker.udp.limits import TokenBucket

from .helpers import Harness


class BucketCapTests(SynchronousTestCase):
    """A bucket refills to its burst exactly, never above it."""

    def test_refill_reaches_the_burst_exactly(self):
        bucket = TokenBucket(4, burst=2, now=0.0)
        self.assertTrue(bucket.allow(0.0, cost=2))
        self.assertFalse(bucket.allow(0.25, cost=2))   # 1 token back
        self.assertTrue(bucket.allow(0.5, cost=2))     # 2: the burst, exactly
        self.assertEqual([bucket.allow(50.0) for _ in range(3)], [True, True, False])


class CurrentAdmissionTests(SynchronousTestCase):
    """``Admission.current``: the checks of a current session's datagram, in order,
    and the port's rate charged only when all the others let it through."""

    def admission(self, **settings):
        return Admission(SSPSettings(**settings), 10.0)

    def test_admitted_charges_the_port_rate(self):
        admission = self.admission(max_datagrams_per_second=2)
        self.assertIsNone(admission.current(7, None, 10.0))
        self.assertIsNone(admission.current(7, None, 10.0))
        self.assertEqual(admission.current(7, None, 10.0), EndpointDrop.GLOBAL_RATE_LIMITED)

    def test_own_address_closed_spends_no_port_rate(self):
        admission = self.admission(max_datagrams_per_second=1, auth_failure_budget=1)
        admission.failed_current(7, None, 10.1)
        self.assertEqual(admission.current(7, None, 10.2), EndpointDrop.RATE_LIMITED)
        self.assertIsNone(admission.current(8, None, 10.2))   # the token was still there
        self.assertIsNone(admission.current(7, None, 11.5))   # the next second: open again

    def test_device_rate_spends_no_port_rate(self):
        admission = self.admission(max_datagrams_per_second=1,
                                   max_device_datagrams_per_second=1)
        admission.device_rate.allow(7, 10.1)
        self.assertEqual(admission.current(7, None, 10.2), EndpointDrop.DEVICE_RATE_LIMITED)
        self.assertEqual(admission.current(7, "10.0.0.9", 10.2),
                         EndpointDrop.DEVICE_RATE_LIMITED)
        self.assertIsNone(admission.current(8, None, 10.2))

    def test_stranger_within_and_past_the_budgets(self):
        admission = self.admission(auth_failure_budget=1)
        self.assertIsNone(admission.current(7, "10.0.0.9", 10.1))
        # A stranger's failures do not close the device's own address.
        admission.failed_current(7, "10.0.0.9", 10.1)
        self.assertEqual(admission.current(7, "10.0.0.8", 10.2), EndpointDrop.RATE_LIMITED)
        self.assertIsNone(admission.current(7, None, 10.2))


class SettleTests(SynchronousTestCase):
    """``SessionTable.settle`` with a wake-up the caller read: None is a park check."""

    def test_given_wakeup_is_used_and_none_means_a_park_check(self):
        h = Harness(self, park_after=5.0)
        device = h.provision()
        h.node(device)
        h.run(0.5)
        live = h.endpoint.session_of(device.device_number)
        table, scheduler = h.endpoint.table, h.endpoint.scheduler
        now = h.clock.seconds()
        table.settle(live, now, None)
        self.assertEqual(scheduler.when(device.device_number), now + 5.0)
        table.settle(live, now, now + 1.0)
        self.assertEqual(scheduler.when(device.device_number), now + 1.0)
        table.settle(live, now)
        wakeup = live.session.next_wakeup()
        self.assertEqual(scheduler.when(device.device_number),
                         now + 5.0 if wakeup is None else wakeup)

    def test_table_get(self):
        h = Harness(self)
        device = h.provision()
        h.node(device)
        h.run(0.2)
        self.assertIs(h.endpoint.table.get(device.device_number),
                      h.endpoint.session_of(device.device_number))
        self.assertIsNone(h.endpoint.table.get(device.device_number + 1))

