"""Tests for broker.ssp.instruction: protobuf, zlib, limits, MTU sizes."""

import contextlib
import zlib

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import instruction
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.instruction import (DEFAULT_MAX_INFLATED, MTU_IPV4, MTU_IPV6,
                                    SMALL_INSTRUCTION, UINT64_MAX, Instruction,
                                    decode_instruction, deflate,
                                    encode_instruction,
                                    fragment_payload_size, inflate,
                                    parse_instruction, serialize_instruction)
from broker.ssp.transportinstruction_pb2 import Instruction as PBInstruction

u64 = st.integers(0, UINT64_MAX)


@contextlib.contextmanager
def _compiled(compiled):
    """Deflate with ``compiled`` installed (None: Python's zlib alone)."""
    kept = instruction._compiled_deflate
    instruction.install_compiled_deflate(compiled)
    try:
        yield
    finally:
        instruction.install_compiled_deflate(kept)


class SerializeTests(SynchronousTestCase):
    """serialize_instruction writes what mosh writes."""

    def test_all_fields_in_order(self):
        """All seven fields in order, empty diff and chaff included."""
        self.assertEqual(
            serialize_instruction(Instruction(old_num=0, new_num=1)).hex(),
            "0802" "1000" "1801" "2000" "2800" "3200" "3a00")

    def test_uint64_max(self):
        """2**64 - 1 is a 10-byte varint."""
        data = serialize_instruction(Instruction(new_num=UINT64_MAX))
        self.assertIn(bytes.fromhex("18ffffffffffffffffff01"), data)

    def test_zlib_default(self):
        """The compressed form is zlib at the default level (78 9c)."""
        data = encode_instruction(Instruction(new_num=1))
        self.assertEqual(data[:2], b"\x78\x9c")
        self.assertEqual(zlib.decompress(data),
                         serialize_instruction(Instruction(new_num=1)))

    @settings(max_examples=400, deadline=None)
    @given(st.one_of(
        st.binary(max_size=SMALL_INSTRUCTION),
        st.text("ab\x00", max_size=SMALL_INSTRUCTION).map(str.encode),
        st.tuples(st.binary(min_size=1, max_size=5), st.integers(0, SMALL_INSTRUCTION))
        .map(lambda pattern: (pattern[0] * SMALL_INSTRUCTION)[:pattern[1]])))
    def test_small_deflate_is_zlib_compress(self, raw):
        """The cheaper deflate of short instructions gives zlib.compress()'s bytes,
        random, two-letter and repeating inputs alike."""
        self.assertEqual(deflate(raw), zlib.compress(raw))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=SMALL_INSTRUCTION))
    def test_small_deflate_without_compiled(self, raw):
        """Without the compiled module's deflate, Python's zlib gives the
        same bytes."""
        with _compiled(None):
            self.assertEqual(deflate(raw), zlib.compress(raw))

    def test_compiled_deflate_used_when_it_answers(self):
        """A short instruction goes to the compiled deflate first; its None
        hands it back to Python's zlib; a long one never goes there."""
        asked = []

        def answers(raw):
            asked.append(raw)
            return b"compiled"

        def cannot(raw):
            asked.append(raw)
            return None

        short, long = b"x" * SMALL_INSTRUCTION, b"x" * (SMALL_INSTRUCTION + 1)
        with _compiled(answers):
            self.assertEqual(deflate(short), b"compiled")
            self.assertEqual(deflate(long), zlib.compress(long))
        with _compiled(cannot):
            self.assertEqual(deflate(short), zlib.compress(short))
        self.assertEqual(asked, [short, short])

    def test_deflate_takes_any_bytes_like(self):
        """A bytearray or memoryview is deflated as its bytes, as zlib takes it
        (the compiled deflate, which takes bytes only, is not asked)."""
        raw = b"abcabc" * 8
        for like in (bytearray(raw), memoryview(raw)):
            self.assertEqual(deflate(like), zlib.compress(raw))

    def test_long_deflate_is_zlib_compress(self):
        """Longer instructions take zlib.compress() itself."""
        raw = bytes(range(256)) * 3
        self.assertEqual(deflate(raw), zlib.compress(raw))
        self.assertEqual(deflate(raw[:SMALL_INSTRUCTION + 1]),
                         zlib.compress(raw[:SMALL_INSTRUCTION + 1]))

    def test_fragment_key_ignores_diff(self):
        """The fragmenter's key covers every field except the diff."""
        a = Instruction(new_num=2, diff=b"a", chaff=b"c")
        self.assertEqual(a.fragment_key(),
                         a._replace(diff=b"b").fragment_key())
        for change in ({"chaff": b"d"}, {"old_num": 1}, {"new_num": 3},
                       {"ack_num": 1}, {"throwaway_num": 1},
                       {"protocol_version": 3}):
            self.assertNotEqual(a.fragment_key(),
                                a._replace(**change).fragment_key())

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(u64, u64, u64, u64, st.binary(max_size=300),
                              st.binary(max_size=16)), min_size=2,
                    max_size=4))
    def test_reused_messages_carry_nothing_over(self, fields):
        """Each serialization equals that of a fresh protobuf message with
        the seven fields set, whatever was serialized before."""
        for old, new, ack, throwaway, diff, chaff in fields:
            inst = Instruction(old_num=old, new_num=new, ack_num=ack,
                               throwaway_num=throwaway, diff=diff,
                               chaff=chaff)
            fresh = PBInstruction(
                protocol_version=2, old_num=old, new_num=new, ack_num=ack,
                throwaway_num=throwaway, diff=diff, chaff=chaff)
            self.assertEqual(serialize_instruction(inst),
                             fresh.SerializeToString())

    def test_refused_field_leaves_no_trace(self):
        """A field protobuf refuses raises, and the next instruction still
        serializes exactly."""
        with self.assertRaises(ValueError):
            serialize_instruction(Instruction(new_num=UINT64_MAX + 1))
        self.assertEqual(
            serialize_instruction(Instruction(old_num=0, new_num=1)).hex(),
            "0802" "1000" "1801" "2000" "2800" "3200" "3a00")

    def test_immutable(self):
        """Instructions are values: no attribute can be changed."""
        inst = Instruction(new_num=1)
        with self.assertRaises(AttributeError):
            inst.new_num = 2
        self.assertEqual(inst, Instruction(new_num=1))
        self.assertEqual(inst.protocol_version, 2)

    @settings(max_examples=60, deadline=None)
    @given(u64, u64, u64, u64, st.binary(max_size=300),
           st.binary(max_size=16))
    def test_round_trip(self, old, new, ack, throwaway, diff, chaff):
        """Every instruction decodes to itself."""
        inst = Instruction(old_num=old, new_num=new, ack_num=ack,
                           throwaway_num=throwaway, diff=diff, chaff=chaff)
        decoded = decode_instruction(encode_instruction(inst))
        self.assertEqual(decoded, inst)
        self.assertIs(type(decoded), Instruction)


