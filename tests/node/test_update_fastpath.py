"""The shortcuts of a report: the same refusals, estimates and diffs as the long way."""

import cbor2
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
