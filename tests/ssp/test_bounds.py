"""Tests for broker.ssp.bounds: what one received device state may hold."""

import dataclasses

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.bounds import (BROKER_RECEIVED_STATES, MAX_HELD_EVENTS,
                               StateBounds)
from broker.ssp.device_state import DeviceState
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.instruction import Instruction
from broker.ssp.profile import FLEET, MOSH
from broker.ssp.receiver import Receiver

T0 = 50.0
#: Small bounds, so that tests stay small.
SMALL = StateBounds(max_diff_bytes=4096, max_events=10, max_event_bytes=200,
                    max_values=5)
BOUNDED = dataclasses.replace(FLEET, state_bounds=SMALL)


def inst(old, new, diff=b"", throwaway=0):
    return Instruction(old_num=old, new_num=new, throwaway_num=throwaway,
                       diff=diff)


def events_diff(first, events):
    """A diff appending ``events`` at index ``first``."""
    return b"\xa2\x01" + cbor2.dumps(first) + b"\x02" + cbor2.dumps(events)


def values_diff(values):
    return b"\xa1\x00" + cbor2.dumps(values)


class StateBoundsTests(SynchronousTestCase):
    """A bounded receiver refuses states that would hold too much."""

    def setUp(self):
        self.receiver = Receiver(DeviceState.empty(), zero=DeviceState.empty())

    def receive(self, instruction, profile=BOUNDED):
        return self.receiver.receive(instruction, T0, profile)

    def assertDropped(self, reason, instruction, profile=BOUNDED):
        before = (self.receiver.nums, self.receiver.newest_state)
        error = self.assertRaises(DatagramDropped, self.receive, instruction,
                                  profile)
        self.assertEqual(error.reason, reason)
        self.assertEqual((self.receiver.nums, self.receiver.newest_state),
                         before)

    def test_too_many_events_in_one_diff_are_refused(self):
        """A diff carrying more events than the bound is dropped as
        events_over_limit and the receiver keeps what it held."""
        self.assertDropped(DropReason.EVENTS_OVER_LIMIT,
                           inst(0, 1, events_diff(0, [0] * 11)))
        self.assertEqual(self.receive(inst(0, 1, events_diff(0, [0] * 10)))
                         .event_end, 10)

    def test_unacknowledged_events_add_up_across_states(self):
        """Events of states the peer has not seen acknowledged count
        together; once its throwaway number moves past them, more fit."""
        self.receive(inst(0, 1, events_diff(0, [0] * 4)))
        self.receive(inst(1, 2, events_diff(4, [0] * 4)))
        self.assertDropped(DropReason.EVENTS_OVER_LIMIT,
                           inst(2, 3, events_diff(8, [0] * 4)))
        # The peer saw state 2 acknowledged: its 8 events are forgotten.
        state = self.receive(inst(2, 3, events_diff(8, [0] * 4), throwaway=2))
        self.assertEqual((state.event_base, state.event_end), (8, 12))

    def test_encoded_bytes_of_events_are_bounded(self):
        """Few but large events pass the byte bound across states and are
        dropped as events_over_limit."""
        self.receive(inst(0, 1, events_diff(0, ["x" * 90])))
        self.assertDropped(DropReason.EVENTS_OVER_LIMIT,
                           inst(1, 2, events_diff(1, ["y" * 120])))
        self.assertDropped(DropReason.EVENTS_OVER_LIMIT,
                           inst(0, 2, events_diff(0, ["z" * 250])))
        self.assertEqual(self.receive(inst(1, 2, events_diff(1, ["y" * 90])))
                         .event_end, 2)

    def test_streaming_on_unacknowledged_states_encodes_rarely(self):
        """A peer sending each state on its newest while earlier ones wait for their
        acknowledgement is bounded by adding diff sizes, not by encoding every held
        event again per state; once that bound passes the limit the events are
        encoded, and an exact count that passes it is still refused."""
        from broker.ssp import bounds

        encoded = []
        real = bounds.encode
        self.patch(bounds, "encode", lambda value: encoded.append(1) or real(value))
        wide = dataclasses.replace(BOUNDED, state_bounds=StateBounds(
            max_diff_bytes=4096, max_events=1000, max_event_bytes=2000, max_values=5))
        for num in range(1, 31):
            end = self.receiver.newest_state.event_end
            self.receive(inst(num - 1, num, events_diff(end, ["e" * 40])), wide)
        self.assertLessEqual(len(encoded), 2)     # about once per 2,000 diff bytes
        self.assertEqual(self.receiver.newest_state.event_end, 30)
        # 30 x 41 bytes held; 20 more such states would pass 2,000 encoded bytes.
        refused = 0
        for num in range(31, 61):
            end = self.receiver.newest_state.event_end
            try:
                self.receive(inst(num - 1, num, events_diff(end, ["e" * 40])), wide)
            except DatagramDropped as error:
                self.assertEqual(error.reason, DropReason.EVENTS_OVER_LIMIT)
                refused += 1
                break
        self.assertEqual(refused, 1)
        self.assertLessEqual(len(cbor2.dumps(self.receiver.newest_state.events_since(0))),
                             2000)

    def test_values_map_is_bounded(self):
        """A state whose values map would pass max_values keys is dropped as
        values_over_limit; deleting keys makes room again."""
        self.receive(inst(0, 1, values_diff({f"k{i}": i for i in range(5)})))
        self.assertDropped(DropReason.VALUES_OVER_LIMIT,
                           inst(1, 2, values_diff({"extra": 1})))
        state = self.receive(inst(1, 2, values_diff({"k0": None,
                                                     "extra": 1})))
        self.assertEqual(len(state.values), 5)

    def test_a_diff_over_the_bound_is_refused_before_decoding(self):
        """A diff larger than max_diff_bytes is dropped as too_large, even
        one that is not CBOR at all (it is never decoded)."""
        self.assertDropped(DropReason.TOO_LARGE, inst(0, 1, b"\xff" * 4097))
        self.assertDropped(DropReason.BAD_DIFF, inst(0, 1, b"\xff" * 4096))

    def test_unbounded_profiles_take_what_mosh_takes(self):
        """The mosh and node profiles keep no state bound (a node takes every
        command its broker sends) and mosh's 1,024 received states."""
        self.assertIsNone(MOSH.state_bounds)
        self.assertIsNone(FLEET.state_bounds)
        self.assertEqual(MOSH.received_states_cap, 1024)
        state = self.receive(inst(0, 1, events_diff(0, [0] * 100)), FLEET)
        self.assertEqual(state.event_end, 100)


