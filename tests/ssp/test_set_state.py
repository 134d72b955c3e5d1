"""The extension's Sender.set_current_state (speedups.fast_set_state) against the method.

The method keeps one object per equal state (the timers compare states by
identity); the compiled one compares DeviceStates in C where they plainly
differ and asks DeviceState.__eq__ otherwise. Both must pick the same
object and start the same send delay.
"""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import speedups
from broker.ssp.device_state import DeviceState
from broker.ssp.profile import MOSH
from broker.ssp.sender import Sender
from tests.ssp.linksim import TextState

#: Values that are equal in Python but not on the wire (1, 1.0, True), and
#: plainly different ones.
VALUES = st.sampled_from([1, 1.0, True, 2, "a", None])
EVENTS = st.sampled_from([(), ({"kind": "x"},), ({"kind": "x"}, {"kind": "y"})])


@st.composite
def device_states(draw):
    """A DeviceState built afresh (equal ones are not the same object)."""
    state = DeviceState.empty()
    value = draw(VALUES)
    if value is not None:
        state = state.with_values({"v": value})
    for event in draw(EVENTS):
        state = state.with_events(event)
    return state


@st.composite
def senders(draw):
    """Sender fields: a pool of states, the sent list's picks, current's."""
    pool = draw(st.lists(device_states(), min_size=1, max_size=5))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=4))
    current = draw(st.integers(0, len(pool) - 1))
    new = draw(st.one_of(st.integers(0, len(pool) - 1), device_states()))
    clock = draw(st.sampled_from([None, 5.0]))
    now = draw(st.sampled_from([None, 7.0]))
    return pool, picks, current, new, clock, now


def build(pool, picks, current, clock):
    sender = Sender(pool[picks[0]], 0.0, MOSH)
    sent = []
    for number, index in enumerate(picks):
        sent += [float(number), number, pool[index]]
    sender._sent = sent
    sender.current = pool[current]
    sender._mindelay_clock = clock
    return sender


class SetStateTests(SynchronousTestCase):

    def setUp(self):
        if speedups.fast_set_state is None:
            raise self.skipTest(speedups.unavailable_reason or "not built")

    @settings(max_examples=1000, deadline=None)
    @given(senders())
    def test_same_object_and_delay_as_the_method(self, fields):
        """Whatever the kept states (equal ones shared or not, values equal in
        Python but not on the wire, events), the compiled call leaves current
        the same object as the method does, and the same send delay clock."""
        pool, picks, current, new, clock, now = fields
        state = pool[new] if type(new) is int else new
        python, compiled = build(pool, picks, current, clock), build(pool, picks, current, clock)
        python.set_current_state(state, now)
        self.assertIsNone(speedups.fast_set_state(compiled, state, now))

        def which(chosen):
            """The kept object chosen (by identity), the state given, or a
            state subtract() made afresh (each call makes its own)."""
            for index, kept in enumerate(pool):
                if chosen is kept:
                    return index
            return "given" if chosen is state else ("made", repr(chosen))

        self.assertEqual(which(compiled.current), which(python.current))
        self.assertEqual(compiled._mindelay_clock, python._mindelay_clock)

    def test_plainly_different_state_is_taken_as_is(self):
        """A new report's state, unequal to every kept one, becomes current
        and starts the send delay."""
        kept = DeviceState.empty().with_values({"v": 1})
        sender = build([kept], [0], 0, None)
        new = kept.with_values({"v": 2})
        speedups.fast_set_state(sender, new, 3.0)
        self.assertIs(sender.current, new)
        self.assertEqual(sender._mindelay_clock, 3.0)

    def test_wire_difference_is_asked_of_the_method(self):
        """1.0 after 1: equal in Python, not on the wire: a state of its own."""
        kept = DeviceState.empty().with_values({"v": 1})
        sender = build([kept], [0], 0, None)
        new = DeviceState.empty().with_values({"v": 1.0})
        speedups.fast_set_state(sender, new, 3.0)
        self.assertIs(sender.current, new)

    def test_other_state_types_use_the_method(self):
        """States of another class (the tests' TextState) are compared by their ==."""
        sender = Sender(TextState("a"), 0.0, MOSH)
        speedups.fast_set_state(sender, TextState("a"), 1.0)
        self.assertEqual(sender.current, TextState("a"))
        self.assertIsNone(sender._mindelay_clock)
        speedups.fast_set_state(sender, TextState("b"), 1.0)
        self.assertEqual(sender._mindelay_clock, 1.0)
