"""Tests for broker.ssp.receiver: mosh's Transport::recv rules."""

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.device_state import DeviceState
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.instruction import UINT64_MAX, Instruction
from broker.ssp.profile import MOSH
from broker.ssp.receiver import UNCHANGED, Receiver, ResumedReceiver

from tests.ssp.linksim import TextState

T0 = 50.0


def inst(old, new, diff=b"", throwaway=0):
    return Instruction(old_num=old, new_num=new, throwaway_num=throwaway,
                       diff=diff)


class ReceiverTests(SynchronousTestCase):
    """The receiving half of SSP."""

    def setUp(self):
        self.receiver = Receiver(TextState.empty())

    def receive(self, instruction, now=T0, profile=MOSH):
        return self.receiver.receive(instruction, now, profile)

    def assertDropped(self, reason, instruction, now=T0, profile=MOSH):
        before = (self.receiver.nums, self.receiver.newest_state)
        error = self.assertRaises(DatagramDropped, self.receive, instruction,
                                  now, profile)
        self.assertEqual(error.reason, reason)
        self.assertEqual((self.receiver.nums, self.receiver.newest_state),
                         before)

    def test_in_order_state_becomes_newest(self):
        """A diff from a held state with a higher number is the new newest."""
        state = self.receive(inst(0, 1, b"=a"))
        self.assertEqual(state, TextState("a"))
        self.assertEqual(self.receiver.newest_num, 1)
        self.assertEqual(self.receiver.nums, [0, 1])

    def test_empty_diff_copies_the_reference(self):
        """An empty diff from the newest (an empty ack) makes a new number
        for the same state, sharing the object, and reports UNCHANGED."""
        first = self.receive(inst(0, 1, b"=a"))
        self.assertIs(self.receive(inst(1, 2)), UNCHANGED)
        self.assertEqual(self.receiver.newest_num, 2)
        self.assertIs(self.receiver.newest_state, first)

    def test_empty_diff_from_older_state_is_a_change(self):
        """An empty diff from a state other than the newest goes back to
        that state: a change, not UNCHANGED."""
        self.receive(inst(0, 1, b"=a"))
        self.assertEqual(self.receive(inst(0, 2)), TextState(""))

    def test_same_state_from_an_older_one_is_unchanged(self):
        """An empty diff from an older state equal to the newest (the peer
        set a value back and sends from its acknowledged state) is
        UNCHANGED and shares the newest object: nothing new to report or
        make durable."""
        newest = self.receive(inst(0, 1, b"=a"))
        self.receive(inst(1, 2, b"=b"))
        again = self.receive(inst(1, 3, b"=a"))  # back to "a"
        self.assertEqual(again, newest)
        self.assertIs(self.receive(inst(1, 4)), UNCHANGED)  # empty, from 1
        self.assertIs(self.receiver.newest_state, again)
        self.assertEqual(self.receive(inst(2, 5)), TextState("b"))

    def test_duplicate_is_ignored(self):
        """A state number already held is ignored, whatever its diff."""
        self.receive(inst(0, 1, b"=a"))
        self.assertIsNone(self.receive(inst(0, 1, b"=zzz")))
        self.assertEqual(self.receiver.newest_state, TextState("a"))
        self.assertEqual(self.receiver.nums, [0, 1])

    def test_unknown_reference_dropped(self):
        """A diff from a state we do not hold is refused."""
        self.assertDropped(DropReason.UNKNOWN_REFERENCE, inst(3, 4, b"=x"))

    def test_throwaway_prunes_after_taking_the_reference(self):
        """States below throwaway_num are dropped, and the reference is
        taken before, so [1=>3] with throwaway 2 still applies to 1."""
        self.receive(inst(0, 1, b"=a"))
        self.receive(inst(1, 2, b"=b"))
        state = self.receive(inst(1, 3, b"=c", throwaway=2))
        self.assertEqual(state, TextState("c"))
        self.assertEqual(self.receiver.nums, [2, 3])

    def test_throwaway_above_everything_is_dropped(self):
        """A throwaway number above every held state (mosh aborts) is
        refused and nothing changes."""
        self.receive(inst(0, 1, b"=a"))
        self.assertDropped(DropReason.BAD_THROWAWAY,
                           inst(1, 9, b"=x", throwaway=5))

    def test_out_of_order_state_is_kept_not_newest(self):
        """An older state arriving late is inserted in order but does not
        become newest; a later diff may reference it."""
        self.receive(inst(0, 1, b"=a"))
        self.receive(inst(1, 3, b"=c"))
        self.assertIsNone(self.receive(inst(1, 2, b"=b")))
        self.assertEqual(self.receiver.nums, [0, 1, 2, 3])
        self.assertEqual(self.receiver.newest_num, 3)
        state = self.receive(inst(2, 4, b"=d"))
        self.assertEqual(state, TextState("d"))

    def test_queue_cap_quench(self):
        """Above the cap, states are refused during the quench time; one is
        let in when it is over."""
        profile = dataclasses.replace(MOSH, received_states_cap=3)
        for n in range(1, 4):
            self.receive(inst(0, n, b"=%d" % n), profile=profile)
        self.assertEqual(self.receiver.count, 4)
        # The first one over the cap is accepted and starts the quench.
        self.receive(inst(0, 4, b"=4"), T0, profile)
        self.assertDropped(DropReason.QUEUE_FULL, inst(0, 5, b"=5"),
                           T0 + 1, profile)
        self.assertDropped(DropReason.QUEUE_FULL, inst(0, 5, b"=5"),
                           T0 + profile.quench_time - 0.001, profile)
        state = self.receive(inst(0, 5, b"=5"), T0 + profile.quench_time,
                             profile)
        self.assertEqual(state, TextState("5"))

    def test_bad_diff_changes_nothing(self):
        """A diff the state refuses is dropped as BAD_DIFF, before any
        pruning."""
        self.receive(inst(0, 1, b"=a"))
        self.assertDropped(DropReason.BAD_DIFF,
                           inst(1, 2, b"not a text diff", throwaway=1))

    def test_value_error_from_state_becomes_bad_diff(self):
        """A state type raising ValueError on apply still cannot crash us."""

        class Brittle(TextState):
            """A state whose apply breaks the contract."""

            def apply(self, diff):
                raise ValueError("brittle")

        self.receiver = Receiver(Brittle(""))
        self.assertDropped(DropReason.BAD_DIFF, inst(0, 1, b"=a"))

    def test_zero_always_means_empty_with_broker_framing(self):
        """With the broker framing, old_num 0 applies to the empty state
        even after state 0 was thrown away."""
        empty = DeviceState.empty()
        self.receiver = Receiver(empty, zero=empty)
        self.receive(inst(0, 1, empty.with_values({"a": 1}).diff_from(empty)))
        self.receive(inst(1, 2, b"", throwaway=1))
        self.assertEqual(self.receiver.nums, [1, 2])
        full = empty.with_values({"b": 2})
        state = self.receive(inst(0, 7, full.diff_from(empty), throwaway=2))
        self.assertEqual(state, full)

    def test_zero_unknown_without_framing(self):
        """Plain mosh: once state 0 is thrown away, old_num 0 is unknown."""
        self.receive(inst(0, 1, b"=a"))
        self.receive(inst(1, 2, b"=b", throwaway=1))
        self.assertDropped(DropReason.UNKNOWN_REFERENCE, inst(0, 3, b"=c"))

    def test_shutdown_state(self):
        """The peer's shutdown state UINT64_MAX is accepted as newest."""
        self.receive(inst(0, 1, b"=a"))
        self.assertIs(self.receive(inst(1, UINT64_MAX, b"")), UNCHANGED)
        self.assertEqual(self.receiver.newest_num, UINT64_MAX)
        self.assertEqual(self.receiver.newest_state, TextState("a"))

    def test_rationalize_forgets_acknowledged_events(self):
        """After pruning, every held state forgets the events of the oldest
        one, keeping absolute event indexes."""
        empty = DeviceState.empty()
        self.receiver = Receiver(empty)
        one = empty.with_events("a", "b")
        two = one.with_events("c")
        self.receive(inst(0, 1, one.diff_from(empty)))
        state = self.receive(inst(1, 2, two.diff_from(one), throwaway=1))
        self.assertEqual(state.events, ("c",))
        self.assertEqual(state.event_base, 2)
        self.assertEqual(self.receiver.nums, [1, 2])

    def test_zero_reference_may_throw_everything_away(self):
        """A full resend from state 0 whose throwaway is above every held
        state (a sender whose front we lost) becomes the only state."""
        empty = DeviceState.empty()
        self.receiver = Receiver(empty, 5, zero=empty)
        full = empty.with_values({"a": 1})
        state = self.receive(inst(0, 9, full.diff_from(empty), throwaway=7))
        self.assertEqual(state, full)
        self.assertEqual(self.receiver.nums, [9])