class InflateTests(SynchronousTestCase):
    """inflate() caps the output while inflating."""

    def assertDropped(self, reason, data, *args):
        e = self.assertRaises(DatagramDropped, inflate, data, *args)
        self.assertEqual(e.reason, reason)
        return e

    def test_zlib_bomb(self):
        """16 MiB of zeros (16 KiB compressed) is TOO_LARGE at a 1 MiB cap."""
        bomb = zlib.compress(bytes(16 << 20), 9)
        self.assertLess(len(bomb), 20000)
        self.assertDropped(DropReason.TOO_LARGE, bomb)
        e = self.assertRaises(DatagramDropped, decode_instruction, bomb)
        self.assertEqual(e.reason, DropReason.TOO_LARGE)

    def test_cap_exact(self):
        """Exactly the cap is accepted, one byte more is TOO_LARGE."""
        data = zlib.compress(bytes(5000))
        self.assertEqual(inflate(data, 5000), bytes(5000))
        self.assertDropped(DropReason.TOO_LARGE, data, 4999)

    def test_small_input_under_cap(self):
        """Input too short to exceed the cap inflates in one call."""
        data = zlib.compress(b"abc")
        self.assertLess(len(data) * 1032, DEFAULT_MAX_INFLATED)
        self.assertEqual(inflate(data), b"abc")

    def test_bad_zlib(self):
        """Non-zlib bytes are BAD_ZLIB, short and long alike."""
        self.assertDropped(DropReason.BAD_ZLIB, b"not zlib at all")
        self.assertDropped(DropReason.BAD_ZLIB, b"")
        self.assertDropped(DropReason.BAD_ZLIB, b"\x78\x9c" + bytes(3000))

    def test_truncated(self):
        """A truncated stream is BAD_ZLIB on both inflate paths."""
        small = zlib.compress(b"hello world")
        self.assertDropped(DropReason.BAD_ZLIB, small[:-3])
        large = zlib.compress(bytes(range(256)) * 100)
        self.assertDropped(DropReason.BAD_ZLIB, large[:-3], 1 << 20)
        self.assertDropped(DropReason.BAD_ZLIB, small[:-3], 20)

    def test_trailing_bytes_ignored(self):
        """Bytes after the stream end are ignored, as zlib uncompress does."""
        data = zlib.compress(b"abc") + b"junk"
        self.assertEqual(inflate(data), b"abc")
        self.assertEqual(inflate(data, 3), b"abc")

    def test_bad_cap(self):
        """A cap under one byte is a programming error."""
        self.assertRaises(ValueError, inflate, zlib.compress(b"a"), 0)


