"""The hand-written CBOR of database.py's fast paths is cbor2's (or they decline)."""

import random

import cbor2
from twisted.trial.unittest import TestCase

from broker.registry.database import _encode, _map_cbor
from broker.registry.history_entry import number_map_cbor

#: values of every kind a fast path takes or must refuse, at their edges
VALUES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
          -1, -24, -25, -256, -2**63, -2**64, -2**64 - 1, 2**64, 0.0, -0.0, 1.5, 1e300,
          float("nan"), float("inf"), float("-inf"), True, False, None, "text", b"bytes",
          (1, 2.5), {"inner": 1}]
KEYS = ["value", "a", "é", "k" * 30, "b"]


def declined(mapping):
    """Whether number_map_cbor must leave ``mapping`` to cbor2."""
    return any(type(k) is not str or not k.isascii() or type(v) not in (int, float, bool)
               or v != v or v in (float("inf"), float("-inf"))
               or (type(v) is int and not -2**64 <= v < 2**64)
               for k, v in mapping.items())


class EncodeFastPathTests(TestCase):

    def test_number_map_cbor_is_cbor2s_or_none(self):
        rng = random.Random(3)
        for _ in range(3000):
            mapping = {key: rng.choice(VALUES) for key in rng.sample(KEYS, rng.randint(0, 5))}
            encoded = number_map_cbor(mapping)
            if encoded is not None:
                self.assertEqual(encoded, cbor2.dumps(mapping), mapping)
            else:
                self.assertTrue(declined(mapping), mapping)
        self.assertIsNone(number_map_cbor({1: 2}))
        self.assertEqual(number_map_cbor({"k" * 300: 1}), cbor2.dumps({"k" * 300: 1}))
        many = {f"k{i}": i for i in range(30)}
        self.assertEqual(number_map_cbor(many), cbor2.dumps(many))

    def test_map_cbor_of_numbers_decodes_to_them(self):
        for values in [(306,), (1, 2.5, 2**64 - 1, -2**64), (True,), ("x", 1), (2**64,)]:
            keys = tuple(f"k{i}" for i in range(len(values)))
            decoded = cbor2.loads(b"\x83" + _map_cbor(keys, values, (1.5,) * len(values)))
            self.assertEqual(tuple(decoded[1]), values)

    def test_addresses_are_cbor2s(self):
        for address in [("127.0.0.1", 40000), ("::1", 80), ("1.2.3.4", 255), ("1.2.3.4", 256),
                        ("1.2.3.4", 0), ("h" * 30, 65535), ("1.2.3.4", 23), ("1.2.3.4", 24)]:
            for session_id in (2**40, 7):
                encoded = _encode((), (), (), (), (), (), True, 1.5, address, 0.5, session_id, ())
                self.assertIn(cbor2.dumps(list(address)), encoded)
                self.assertEqual(cbor2.loads(encoded)[8], list(address))
