"""Tests for broker.scheduler: one reactor timer for the whole broker."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broker.scheduler import MIN_COMPACT, WakeupScheduler


class WakeupSchedulerTests(SynchronousTestCase):
    """The heap of wake-up times behind a single IDelayedCall."""

    def setUp(self):
        self.clock = Clock()
        self.calls = []
        self.scheduler = WakeupScheduler(self.clock, lambda key, now: self.calls.append((key, now)))

    def test_fires_at_the_time_given(self):
        """A key scheduled at t is called back once the clock reaches t, not before."""
        self.scheduler.schedule("a", 5.0)
        self.clock.advance(4.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [("a", 5.0)])

    def test_one_reactor_timer_for_many_keys(self):
        """Ten thousand scheduled keys use exactly one delayed call of the reactor."""
        for key in range(10_000):
            self.scheduler.schedule(key, 10.0 + key / 1000)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.scheduler), 10_000)

    def test_fires_in_time_order(self):
        """Keys come due in the order of their times, whatever the order they were scheduled in."""
        self.scheduler.schedule("late", 3.0)
        self.scheduler.schedule("early", 1.0)
        self.scheduler.schedule("middle", 2.0)
        self.clock.advance(3.0)
        # One advance runs the timer once; each fire re-arms for the next due key.
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual([key for key, _ in self.calls], ["early", "middle", "late"])

    def test_reschedule_replaces_the_earlier_time(self):
        """Scheduling a key again supersedes its earlier wake-up: it fires once, at the new time."""
        self.scheduler.schedule("a", 1.0)
        self.scheduler.schedule("a", 2.0)
        self.clock.advance(1.5)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.5)
        self.assertEqual(self.calls, [("a", 2.0)])

    def test_earlier_time_moves_the_timer(self):
        """A wake-up earlier than the armed one brings the reactor timer forward."""
        self.scheduler.schedule("a", 10.0)
        self.scheduler.schedule("b", 1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.calls, [("b", 1.0)])

    def test_none_and_cancel_forget_a_key(self):
        """Scheduling None or cancelling means the key is never called back."""
        self.scheduler.schedule("a", 1.0)
        self.scheduler.schedule("b", 1.0)
        self.scheduler.schedule("a", None)
        self.scheduler.cancel("b")
        self.clock.advance(5.0)
        self.assertEqual(self.calls, [])
        self.assertEqual(len(self.scheduler), 0)

    def test_no_timer_without_wakeups(self):
        """With nothing scheduled (idle sessions), no reactor timer is left armed."""
        self.scheduler.schedule("a", 1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_callback_does_not_stop_the_others(self):
        """An exception from one key's callback is logged and the other due keys still run."""
        ran = []

        def callback(key, now):
            ran.append(key)
            if key == "bad":
                raise RuntimeError("boom")

        scheduler = WakeupScheduler(self.clock, callback)
        scheduler.schedule("bad", 1.0)
        scheduler.schedule("good", 1.0)
        self.clock.advance(1.0)
        self.assertEqual(sorted(ran), ["bad", "good"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_callback_may_reschedule_itself(self):
        """A key rescheduled from inside its own callback fires again at the new time."""
        def callback(key, now):
            self.calls.append(now)
            if len(self.calls) < 3:
                scheduler.schedule(key, now + 1.0)

        scheduler = WakeupScheduler(self.clock, callback)
        scheduler.schedule("a", 1.0)
        for _ in range(5):
            self.clock.advance(1.0)
        self.assertEqual(self.calls, [1.0, 2.0, 3.0])

    def test_stale_entries_are_compacted(self):
        """Bringing one key's wake-up forward over and over keeps the heap bounded."""
        for i in range(3 * MIN_COMPACT):
            self.scheduler.schedule("a", 100_000.0 - i)
        self.assertLessEqual(len(self.scheduler._heap), MIN_COMPACT + 2)
        earliest = 100_000.0 - (3 * MIN_COMPACT - 1)
        self.clock.advance(earliest - 0.5)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.5)
        self.clock.advance(100_000.0)
        self.assertEqual(self.calls, [("a", earliest)])

    def test_postponing_pushes_nothing(self):
        """Moving a wake-up later adds no heap entry; the key still fires once, at the later time."""
        self.scheduler.schedule("a", 1.0)
        for i in range(100):
            self.scheduler.schedule("a", 2.0 + i / 100)
        self.assertEqual(len(self.scheduler._heap), 1)
        self.clock.advance(2.98)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.02)
        self.clock.advance(5.0)
        self.assertEqual([key for key, _ in self.calls], ["a"])
        self.assertAlmostEqual(self.calls[0][1], 3.0)

    def test_stop_cancels_the_timer(self):
        """After stop() the reactor holds no timer of the scheduler."""
        self.scheduler.schedule("a", 1.0)
        self.scheduler.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_separate_time_source(self):
        """Wake-up times are on the given now() clock, the delay computed against it."""
        offset = 1000.0
        scheduler = WakeupScheduler(self.clock, lambda key, now: self.calls.append((key, now)),
                                    now=lambda: self.clock.seconds() + offset)
        scheduler.schedule("a", offset + 2.0)
        self.clock.advance(2.0)
        self.assertEqual(self.calls, [("a", offset + 2.0)])

    def test_nothing_arms_after_stop(self):
        """Once stopped, later schedule() calls leave no timer in the reactor."""
        self.scheduler.stop()
        self.scheduler.schedule("a", 1.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
