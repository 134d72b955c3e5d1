"""The shortcuts of a report: the same refusals, estimates and diffs as the long way."""

import cbor2
from hypothesis import example, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.node.backlog import MAX_VALUES_BYTES
from broker.node.client import node_profile
from broker.node.session import NodeSession, entry_size, plain
from broker.node.session_ids import SessionIds
from broker.registry.values import FrozenMap, thaw as registry_thaw, value_size
from broker.ssp.crypto import CipherCache
from broker.ssp.device_state import DeviceState, encode

SECRET = bytes(range(16))
SCALARS = [0, 1, -1, 23, 24, 255, 256, 2**32, 2**64 - 1, -(2**64), 0.0, -0.0, 1.5,
           1e300, True, False, "", "x" * 300, "\u00e9t\u00e9", b"", b"\x00" * 300]


def node(max_state_bytes=4 * MAX_VALUES_BYTES):
    session = NodeSession(5, SECRET, ("127.0.0.1", 9),
                          session_ids=SessionIds(None, wall_clock=lambda: 1),
                          profile=node_profile(1.0), ciphers=CipherCache(8),
                          rekey_after=2.0, max_state_bytes=max_state_bytes)
    session.start(100.0)
    return session


class ValuesLimitTests(SynchronousTestCase):
    """The encoding is tried only when the registry's estimate is over the limit."""

    def test_estimated_over_but_encoded_within(self):
        """Numbers the registry counts at 9 bytes each, over MAX_VALUES_BYTES in
        all: accepted, as their encoding is within (floats: canonically only)."""
        for number in (0.5, 1):
            session = node()
            values = {f"k{i:04d}": [number] * 64 for i in range(30)}
            self.assertGreater(30 * entry_size("k0000", (number,) * 64), MAX_VALUES_BYTES)
            session.report(values, 100.0)
            self.assertEqual(len(session.state.values), 30)

    def test_encoded_over_the_limit_refused(self):
        """Text over the limit (estimate and encoding both): refused, nothing changes."""
        session = node()
        session.report({"a": 1}, 100.0)
        with self.assertRaises(ValueError) as caught:
            session.report({"a": 2, "b": "x" * MAX_VALUES_BYTES}, 100.0)
        self.assertIn(str(MAX_VALUES_BYTES), str(caught.exception))
        self.assertEqual(dict(session.state.values), {"a": 1})

    def test_estimate_bounds_plain_encoding(self):
        """The registry's estimate of an entry is never below its plain CBOR size."""
        for value in SCALARS + [(1, "x", None, (2.5,)), {"k": {"j": [1, None]}}]:
            frozen = DeviceState().with_values({"key": value}).values
            key_and_value = len(cbor2.dumps({"key": frozen["key"]})) - 1
            self.assertLessEqual(key_and_value, entry_size("key", frozen["key"]), value)

    def test_entry_size_of_numbers(self):
        """The numbers' shortcut gives the registry form's size."""
        for value in (0, -5, 2**64 - 1, 1.5, True, None):
            self.assertEqual(entry_size("abc", value),
                             3 + 3 + value_size(registry_thaw(plain(value))))


class DiffShortcutTests(SynchronousTestCase):
    """One changed scalar: the plain encoding is the canonical one."""

    def test_single_values(self):
        for old in (None, 7, 7.0, True, "7"):
            before = DeviceState() if old is None else DeviceState({"v": old})
            for value in SCALARS:
                after = before.with_values({"v": value})
                if after is before:
                    continue
                self.assertEqual(after.diff_from(before),
                                 b"\xa1\x00" + encode({"v": value}), (old, value))

    def test_deletion(self):
        before = DeviceState({"v": 1, "w": 2})
        self.assertEqual(before.with_values({"v": None}).diff_from(before),
                         b"\xa1\x00" + encode({"v": None}))


class WithValuesTests(SynchronousTestCase):
    """Integers skip freeze() and same(): types still count, ranges still hold."""

    def test_changes_of_type(self):
        state = DeviceState({"v": 1})
        self.assertIs(state.with_values({"v": 1}), state)
        for other in (True, 1.0, "1"):
            changed = state.with_values({"v": other})
            self.assertIsNot(changed, state)
            self.assertIs(type(changed.values["v"]), type(other))
        self.assertIsNot(DeviceState({"v": True}).with_values({"v": 1}).values["v"], True)

    def test_range(self):
        state = DeviceState()
        self.assertEqual(state.with_values({"v": 2**64 - 1}).values["v"], 2**64 - 1)
        self.assertRaises(ValueError, state.with_values, {"v": 2**64})
        self.assertRaises(ValueError, state.with_values, {"v": -(2**64) - 1})

    def test_plain_keeps_maps(self):
        """plain() of a scalar is itself; maps (a FrozenMap too) still become dicts."""
        self.assertEqual(plain(FrozenMap({"a": (1, 2)})), {"a": [1, 2]})
        self.assertIs(type(plain(FrozenMap({"a": 1}))), dict)


#: Readings and what a report may also carry: numbers at the edges of
#: their ranges and past them, zeros of both signs, infinities, a boolean,
#: text, a deletion.
READINGS = [0, 1, -1, 2**64 - 1, 2**64, -(2**64), -(2**64) - 1, 0.0, -0.0, 1.5, 1,
            float("inf"), True, "x", None]


class ReadingShortcutTests(SynchronousTestCase):
    """A report of numbers for keys that hold numbers takes a shortcut
    (DeviceState.with_numbers, no checks): the same states, estimates and
    refusals as the long way."""

    def run_reports(self, reports):
        """Each report's outcome on a fresh node: the state's values as the
        wire has them, the registry's estimate, or the refusal."""
        session = node()
        outcomes = []
        for values in reports:
            try:
                session.report(values, 100.0)
            except (TypeError, ValueError) as error:
                outcomes.append(("refused", str(error)))
            state = session.state
            outcomes.append((encode(dict(state.values)), session._values_size,
                             [type(v).__name__ for v in state.values.values()]))
        return outcomes

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]),
                                    st.sampled_from(READINGS), min_size=1, max_size=3),
                    min_size=1, max_size=8))
    @example([{"a": 0.0}, {"a": -0.0}, {"a": 0}, {"a": 0.0}])
    @example([{"a": 1}, {"a": 2**64}, {"a": float("inf")}, {"a": True}, {"a": 1.0}])
    def test_same_outcomes_as_the_long_way(self, reports):
        shortcut = self.run_reports(reports)
        with_numbers = DeviceState.with_numbers
        try:
            DeviceState.with_numbers = lambda state, patch: None
            long_way = self.run_reports(reports)
        finally:
            DeviceState.with_numbers = with_numbers
        self.assertEqual(shortcut, long_way)

    def test_the_usual_reading_takes_it(self):
        """A number replacing a number takes the shortcut; a new key does not."""
        calls = []
        original = DeviceState.with_numbers

        def counted(state, patch):
            calls.append(original(state, patch))
            return calls[-1]
        self.patch(DeviceState, "with_numbers", counted)
        session = node()
        session.report({"value": 1}, 100.0)
        self.assertEqual(calls, [None])             # a new key: the long way
        session.report({"value": 2.5}, 100.0)
        self.assertEqual(dict(session.state.values), {"value": 2.5})
        self.assertIs(calls[-1], session.state)     # the shortcut's state was set
