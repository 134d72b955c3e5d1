"""Tests for broker.ssp.cbor: the exact one-item decoder."""

import struct

import cbor2
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.cbor import OneItemDecoder
from broker.ssp.device_state import freeze
from broker.ssp.errors import DatagramDropped, DropReason

# Floats at the edges of the half and single precision formats, where the
# shortest exact encoding changes.
EDGE_FLOATS = [0.0, -0.0, 1.0, -2.5, 65504.0, 65505.0, 65520.0,
               2.0 ** -24, 2.0 ** -25, 2.0 ** -14, 2.0 ** -149, 2.0 ** -150,
               3.4028234663852886e38, 3.4028235677973366e38, 1e300,
               float("inf"), float("-inf"), 0.1, 20.5, 21.37, 1e-310,
               struct.unpack(">f", b"\x00\x00\x00\x01")[0]]
INT_EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
             2**64 - 1, -1, -24, -25, -256, -257, -(2**64)]

scalars = (st.booleans() | st.integers(-(2**64), 2**64 - 1)
           | st.sampled_from(INT_EDGES) | st.floats(allow_nan=False)
           | st.floats(width=16, allow_nan=False)
           | st.floats(width=32, allow_nan=False)
           | st.sampled_from(EDGE_FLOATS)
           | st.text(max_size=30) | st.binary(max_size=30))
ascii_text = st.text(st.characters(max_codepoint=127), max_size=4)
keys = (ascii_text | st.text(max_size=4)
        | st.text(min_size=20, max_size=30))
frozen_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner | st.none(), max_size=30)
    | st.dictionaries(keys, inner | st.none(), max_size=6),
    max_leaves=40,
).map(freeze)


def canonical(value) -> bytes:
    return cbor2.dumps(value, canonical=True)


class OneItemDecoderTests(SynchronousTestCase):
    """OneItemDecoder takes exactly one CBOR item, refusing anything else."""

    def setUp(self):
        self.decode = OneItemDecoder(max_depth=4).decode

    def assertDropped(self, data, detail):
        with self.assertRaises(DatagramDropped) as caught:
            self.decode(data)
        self.assertIs(caught.exception.reason, DropReason.BAD_DIFF)
        self.assertIn(detail, str(caught.exception))

    def test_one_item(self):
        """An item alone decodes, also after a refused one."""
        self.assertEqual(self.decode(b"\xa1\x00\x01"), {0: 1})
        self.assertDropped(b"\xa1\x00\x01\x00\x00", "2 bytes after")
        self.assertDropped(b"\xa1\x00", "not CBOR")
        self.assertEqual(self.decode(b"\x82\x01\x02"), [1, 2])

    @settings(max_examples=100, deadline=None)
    @given(frozen_values, st.binary(max_size=5000))
    def test_trailing_bytes_counted(self, value, tail):
        """Bytes after the item are refused with their count, whatever the
        lengths (also past the decoder's 4096-byte reads)."""
        data = canonical(value)
        decode = OneItemDecoder(max_depth=100).decode
        if tail:
            with self.assertRaises(DatagramDropped) as caught:
                decode(data + tail)
            self.assertIn(f"{len(tail)} bytes after", str(caught.exception))
        self.assertEqual(canonical(decode(data)), data)

    def test_depth_limit(self):
        """Nesting past max_depth is refused."""
        self.assertEqual(self.decode(b"\x81" * 3 + b"\x00"), [[[0]]])
        self.assertDropped(b"\x81" * 6 + b"\x00", "not CBOR")