class DefaultBoundsTests(SynchronousTestCase):
    """The default bounds hold what a legitimate node sends, and little more."""

    def setUp(self):
        self.profile = dataclasses.replace(
            FLEET, state_bounds=StateBounds(),
            received_states_cap=BROKER_RECEIVED_STATES)
        self.receiver = Receiver(DeviceState.empty(), zero=DeviceState.empty())

    def test_a_nodes_largest_state_fits(self):
        """16 KiB of one-byte events (the most a node keeps in flight) and
        16 KiB of values arrive in one state, then again on top of it."""
        values = {f"{i:04x}": 0 for i in range(16 * 1024 // 6)}
        diff = (b"\xa3\x00" + cbor2.dumps(values, canonical=True)
                + events_diff(0, [0] * 16384)[1:])
        state = self.receiver.receive(inst(0, 1, diff), T0, self.profile)
        self.assertEqual((len(state.values), state.event_end),
                         (len(values), 16384))
        state = self.receiver.receive(
            inst(1, 2, events_diff(16384, [0] * 16384)), T0, self.profile)
        self.assertEqual(state.event_end, 32768)

    def test_events_held_by_one_session_stay_bounded(self):
        """A peer that never lets its throwaway number move, adding 20,000
        events per state, gets one such state in: the rest are dropped and
        the states hold at most the bound's events each."""
        receiver = self.receiver
        dropped = 0
        for num in range(1, 41):
            diff = events_diff(receiver.newest_state.event_end, [0] * 20_000)
            try:
                receiver.receive(inst(receiver.newest_num, num, diff),
                                 T0 + num, self.profile)
            except DatagramDropped as error:
                self.assertEqual(error.reason, DropReason.EVENTS_OVER_LIMIT)
                dropped += 1
        held = [len(state.events)
                for state in self.receiver._states[1::2]]
        self.assertEqual(dropped, 39)
        self.assertLessEqual(max(held), MAX_HELD_EVENTS)
        self.assertLessEqual(sum(held), 20_000)

    def test_bounds_are_positive_integers(self):
        """A bound of zero, a negative one or a float is a ValueError."""
        for bad in ({"max_events": 0}, {"max_values": -1},
                    {"max_diff_bytes": 1.5}):
            self.assertRaises(ValueError, StateBounds, **bad)
