"""Tests for broker.registry.database: the hand-written CBOR encoding of device states."""

import math

import cbor2
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.registry.database import decode_state, encode_device, encode_state
from broker.registry.model import Device

KEYS = ("temperature", "humidity", "pressure", "battery", "rssi")
scalars = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False),
                    st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1),
                    st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=5)


def reference(state):
    """What plain cbor2 makes of the state, decoded: the meaning the fast encoder must keep."""
    return decode_state(cbor2.dumps(list(state)))


class EncodeStateTests(SynchronousTestCase):
    """encode_state writes what decode_state (plain cbor2) reads back unchanged."""

    def test_float_readings_use_typed_arrays(self):
        """An all-float map is stored as two float64 typed arrays (RFC 8746 tag 86) and round-trips."""
        state = (KEYS, (20.5, 41.0, 1013.25, 3.7, -61.0), (1.7e9,) * 5, (), (), (),
                 True, 1.7e9 + 0.25, ("192.0.2.1", 60001), 0.031, (1 << 64) - 1, ())
        blob = encode_state(state)
        self.assertEqual(blob.count(bytes((0xd8, 86))), 2)
        self.assertEqual(decode_state(blob), reference(state))

    def test_device_encoding_matches_state_encoding(self):
        """encode_device(dev) is byte for byte encode_state(dev.state())."""
        dev = Device("d", 7, b"\x00" * 16, 3, 9)
        dev.rkeys, dev.rvals, dev.rtimes = KEYS, (1.0, 2, "x", None, True), (5.0,) * 5
        dev.dkeys, dev.dvals, dev.dtimes = ("t",), (2.5,), (6.0,)
        dev.address, dev.rtt, dev.session_id = ("::1", 5), 0.5, 12
        dev.history = ((1, 2, 3.0, "reported", {"t": 1}),)
        self.assertEqual(encode_device(dev), encode_state(dev.state()))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(values, min_size=0, max_size=6), st.lists(st.floats(allow_nan=False), max_size=3),
           st.one_of(st.none(), st.booleans()), st.one_of(st.none(), st.floats(allow_nan=False)),
           st.one_of(st.none(), st.tuples(st.text(max_size=20), st.integers(0, 65535))),
           st.one_of(st.none(), st.integers(-(1 << 64), (1 << 64) - 1)))
    def test_round_trip_matches_cbor2(self, rvals, dvals, online, last_heard, address, session_id):
        """Any mix of values and connection facts decodes exactly as plain cbor2's encoding does."""
        rkeys = tuple(f"k{i}" for i in range(len(rvals)))
        dkeys = tuple(f"d{i}" for i in range(len(dvals)))
        state = (rkeys, tuple(rvals), (1.5,) * len(rvals), dkeys, tuple(dvals),
                 (2.5,) * len(dvals), online, last_heard,
                 list(address) if address else None, last_heard, session_id, ())
        decoded = decode_state(encode_state(state))
        expected = reference(state)
        self.assertEqual(decoded, expected)
        for got, want in zip(decoded[1], expected[1]):
            self.assertIs(type(got), type(want))

    def test_negative_zero_and_extremes(self):
        """-0.0, the largest floats and the 64-bit integer bounds survive exactly."""
        state = (("a", "b", "c"), (-0.0, 1.7976931348623157e308, 5e-324), (0.0,) * 3,
                 ("i", "j"), (-(1 << 64), (1 << 64) - 1), (1.0, 1.0),
                 False, None, None, -0.0, 0, ())
        decoded = decode_state(encode_state(state))
        self.assertEqual(decoded, reference(state))
        self.assertEqual(math.copysign(1.0, decoded[1][0]), -1.0)


class WriteAheadLogTests(SynchronousTestCase):
    """The write-ahead log does not keep the size of its largest transaction."""

    def test_the_log_shrinks_back_after_a_large_transaction(self):
        """After one large transaction (an unclean start rewrites every row) and a
        checkpoint, the next write leaves the -wal file at the size limit at most."""
        import os

        from broker.registry import database

        self.patch(database, "WAL_SIZE_LIMIT", 64 * 1024)
        directory = self.mktemp()
        os.makedirs(directory, mode=0o700)
        path = os.path.join(directory, database.DB_NAME)
        conn = database.connect(path)
        self.addCleanup(conn.close)
        conn.execute("CREATE TABLE bulk (body BLOB)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO bulk VALUES (?)", [(os.urandom(1024),)] * 2000)
        conn.execute("COMMIT")
        self.assertGreater(os.path.getsize(path + "-wal"), 1024 * 1024)
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.execute("INSERT INTO bulk VALUES (x'00')")   # the log starts over
        self.assertLessEqual(os.path.getsize(path + "-wal"), 64 * 1024)


class DataDirectoryTests(SynchronousTestCase):
    """The data directory and the directories made on the way to it are private."""

    def test_parents_made_for_the_data_directory_are_private(self):
        """Under umask 000 a nested data_dir's new parents are 0700 too, so no other
        user can swap the data directory for their own."""
        import os
        import stat

        from broker.registry.database import prepare_directory
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        top = self.mktemp()
        prepare_directory(os.path.join(top, "data", "sub"))
        for path in (top, os.path.join(top, "data"), os.path.join(top, "data", "sub")):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700, path)


class BlobBindingTests(SynchronousTestCase):
    """The store binds its blobs through the identity adapter it registers."""

    def test_bytes_have_the_identity_adapter(self):
        """Loading the store registers bytes' own adapter (a dictionary hit per
        blob instead of sqlite3's search), which gives the blob itself."""
        import sqlite3
        adapter = sqlite3.adapters.get((bytes, sqlite3.PrepareProtocol))
        self.assertIs(adapter, bytes)
        blob = b"\x00\xffstate"
        self.assertIs(adapter(blob), blob)
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT ?", (blob,)).fetchone()[0], blob)
