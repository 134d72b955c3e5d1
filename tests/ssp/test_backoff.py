"""The fleet profile's retransmission backoff (sender.py), in virtual time.

mosh's timers resend every second (and at the frame rate once two
unacknowledged states are old) for as long as the peer is heard; a broker
behind a queue of seconds keeps answering, late, so every waiting device
keeps adding copies to the queue it waits behind. The fleet profile backs
off: the overload runs show both. Backing off must not cost liveness: a
lost state among a stream of new ones is repaired as fast as mosh does.
"""

import dataclasses
import math

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.profile import FLEET
from tests.ssp.linksim import Link, broker_pair
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
        device's newest state about a minute after the load ended."""
        result = run_overload(FLEET, **BEHIND)
        self.assertEqual(result.reports, 2400)
        self.assertLess(result.datagrams_per_report, 2.0)
        self.assertEqual(result.dropped, 0)
        self.assertIsNotNone(result.caught_up)
        self.assertLess(result.caught_up, 130.0)  # 119.6 s in this seeded run

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


class _DroppingLink(Link):
    """A link that loses the n-th datagram towards one side, and only that one."""

    def __init__(self, *args, towards, nth, **kwargs):
        super().__init__(*args, **kwargs)
        self.towards, self.nth, self.count = towards, nth, 0

    def _post(self, now, target, data, source):
        if target is self.towards:
            self.count += 1
            if self.count == self.nth:
                self.sent += 1
                return
        super()._post(now, target, data, source)


def longest_behind(profile, *, from_device, interval, one_way, nth, until=30.0,
                   end=60.0):
    """(events sent, events the receiver has at the end, longest time it was
    more than two events behind) for a stream of 150-byte events from one
    side, one of its datagrams lost; the other side reports now and then."""
    device, broker = broker_pair(0.0, profile=profile)
    sender, receiver = (device, broker) if from_device else (broker, device)
    link = _DroppingLink(device, broker, towards=receiver, nth=nth,
                         delay=(one_way, one_way))
    now, sent, next_event, next_report = 0.0, 0, 0.5, 0.2
    behind_since, longest = None, 0.0
    while now < end:
        now = link.run_until(min(next_event, next_report, end), now)
        if now >= next_event:
            sent += 1
            state = sender.local_state.with_events({"n": sent, "pad": "x" * 150})
            sender.set_local_state(state, now)
            next_event = now + interval if now + interval < until else math.inf
        if now >= next_report:
            other = broker if from_device else device
            other.set_local_state(other.local_state.with_values({"t": now}), now)
            next_report = now + 5.0
        have = receiver.latest_remote_state.event_end
        if sent - have > 2:
            behind_since = now if behind_since is None else behind_since
            longest = max(longest, now - behind_since)
        else:
            behind_since = None
    return sent, receiver.latest_remote_state.event_end, longest


class LostStateTests(SynchronousTestCase):
    """A lost state whose successors keep coming is resent from the acknowledged one."""

    def test_device_stream_recovers_from_a_lost_datagram(self):
        """Events every 0.3 s over a 300 ms path, one datagram lost: the broker is never
        more than two events behind for over 2 s, and ends with all of them."""
        sent, have, longest = longest_behind(FLEET, from_device=True, interval=0.3,
                                             one_way=0.3, nth=20)
        self.assertEqual(have, sent)
        self.assertLess(longest, 2.0)

    def test_broker_commands_recover_from_a_lost_datagram(self):
        """The same for commands from the broker (every 0.5 s), one broker datagram lost:
        the device, still acknowledged for its own reports, is not left waiting."""
        sent, have, longest = longest_behind(FLEET, from_device=False, interval=0.5,
                                             one_way=0.3, nth=12)
        self.assertEqual(have, sent)
        self.assertLess(longest, 2.0)
