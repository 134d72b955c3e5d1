"""Tests for broker.udp.limits (token buckets, per-device windows) and broker.udp.presence."""

from twisted.trial.unittest import SynchronousTestCase

from broker.udp.limits import TokenBucket, WindowCounter
from broker.udp.presence import PresenceWheel


class TokenBucketTests(SynchronousTestCase):
    """A global rate limit with time as an argument."""

    def test_burst_then_refuse(self):
        """A full bucket allows burst events at once and refuses the next."""
        bucket = TokenBucket(10, burst=3, now=0.0)
        self.assertEqual([bucket.allow(0.0) for _ in range(4)], [True, True, True, False])

    def test_refills_at_rate(self):
        """Tokens come back at rate per second, never above the burst."""
        bucket = TokenBucket(10, burst=2, now=0.0)
        bucket.allow(0.0)
        bucket.allow(0.0)
        self.assertFalse(bucket.allow(0.05))
        self.assertTrue(bucket.allow(0.1))
        self.assertEqual([bucket.allow(100.0) for _ in range(3)], [True, True, False])

    def test_rate_must_be_positive(self):
        """A zero rate is refused at construction."""
        self.assertRaises(ValueError, TokenBucket, 0)


class WindowCounterTests(SynchronousTestCase):
    """Per-key counts in one-second windows."""

    def test_limit_per_key(self):
        """Each key gets limit events per window, independently of the others."""
        counter = WindowCounter(2)
        self.assertEqual([counter.allow("a", 5.1) for _ in range(3)], [True, True, False])
        self.assertTrue(counter.allow("b", 5.2))
        self.assertTrue(counter.exhausted("a", 5.3))
        self.assertFalse(counter.exhausted("b", 5.3))

    def test_window_turns(self):
        """A new second starts every key afresh and forgets the old table."""
        counter = WindowCounter(1)
        counter.allow("a", 1.5)
        self.assertFalse(counter.allow("a", 1.9))
        self.assertTrue(counter.allow("a", 2.0))
        self.assertEqual(len(counter), 1)
        self.assertFalse(counter.exhausted("a", 3.0))


class PresenceWheelTests(SynchronousTestCase):
    """Offline detection without a timer per device."""

    def test_due_at_the_deadline(self):
        """A device added at heard=t comes due at t + offline_after, not before."""
        wheel = PresenceWheel(10.0)
        slot = wheel.add(7, 0.5)
        self.assertEqual(slot, 11)
        self.assertEqual(wheel.next_due(), 11.0)
        self.assertEqual(wheel.due(10.9), [])
        self.assertEqual(wheel.due(11.0), [(11, 7)])
        self.assertIsNone(wheel.next_due())

    def test_buckets_group_devices(self):
        """Devices with deadlines in the same second share one bucket, returned together."""
        wheel = PresenceWheel(5.0)
        for number in range(100):
            wheel.add(number, 1.001 + number / 1000)
        wheel.add(500, 3.0)
        self.assertEqual(len(wheel._buckets), 2)
        self.assertEqual(len(wheel.due(7.0)), 100)
        self.assertEqual(wheel.due(8.0), [(8, 500)])

    def test_slots_share_int_objects(self):
        """Every device in one bucket gets the very same slot object (no int per device)."""
        wheel = PresenceWheel(100.0)
        slots = [wheel.add(number, 1000.25) for number in range(3)]
        self.assertTrue(slots[0] is slots[1] is slots[2])

    def test_offline_after_must_be_positive(self):
        """A zero offline_after is refused."""
        self.assertRaises(ValueError, PresenceWheel, 0)
