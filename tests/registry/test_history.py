"""Tests for broker.registry.history: entries kept as their CBOR bytes."""

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from broker.registry.database import decode_state, encode_state
from broker.registry.history import EMPTY_HISTORY, History, encode_entry
from broker.registry.model import Device
from broker.registry.values import FrozenMap

ENTRIES = ((1, 10, 100.5, "reported", {"t": 1.5}),
           (2, 11, 101.0, "connection", {"online": True}),
           (3, 12, 102.25, "events", ({"kind": "boot"},)))


class HistoryTests(SynchronousTestCase):

    def test_entries_read_back_as_tuples(self):
        """Indexing and iteration give the entries, data frozen."""
        history = History.of(ENTRIES)
        self.assertEqual(len(history), 3)
        self.assertEqual(history[0], (1, 10, 100.5, "reported", FrozenMap({"t": 1.5})))
        self.assertIsInstance(history[0][4], FrozenMap)
        self.assertEqual([entry[3] for entry in history], ["reported", "connection", "events"])
        self.assertEqual(history, ENTRIES)

    def test_appended_keeps_the_newest(self):
        """Appending past the size drops the oldest entries and leaves the original alone."""
        history = History.of(ENTRIES)
        longer = history.appended(4, 13, 103.0, "desired", {"x": 1}, size=3)
        self.assertEqual([entry[0] for entry in longer], [2, 3, 4])
        self.assertEqual(len(history), 3)
        self.assertEqual(EMPTY_HISTORY.appended(1, 2, 3.0, "reported", {}, size=5),
                         ((1, 2, 3.0, "reported", {}),))

    def test_appended_matches_encoding_at_once(self):
        """Appending entries of every head size (short, one-byte and two-byte lengths)
        past 24 entries gives the very bytes of encoding the kept entries at once."""
        entries = [(v, 100 + v, 1.5 * v, "reported", {"t": "x" * (v * 37 % 700)})
                   for v in range(1, 61)]
        history = EMPTY_HISTORY
        for entry in entries:
            history = history.appended(*entry, size=30)
        self.assertEqual(history.cbor(), History.of(entries[-30:]).cbor())
        self.assertEqual(len(history), 30)
        self.assertEqual(history[0][0], 31)
        self.assertEqual(cbor2.loads(history.cbor()), list(history.encoded))

    def test_slices_are_histories(self):
        """A slice is a History of the same bytes."""
        history = History.of(ENTRIES)
        self.assertIsInstance(history[-2:], History)
        self.assertEqual(history[-2:].encoded, history.encoded[1:])
        self.assertEqual(history[:0], ())
        self.assertFalse(history[:0])

    def test_stored_form_is_an_array_of_entry_bytes(self):
        """cbor() stores each entry's bytes as they are, so loading need not decode them."""
        history = History.of(ENTRIES)
        stored = cbor2.loads(history.cbor())
        self.assertEqual(stored, [encode_entry(*entry) for entry in ENTRIES])
        self.assertEqual(History.from_stored(stored).encoded, history.encoded)

    def test_older_stored_form_is_read(self):
        """A history stored as 5-item arrays (stores written before) loads the same."""
        old = cbor2.loads(cbor2.dumps(ENTRIES))
        self.assertEqual(History.from_stored(old), History.of(ENTRIES))

    def test_device_state_round_trip(self):
        """A device's history survives encode_state / decode_state byte for byte."""
        dev = Device("d", 7, b"k" * 16)
        dev.history = History.of(ENTRIES)
        restored = decode_state(encode_state(dev.state()))
        self.assertEqual(restored[-1].encoded, dev.history.encoded)
        dev.history = ENTRIES   # plain tuples are encoded the same way
        self.assertEqual(decode_state(encode_state(dev.state()))[-1], History.of(ENTRIES))

    def test_with_cursors_fills_only_the_newest_zeros(self):
        """Entries written with cursor 0 (a writer on Redis) get their cursors from the
        change's version and cursor; older entries keep their very bytes."""
        history = History.of(ENTRIES[:2] + ((3, 0, 102.25, "events", ("x",)),
                                            (4, 0, 103.0, "reported", {"t": 2.0})))
        filled = history.with_cursors(version=4, cursor=50)
        self.assertEqual([entry[:2] for entry in filled], [(1, 10), (2, 11), (3, 49), (4, 50)])
        self.assertEqual(filled.encoded[:2], history.encoded[:2])
        self.assertEqual(filled[3][4], {"t": 2.0})
        done = History.of(ENTRIES)
        self.assertIs(done.with_cursors(version=3, cursor=12), done)
        self.assertIs(EMPTY_HISTORY.with_cursors(version=1, cursor=1), EMPTY_HISTORY)
