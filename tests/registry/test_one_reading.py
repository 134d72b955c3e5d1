"""The one-reading fast paths (a device's map encoded, a report checked) give
what the general paths give."""

import random
import struct

import cbor2
from twisted.trial.unittest import TestCase

from broker.registry.database import TAG_FLOAT64, _encode, _map_cbor, decode_state
from broker.registry.history import History
from broker.registry.model import KeyShapes, replace_numbers
from broker.registry.values import INT_MAX, INT_MIN

VALUES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
          -1, -24, -2**63, -2**64, 2**64, 0.0, -0.0, 1.5, 1e300, float("nan"),
          float("inf"), float("-inf"), True, False, None, "text", (1, 2.5)]
TIMES = [1_700_000_000.5, 0.0, 1e300, 7, None]


def _typed(items):
    """cbor2's CBOR of a tuple of floats as the float64 typed array."""
    return cbor2.dumps(cbor2.CBORTag(TAG_FLOAT64, struct.pack(f">{len(items)}d", *items)))


def _array(items):
    """The general path's CBOR of a tuple of numbers (see database._array)."""
    if all(type(v) is float for v in items):
        return _typed(items)
    return cbor2.dumps(items)


def _reference_replace(keys, values, patch):
    """replace_numbers' rule for one key: the key known, a finite float or
    a 64-bit int replacing a float or an int."""
    (key, value), = patch.items()
    if key != keys[0] or type(values[0]) not in (float, int):
        return False
    if type(value) is float:
        return value - value == 0.0
    return type(value) is int and INT_MIN <= value <= INT_MAX


class OneReadingTests(TestCase):

    def test_map_cbor_of_one_reading(self):
        for value in VALUES:
            for at in TIMES:
                keys, values, times = ("value",), (value,), (at,)
                encoded = _map_cbor(keys, values, times)
                if (type(value) in (int, float) and type(at) is float
                        and (type(value) is float or -2**64 <= value < 2**64)):
                    self.assertEqual(encoded, cbor2.dumps(keys) + _array(values) + _array(times),
                                     (value, at))
                decoded = cbor2.loads(b"\x83" + encoded)
                self.assertEqual(decoded[0], list(keys))

    def test_device_of_one_reading_round_trips(self):
        history = History().appended(3, 70000, 1.5, "reported", {"value": 1}, 32)
        for value in VALUES[:20]:
            state = (("value",), (value,), (2.5,), (), (), (), True, 1.5,
                     ["127.0.0.1", 40000], 0.25, 2**40, history)
            decoded = decode_state(_encode(*state))
            self.assertEqual(decoded[1], (value,))
            self.assertEqual(decoded[11], history)

    def test_replace_numbers_of_one_reading(self):
        shapes = KeyShapes()
        rng = random.Random(11)
        patch_values = VALUES + [INT_MIN, INT_MAX, INT_MIN - 1, INT_MAX + 1]
        for _ in range(3000):
            keys = (rng.choice(["value", "other"]),)
            old = (rng.choice(VALUES),)
            patch = {rng.choice(["value", "other", 1]): rng.choice(patch_values)}
            got = replace_numbers(shapes, keys, old, (1.0,), patch, 2.0)
            if _reference_replace(keys, old, patch):
                self.assertEqual(got, (tuple(patch.values()), (2.0,)), (keys, old, patch))
                self.assertIs(got[0][0], next(iter(patch.values())))
            else:
                self.assertIsNone(got, (keys, old, patch))
