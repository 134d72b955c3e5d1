"""The extension's deflate of a short instruction without zlib (_speedups_deflate.c).

It must give zlib.compress's very bytes, or say nothing (None) and leave the
input to zlib: the instructions sent are the reference's byte for byte.
"""

import random
import zlib

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import speedups
from broker.ssp.device_state import DeviceState
from broker.ssp.instruction import SMALL_INSTRUCTION, Instruction, encode_instruction

try:
    from broker.ssp._speedups import deflate, deflate_tiny
except ImportError:   # not built: nothing to compare
    deflate = deflate_tiny = None


def reference(raw: bytes) -> bytes:
    """The Python path's stream for a short instruction (memLevel 1)."""
    stream = zlib.compressobj(6, zlib.DEFLATED, 15, 1)
    return stream.compress(raw) + stream.flush()


def instructions(seed: int, count: int):
    """Instructions as the sessions send them: states of readings and events,
    their diffs, acks (no diff), sequence numbers, 0-16 bytes of chaff."""
    rng = random.Random(seed)
    state = DeviceState.empty()
    for i in range(count):
        previous = state
        if rng.random() < 0.7:
            state = state.with_values({rng.choice(["temp", "rh", "seq", "door"]):
                                       rng.choice([rng.randrange(-50, 5000),
                                                   round(rng.uniform(-40, 60), 2),
                                                   rng.random() < 0.5, "open"])})
        if rng.random() < 0.1:
            state = state.with_events({"kind": "tick", "i": i})
        diff = state.diff_from(previous) if rng.random() < 0.6 else b""
        new = rng.randrange(0, 1 << rng.choice([4, 10, 20, 33]))
        raw = encode_instruction(Instruction(
            old_num=max(0, new - rng.randrange(0, 4)), new_num=new,
            ack_num=rng.randrange(0, 1 << 20), throwaway_num=rng.randrange(0, 1 << 20),
            diff=diff, chaff=rng.randbytes(rng.randrange(0, 17))))
        if len(raw) <= SMALL_INSTRUCTION:
            yield raw


class DeflateTinyTests(SynchronousTestCase):

    def setUp(self):
        if deflate_tiny is None or speedups.fast_send is None:
            raise self.skipTest(speedups.unavailable_reason or "not built")

    def assert_zlib_bytes(self, raw: bytes) -> bool:
        """deflate_tiny(raw) is None or zlib's bytes; whether it said."""
        deflated = deflate_tiny(raw)
        if deflated is not None:
            self.assertEqual(deflated, zlib.compress(raw), raw.hex())
            self.assertEqual(deflated, reference(raw), raw.hex())
        return deflated is not None

    def test_instructions_as_sent(self):
        """For instructions as the sessions make them, the bytes are zlib's, and
        it says for nearly all of them (what it is for)."""
        said = [self.assert_zlib_bytes(raw) for raw in instructions(7, 4000)]
        self.assertGreater(len(said), 3000)
        self.assertGreater(sum(said) / len(said), 0.9)

    @settings(max_examples=3000, deadline=None)
    @given(st.binary(max_size=SMALL_INSTRUCTION))
    def test_any_bytes(self, raw):
        """Any input up to the limit: zlib's bytes or None."""
        self.assert_zlib_bytes(raw)

    @settings(max_examples=3000, deadline=None)
    @given(st.lists(st.integers(0, 3), max_size=SMALL_INSTRUCTION))
    def test_repetitive_bytes(self, symbols):
        """Few distinct bytes (many matches, lazy evaluation, chains cut short):
        zlib's bytes or None."""
        self.assert_zlib_bytes(bytes(symbols))

    def test_runs_and_patterns(self):
        """Runs of one byte (the longest matches, position 0 never matched),
        repeated pairs and triples at every length up to the limit."""
        for length in range(SMALL_INSTRUCTION + 1):
            for unit in (b"\x00", b"\xff", b"ab", b"abc", b"\x08\x01\x10"):
                raw = (unit * length)[:length]
                self.assert_zlib_bytes(raw)
        self.assertTrue(self.assert_zlib_bytes(b""))
        self.assertTrue(self.assert_zlib_bytes(b"\x00" * SMALL_INSTRUCTION))

    def test_longer_input_is_left_to_zlib(self):
        """Above 96 bytes it says nothing; deflate() then gives zlib's bytes."""
        raw = bytes(range(SMALL_INSTRUCTION + 1))
        self.assertIsNone(deflate_tiny(raw))
        self.assertIsNone(deflate(raw))   # (longer than a short instruction)

    def test_undecided_input_still_deflated_as_zlib(self):
        """Where it says nothing (a very repetitive input), deflate() falls back
        to the kept zlib stream: the bytes are still zlib's."""
        undecided = [raw for raw in (bytes(random.Random(i).choices(b"ab", k=60))
                                     for i in range(200)) if deflate_tiny(raw) is None]
        self.assertTrue(undecided)
        for raw in undecided:
            self.assertEqual(deflate(raw), zlib.compress(raw))

    def test_bytes_only(self):
        self.assertRaises(TypeError, deflate_tiny, bytearray(b"x"))
