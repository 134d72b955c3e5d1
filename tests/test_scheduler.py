"""Tests for broker.scheduler: one reactor timer for the whole broker."""

import gc
import weakref

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broker import scheduler as scheduler_module
from broker.deadlines import DeadlineQueue
from broker.scheduler import COALESCE, MIN_COMPACT, WakeupScheduler


class WakeupSchedulerTests(SynchronousTestCase):
    """The heap of wake-up times behind a single IDelayedCall (the compiled
    DeadlineQueue where it is built: PureWakeupSchedulerTests runs the
    Python one)."""

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
        self.assertLessEqual(self.scheduler.heap_size(), MIN_COMPACT + 2)
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
        self.assertEqual(self.scheduler.heap_size(), 1)
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

    def test_cancelled_keys_are_not_kept_until_their_time(self):
        """Keys cancelled behind a live earlier wake-up (answered long polls, retired
        sessions) are released: the heap stays bounded and the key objects are freed."""
        class Key:
            pass

        self.scheduler.schedule("live", 1.0)
        refs = []
        for i in range(3 * MIN_COMPACT):
            key = Key()
            refs.append(weakref.ref(key))
            self.scheduler.schedule(key, 30.0 + i / 1e6)
            self.scheduler.cancel(key)
        del key
        gc.collect()
        self.assertLessEqual(self.scheduler.heap_size(), MIN_COMPACT + 2)
        self.assertLessEqual(sum(ref() is not None for ref in refs), MIN_COMPACT + 1)
        self.clock.advance(100.0)
        self.assertEqual([key for key, _ in self.calls], ["live"])

    def test_compaction_while_running_runs_each_due_key_once(self):
        """A callback that cancels and churns enough keys to compact the heap mid-run:
        every due key not cancelled still runs exactly once, no cancelled one runs."""
        ran = []
        keys = range(3 * MIN_COMPACT)

        def callback(key, now):
            ran.append(key)
            if key == 0:
                for other in range(1, len(keys), 2):
                    scheduler.cancel(other)
                for other in range(3 * MIN_COMPACT, 6 * MIN_COMPACT):
                    scheduler.schedule(other, now)
                    scheduler.cancel(other)

        scheduler = WakeupScheduler(self.clock, callback)
        for key in keys:
            scheduler.schedule(key, 1.0)
        self.clock.advance(1.0)
        for _ in range(3):
            self.clock.advance(0)
        self.assertEqual(sorted(ran), [key for key in keys if key % 2 == 0])
        self.assertEqual(len(scheduler), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PureWakeupSchedulerTests(WakeupSchedulerTests):
    """The same, on broker.deadlines' Python DeadlineQueue."""

    def setUp(self):
        self.patch(scheduler_module, "CompiledDeadlineQueue", None)
        super().setUp()

    def test_python_queue(self):
        """These tests run on the Python queue."""
        self.assertIsInstance(self.scheduler._queue, DeadlineQueue)


#: Operations on a scheduler: schedule key at now + offset, cancel key, advance the
#: clock, or have key's next callback reschedule it at its now + offset.
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("schedule"), st.integers(0, 9), st.floats(-2.0, 20.0)),
    st.tuples(st.just("cancel"), st.integers(0, 9), st.just(0.0)),
    st.tuples(st.just("advance"), st.just(0), st.floats(0.0, 5.0)),
    st.tuples(st.just("again"), st.integers(0, 9), st.floats(-1.0, 3.0)),
), max_size=60)


class WakeupSchedulerModelTests(SynchronousTestCase):
    """The scheduler against a plain dict of wake-up times, under random operations."""

    @settings(max_examples=300, deadline=None)
    @given(OPERATIONS)
    def test_one_timer_armed_whenever_a_key_waits(self, operations):
        """After any mix of schedule, cancel, clock advances and callbacks rescheduling
        themselves (with compaction made frequent): exactly one reactor timer is armed,
        no later than the earliest wake-up, whenever a key waits, none otherwise; each
        key fires once per wake-up, never early, and nothing is left at the end."""
        self.check_model(operations)

    @settings(max_examples=300, deadline=None)
    @given(OPERATIONS)
    def test_one_timer_armed_whenever_a_key_waits_python_queue(self, operations):
        """The same on broker.deadlines' Python DeadlineQueue."""
        compiled = scheduler_module.CompiledDeadlineQueue
        scheduler_module.CompiledDeadlineQueue = None
        try:
            self.check_model(operations)
        finally:
            scheduler_module.CompiledDeadlineQueue = compiled

    def check_model(self, operations):
        self.patch(scheduler_module, "MIN_COMPACT", 8)
        clock = Clock()
        model = {}
        again = {}

        def callback(key, now):
            self.assertIn(key, model)
            self.assertGreaterEqual(now, model.pop(key) - COALESCE - 1e-9)
            if key in again:
                model[key] = now + again.pop(key)
                scheduler.schedule(key, model[key])

        scheduler = WakeupScheduler(clock, callback)

        def settle():
            while any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
                clock.advance(0)

        for operation, key, value in operations:
            if operation == "schedule":
                model[key] = clock.seconds() + value
                scheduler.schedule(key, model[key])
            elif operation == "cancel":
                model.pop(key, None)
                scheduler.cancel(key)
            elif operation == "again":
                again[key] = value
            else:
                clock.advance(value)
                settle()
            calls = clock.getDelayedCalls()
            self.assertLessEqual(len(calls), 1)
            if model:
                self.assertEqual(len(calls), 1)
                earliest = max(min(model.values()), clock.seconds())
                self.assertLessEqual(calls[0].getTime(), earliest + COALESCE + 1e-9)
            self.assertEqual(set(scheduler.keys()), set(model))
        again.clear()
        clock.advance(100.0)
        settle()
        self.assertEqual(model, {})
        self.assertEqual(clock.getDelayedCalls(), [])