class ResumedReceiverTests(SynchronousTestCase):
    """Diffs from states acknowledged (as unchanged) before a restart."""

    def setUp(self):
        self.receiver = ResumedReceiver(TextState("a"), 1)

    def receive(self, instruction):
        return self.receiver.receive(instruction, T0, MOSH)

    def test_front_above_persisted_state_is_aliased(self):
        """old_num = throwaway_num above the persisted number applies to
        the persisted state, also for later diffs from the same front."""
        self.assertEqual(self.receive(inst(3, 4, b"=b", throwaway=3)),
                         TextState("b"))
        self.assertEqual(self.receiver.nums, [4])
        self.assertEqual(self.receive(inst(3, 5, b"=c", throwaway=3)),
                         TextState("c"))
        self.assertEqual(self.receiver.nums, [4, 5])

    def test_alias_needs_the_throwaway(self):
        """A diff from an unknown state that is not the sender's
        acknowledged front is still refused."""
        error = self.assertRaises(DatagramDropped, self.receive,
                                  inst(3, 4, b"=b", throwaway=2))
        self.assertEqual(error.reason, DropReason.UNKNOWN_REFERENCE)

    def test_no_alias_above_first_accepted_state(self):
        """Numbers from the first state accepted after the restart on are
        states we held ourselves: no alias for them."""
        self.receive(inst(3, 4, b"=b", throwaway=3))
        error = self.assertRaises(DatagramDropped, self.receive,
                                  inst(6, 7, b"=x", throwaway=6))
        self.assertEqual(error.reason, DropReason.UNKNOWN_REFERENCE)

    def test_no_alias_below_persisted_state(self):
        """A front at or below the persisted number is not aliased."""
        self.receiver = ResumedReceiver(TextState("a"), 5)
        error = self.assertRaises(DatagramDropped, self.receive,
                                  inst(3, 6, b"=b", throwaway=3))
        self.assertEqual(error.reason, DropReason.UNKNOWN_REFERENCE)
