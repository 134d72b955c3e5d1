"""The hand-written CBOR of a history entry is cbor2's, byte for byte."""

import random

import cbor2
from twisted.trial.unittest import TestCase

from broker.registry.history import History
from broker.registry import history_entry
from broker.registry.history_entry import encode_entry, number_map_cbor
from broker.registry.values import FrozenMap

#: values of every kind a map may hold, at the edges of each CBOR form
VALUES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
          -1, -24, -25, -2**64, -2**64 - 1, 2**64, 0.0, -0.0, 1.5, 1e300,
          float("nan"), float("inf"), float("-inf"), True, False, None, "text", b"bytes",
          (1, 2.5), {"inner": 1}]
#: versions and cursors at the edges of each head width (and past them)
COUNTS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, 2**64, -1]
TIMES = [1_700_000_000.5, 0.0, -0.0, 1e300, float("nan"), float("inf"), 1_700_000_000, None]
KINDS = ["reported", "desired", "connection", "events", "é", "k" * 30, ("reported",), 7]
KEYS = ["value", "a", "é", "k" * 30, "b"]


def _data(rng):
    shape = rng.random()
    if shape < 0.1:
        return [rng.choice(VALUES) for _ in range(rng.randrange(3))]
    data = {rng.choice(KEYS): rng.choice(VALUES) for _ in range(rng.randrange(6))}
    if shape < 0.3:
        return FrozenMap(data)
    if shape < 0.35:
        return {1: 2}
    return data


class EncodeEntryTests(TestCase):

    def test_encode_entry_is_cbor2s(self):
        rng = random.Random(5)
        for _ in range(20000):
            entry = (rng.choice(COUNTS), rng.choice(COUNTS), rng.choice(TIMES),
                     rng.choice(KINDS), _data(rng))
            self.assertEqual(encode_entry(*entry), cbor2.dumps(entry), entry)

    def test_usual_entries(self):
        rng = random.Random(6)
        for _ in range(5000):
            entry = (rng.randrange(2**40), rng.randrange(2**40), rng.uniform(0, 2e9),
                     "reported", {"value": rng.choice((rng.randrange(-2**40, 2**40),
                                                       rng.uniform(-1e6, 1e6)))})
            self.assertEqual(encode_entry(*entry), cbor2.dumps(entry), entry)

    def test_appended_history_is_cbor2s(self):
        """A history grown by appends is the stored array cbor2 makes of its entries."""
        rng = random.Random(7)
        history = History()
        entries = []
        for i in range(100):
            entry = (i + 1, 1000 + i, 1e9 + i / 3, "reported",
                     {"value": rng.randrange(-2**70, 2**70) if i % 3 else rng.random()})
            history = history.appended(*entry, 32)
            entries = (entries + [entry])[-32:]
            self.assertEqual(history.cbor(), cbor2.dumps([cbor2.dumps(e) for e in entries]))
            self.assertEqual(tuple(history), tuple(entries))


class KeyTextCacheTests(TestCase):
    """The cache of encoded key texts holds short keys only: keys also come
    from devices' own states, which may be long."""

    def test_long_keys_are_encoded_not_kept(self):
        long_key, short_key = "k" * 65, "reading_" + "s" * 20
        self.assertEqual(number_map_cbor({long_key: 1, short_key: 2}),
                         cbor2.dumps({long_key: 1, short_key: 2}))
        self.assertEqual(encode_entry(30, 31, 1.5, "x" * 200, {long_key: 3}),
                         cbor2.dumps((30, 31, 1.5, "x" * 200, {long_key: 3})))
        self.assertNotIn(long_key, history_entry._TEXTS)
        self.assertNotIn("x" * 200, history_entry._TEXTS)
        self.assertIn(short_key, history_entry._TEXTS)
