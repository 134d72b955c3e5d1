"""broker.deadlines.DeadlineQueue and its compiled twin: the same answers, the same heap."""

import gc
import sys
import weakref

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.deadlines import DeadlineQueue
from broker.ssp.speedups import CompiledDeadlineQueue

QUEUES = [DeadlineQueue] + ([CompiledDeadlineQueue] if CompiledDeadlineQueue else [])

#: Few keys and few distinct times, so that ties, supersessions, postponements
#: and compactions (min_compact 4) all happen.
TIMES = st.sampled_from([0.0, 0.5, 1.0, 1.0000001, 2.0, 3.5, 7.0, 10.0])
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("schedule"), st.integers(0, 7), TIMES),
    st.tuples(st.just("cancel"), st.integers(0, 7), st.just(0.0)),
    st.tuples(st.just("earliest"), st.just(0), st.just(0.0)),
    # pop_due at limit, bounded by the counter minus 0-3 (entries pushed "meanwhile")
    st.tuples(st.just("pop"), st.integers(0, 3), TIMES),
), max_size=80)


class TwinTests(SynchronousTestCase):
    """The compiled DeadlineQueue against the Python reference."""

    def setUp(self):
        if CompiledDeadlineQueue is None:
            raise self.skipTest("broker.ssp._speedups is not built")

    @settings(max_examples=500, deadline=None)
    @given(OPERATIONS)
    def test_same_answers_under_random_operations(self, operations):
        """Every answer (schedule's push, when, earliest, the keys pop_due gives,
        len, keys in order, the heap's size and the counter) is the same after
        each operation."""
        python, compiled = DeadlineQueue(4), CompiledDeadlineQueue(4)
        for operation, key, value in operations:
            answers = []
            for queue in (python, compiled):
                if operation == "schedule":
                    answers.append(queue.schedule(key, value))
                elif operation == "cancel":
                    answers.append(queue.cancel(key))
                elif operation == "earliest":
                    answers.append(queue.earliest())
                else:
                    newest = max(0, queue.counter - key)
                    popped = []
                    while (due := queue.pop_due(value, newest)) is not None:
                        popped.append(due)
                    answers.append(popped)
                answers.append((len(queue), queue.keys(), [queue.when(k) for k in range(8)],
                                [k in queue for k in range(8)], queue.heap_size(),
                                queue.counter))
            self.assertEqual(answers[:2], answers[2:], operation)


class QueueTests(SynchronousTestCase):
    """What both queues promise (each test runs on each)."""

    def each(self):
        for cls in QUEUES:
            yield cls(4)

    def test_none_is_not_a_key(self):
        """A key of None is refused: pop_due's None means 'nothing due'."""
        for queue in self.each():
            self.assertRaises(TypeError, queue.schedule, None, 1.0)
            self.assertEqual(len(queue), 0)

    def test_int_times(self):
        """A time may be an int; it compares with floats as Python's numbers do."""
        for queue in self.each():
            queue.schedule("a", 5)
            queue.schedule("b", 4.5)
            self.assertEqual(queue.when("a"), 5)
            self.assertEqual(queue.earliest(), 4.5)
            self.assertEqual(queue.pop_due(5, queue.counter), "b")
            self.assertEqual(queue.pop_due(5, queue.counter), "a")
            self.assertIsNone(queue.pop_due(5, queue.counter))

    def test_postponed_key_is_put_back(self):
        """A key due by its heap entry but postponed since comes back at its new time."""
        for queue in self.each():
            queue.schedule("a", 1.0)
            queue.schedule("a", 3.0)       # later: no new entry
            self.assertEqual(queue.heap_size(), 1)
            self.assertIsNone(queue.pop_due(2.0, queue.counter))
            self.assertEqual(queue.heap_size(), 1)
            self.assertEqual(queue.earliest(), 3.0)
            self.assertEqual(queue.pop_due(3.0, queue.counter), "a")

    def test_entries_pushed_after_newest_wait(self):
        """pop_due stops at an entry numbered after ``newest`` (pushed while the
        due keys run): it and what comes after it wait for a later call."""
        for queue in self.each():
            queue.schedule("a", 1.0)
            newest = queue.counter
            queue.schedule("b", 0.5)
            self.assertIsNone(queue.pop_due(2.0, newest))
            self.assertEqual(len(queue), 2)
            self.assertEqual(queue.pop_due(2.0, queue.counter), "b")
            self.assertEqual(queue.pop_due(2.0, queue.counter), "a")

    def test_cancelled_keys_are_released(self):
        """Cancelled keys behind a live one are freed once stale entries outnumber
        live ones (compaction), not kept until their time."""
        class Key:
            pass

        for queue in self.each():
            queue.schedule("live", 1.0)
            refs = []
            for i in range(40):
                key = Key()
                refs.append(weakref.ref(key))
                queue.schedule(key, 5.0 + i)
                queue.cancel(key)
            del key
            self.assertLessEqual(queue.heap_size(), 5)
            self.assertLessEqual(sum(ref() is not None for ref in refs), 4)
            self.assertEqual(queue.keys(), ["live"])


class CompiledQueueTests(SynchronousTestCase):
    """Memory: the compiled queue's references."""

    def setUp(self):
        if CompiledDeadlineQueue is None:
            raise self.skipTest("broker.ssp._speedups is not built")

    def test_no_reference_leaks(self):
        """Keys scheduled, superseded, postponed, popped and cancelled many times
        hold no reference afterwards."""
        key = object()
        before = sys.getrefcount(key)
        queue = CompiledDeadlineQueue(4)
        for i in range(1000):
            queue.schedule(key, float(i % 7))
            queue.schedule(key, float(i % 5))
            queue.schedule(key, float(i % 11))
            if i % 3 == 0:
                queue.cancel(key)
            queue.earliest()
            queue.pop_due(float(i % 6), queue.counter)
        queue.cancel(key)
        del queue
        self.assertEqual(sys.getrefcount(key), before)

    def test_cycle_through_a_key_is_collected(self):
        """A key that refers to its queue (a waiter holding its room) does not keep
        both alive: the collector sees the queue's references."""
        class Waiter:
            pass

        queue = CompiledDeadlineQueue()
        waiter = Waiter()
        waiter.queue = queue
        queue.schedule(waiter, 1.0)
        ref = weakref.ref(waiter)
        del waiter, queue
        gc.collect()
        self.assertIsNone(ref())
