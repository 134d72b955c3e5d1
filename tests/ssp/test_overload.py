"""A fleet against a broker that falls behind: retransmissions back off.

mosh's timers resend every second (and at the frame rate once two
unacknowledged states are old) for as long as the peer is heard; a broker
behind a queue of seconds keeps answering, late, so every waiting device
keeps adding copies to the queue it waits behind. The fleet profile backs
off (sender.py); these runs, in virtual time, show both.
"""

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.profile import FLEET
from tests.ssp.overload import run_overload

WITHOUT_BACKOFF = dataclasses.replace(FLEET, retransmit_backoff=False)

# 60 devices, a report each every 1.5 s for a minute: 40 a second offered
# to a broker that serves 30, behind a receive queue of 4,000 (over two
# minutes of work, as a large SO_RCVBUF holds).
BEHIND = dict(devices=60, capacity=30.0, queue=4000, report_interval=1.5,
              load_until=60.0, end=180.0)


class OverloadTests(SynchronousTestCase):

    def test_fleet_backs_off_and_the_broker_catches_up(self):
        """With the fleet profile the devices add about half a datagram per
        report, nothing overflows the queue, and the broker has every
        device's newest state within a minute of the load ending."""
        result = run_overload(FLEET, **BEHIND)
        self.assertEqual(result.reports, 2400)
        self.assertLess(result.datagrams_per_report, 2.0)
        self.assertEqual(result.dropped, 0)
        self.assertIsNotNone(result.caught_up)
        self.assertLess(result.caught_up, 120.0)

    def test_without_backoff_the_copies_never_drain(self):
        """The same fleet on mosh's timing: copies fill the queue, most are
        lost, and two minutes after the load ended the broker is still
        behind (the scenario above is one that needs the backoff)."""
        result = run_overload(WITHOUT_BACKOFF, **BEHIND)
        self.assertGreater(result.datagrams_per_report, 4.0)
        self.assertGreater(result.dropped, result.reports)
        self.assertIsNone(result.caught_up)

    def test_a_broker_with_room_sees_one_datagram_per_report(self):
        """No queue, no loss: the backoff never starts, every report is one
        datagram, and the broker is level at once when the load ends."""
        result = run_overload(FLEET, **dict(BEHIND, capacity=60.0))
        self.assertEqual(result.dropped, 0)
        self.assertAlmostEqual(result.datagrams_per_report, 1.0, delta=0.01)
        self.assertLess(result.caught_up, 61.0)