class ParseTests(SynchronousTestCase):
    """parse_instruction refuses what mosh would abort or throw on."""

    def assertDropped(self, reason, raw):
        e = self.assertRaises(DatagramDropped, parse_instruction, raw)
        self.assertEqual(e.reason, reason)
        e = self.assertRaises(DatagramDropped, decode_instruction,
                              zlib.compress(raw))
        self.assertEqual(e.reason, reason)

    def test_bad_protobuf(self):
        """Malformed protobuf is BAD_INSTRUCTION."""
        for raw in (b"\xff\xff", b"\x08", b"\x32\x05ab", b"\x0f\x00"):
            self.assertDropped(DropReason.BAD_INSTRUCTION, raw)

    def test_wrong_version(self):
        """Protocol version 1 or 3 is BAD_VERSION."""
        for version in (0, 1, 3):
            raw = serialize_instruction(
                Instruction(protocol_version=version, new_num=1))
            self.assertDropped(DropReason.BAD_VERSION, raw)

    def test_missing_version(self):
        """An instruction without protocol_version is BAD_VERSION."""
        self.assertDropped(DropReason.BAD_VERSION,
                           PBInstruction(new_num=1).SerializeToString())

    def test_missing_fields_default(self):
        """Absent numbers read as 0 and absent bytes as empty."""
        raw = PBInstruction(protocol_version=2).SerializeToString()
        self.assertEqual(parse_instruction(raw), Instruction())

    def test_unknown_field_ignored(self):
        """An unknown field (a later extension) does not stop the parse."""
        raw = serialize_instruction(Instruction(new_num=5)) + b"\x40\x01"
        self.assertEqual(parse_instruction(raw).new_num, 5)


class MTUTests(SynchronousTestCase):
    """fragment_payload_size gives mosh's and the broker's sizes."""

    def test_sizes(self):
        """mosh 1214 / 1178; broker 1197 / 1161 (wire.md section 1)."""
        self.assertEqual(fragment_payload_size(MTU_IPV4), 1214)
        self.assertEqual(fragment_payload_size(MTU_IPV6), 1178)
        self.assertEqual(fragment_payload_size(MTU_IPV4, HEADER_SIZE), 1197)
        self.assertEqual(fragment_payload_size(MTU_IPV6, HEADER_SIZE), 1161)

    def test_too_small(self):
        """An MTU that leaves no room for contents is refused."""
        self.assertRaises(ValueError, fragment_payload_size, 38)
        self.assertEqual(fragment_payload_size(39), 1)
