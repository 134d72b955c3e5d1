"""Tests for broker.ssp.fragment: headers, fragmenting and reassembly."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.fragment import (FRAGMENT_COST, FRAGMENT_HEADER_SIZE, MAX_FRAGMENTS,
                                 Fragment, FragmentAssembly, Fragmenter)


class FragmentTests(SynchronousTestCase):
    """Fragment encodes mosh's 10-byte header."""

    def test_encode(self):
        """id u64 BE, then final<<15 | number as u16 BE, then contents."""
        self.assertEqual(Fragment(4, 1, True, b"ab").encode(),
                         bytes.fromhex("0000000000000004" "8001") + b"ab")
        self.assertEqual(Fragment(2**64 - 1, 0x7FFF, False, b"").encode(),
                         b"\xff" * 8 + b"\x7f\xff")

    def test_decode(self):
        """Decoding gives the fields back, the number in 15 bits."""
        fragment = Fragment.decode(b"\0" * 7 + b"\x05" + b"\xff\xff" + b"xyz")
        self.assertEqual((fragment.id, fragment.number, fragment.final,
                          fragment.contents), (5, 0x7FFF, True, b"xyz"))
        self.assertEqual(fragment, Fragment(5, 0x7FFF, True, b"xyz"))
        self.assertNotEqual(fragment, Fragment(5, 0x7FFF, False, b"xyz"))

    def test_decode_short(self):
        """A payload under 10 bytes is BAD_FRAGMENT (mosh aborts on it)."""
        for n in range(FRAGMENT_HEADER_SIZE):
            e = self.assertRaises(DatagramDropped, Fragment.decode, b"\0" * n)
            self.assertEqual(e.reason, DropReason.BAD_FRAGMENT)
        self.assertEqual(Fragment.decode(b"\0" * 10).contents, b"")

    def test_number_limit(self):
        """Fragment numbers of 2**15 and above are refused when encoding."""
        Fragment(1, MAX_FRAGMENTS - 1, True, b"x").encode()
        for number in (MAX_FRAGMENTS, 2**16, -1):
            self.assertRaises(ValueError,
                              Fragment(1, number, True, b"x").encode)

    @settings(max_examples=50, deadline=None)
    @given(st.integers(0, 2**64 - 1), st.integers(0, MAX_FRAGMENTS - 1),
           st.booleans(), st.binary(max_size=64))
    def test_round_trip(self, id, number, final, contents):
        """Any valid fragment decodes to itself."""
        fragment = Fragment(id, number, final, contents)
        self.assertEqual(Fragment.decode(fragment.encode()), fragment)


class FragmenterTests(SynchronousTestCase):
    """Fragmenter numbers instructions and cuts them to size."""

    def test_first_id_is_one(self):
        """The first instruction gets id 1 (counter incremented before use)."""
        fragments = Fragmenter().make_fragments(b"zlib", "key", 100)
        self.assertEqual([(f.id, f.number, f.final, f.contents)
                          for f in fragments], [(1, 0, True, b"zlib")])

    def test_same_instruction_keeps_id(self):
        """A retransmission of the same instruction keeps its id."""
        fragmenter = Fragmenter()
        fragmenter.make_fragments(b"zlib", "key", 100)
        self.assertEqual(fragmenter.make_fragments(b"zlib", "key", 100)[0].id,
                         1)

    def test_new_instruction_new_id(self):
        """Another instruction, or another size, gets the next id."""
        fragmenter = Fragmenter()
        fragmenter.make_fragments(b"zlib", "key", 100)
        make = fragmenter.make_fragments
        self.assertEqual(make(b"zlib", "other", 100)[0].id, 2)
        self.assertEqual(make(b"zlib", "other", 99)[0].id, 3)

    def test_cut(self):
        """2500 bytes at 1214 per fragment: 1214, 1214, 72, last final."""
        data = bytes(range(256)) * 9 + bytes(196)
        fragments = Fragmenter().make_fragments(data, 1, 1214)
        self.assertEqual([len(f.contents) for f in fragments],
                         [1214, 1214, 72])
        self.assertEqual([f.number for f in fragments], [0, 1, 2])
        self.assertEqual([f.final for f in fragments], [False, False, True])
        self.assertEqual(b"".join(f.contents for f in fragments), data)

    def test_exact_multiple(self):
        """A size that is an exact multiple gives no empty last fragment."""
        fragments = Fragmenter().make_fragments(b"x" * 20, 1, 10)
        self.assertEqual([len(f.contents) for f in fragments], [10, 10])
        self.assertTrue(fragments[-1].final)

    def test_limits(self):
        """Empty input, a bad size or over 2**15 fragments are refused."""
        fragmenter = Fragmenter()
        self.assertRaises(ValueError, fragmenter.make_fragments, b"", 1, 10)
        self.assertRaises(ValueError, fragmenter.make_fragments, b"x", 1, 0)
        self.assertRaises(ValueError, fragmenter.make_fragments,
                          b"x" * (MAX_FRAGMENTS + 1), 1, 1)
        fragments = fragmenter.make_fragments(b"x" * MAX_FRAGMENTS, 1, 1)
        self.assertEqual(fragments[-1].number, MAX_FRAGMENTS - 1)
        fragments[-1].encode()
        self.assertEqual(fragmenter.next_id, 1)


def pieces(data, id=7, size=3):
    """``data`` cut into ``size``-byte fragments of instruction ``id``."""
    return [Fragment(id, f.number, f.final, f.contents)
            for f in Fragmenter().make_fragments(data, None, size)]


class FragmentAssemblyTests(SynchronousTestCase):
    """FragmentAssembly joins one instruction id at a time."""

    def setUp(self):
        self.assembly = FragmentAssembly()

    def test_single(self):
        """A lone final fragment 0 is complete at once."""
        self.assertEqual(self.assembly.add(Fragment(1, 0, True, b"abc")),
                         b"abc")

    def test_in_order(self):
        """Fragments in order complete on the last."""
        results = [self.assembly.add(f) for f in pieces(b"abcdefgh")]
        self.assertEqual(results, [None, None, b"abcdefgh"])
        self.assertEqual(self.assembly.pending_bytes, 0)

    def test_reversed(self):
        """Fragments in reverse order complete on the first one."""
        results = [self.assembly.add(f) for f in reversed(pieces(b"abcdefgh"))]
        self.assertEqual(results, [None, None, b"abcdefgh"])

    def test_duplicates(self):
        """A repeated identical fragment is accepted once."""
        first, second, third = pieces(b"abcdefgh")
        for fragment in (first, first, third, third):
            self.assertIsNone(self.assembly.add(fragment))
        self.assertEqual(self.assembly.add(second), b"abcdefgh")

    def test_new_id_discards(self):
        """A fragment of another id discards the partial assembly."""
        old = pieces(b"abcdefgh", id=7)
        new = pieces(b"ABCDEF", id=8)
        self.assembly.add(old[0])
        self.assembly.add(new[0])
        self.assertIsNone(self.assembly.add(old[1]))  # id 7 again: restart
        self.assertIsNone(self.assembly.add(new[1]))  # restart, lacks 0
        self.assertEqual(self.assembly.add(new[0]), b"ABCDEF")

    def test_changed_duplicate(self):
        """A repeated fragment with other contents is FRAGMENT_MISMATCH."""
        self.assembly.add(Fragment(3, 0, False, b"abc"))
        e = self.assertRaises(DatagramDropped, self.assembly.add,
                              Fragment(3, 0, False, b"abd"))
        self.assertEqual(e.reason, DropReason.FRAGMENT_MISMATCH)
        self.assertEqual(self.assembly.pending_bytes, 0)

    def test_beyond_final(self):
        """A fragment numbered past the final one is FRAGMENT_MISMATCH."""
        self.assembly.add(Fragment(3, 1, True, b"abc"))
        e = self.assertRaises(DatagramDropped, self.assembly.add,
                              Fragment(3, 2, False, b"abc"))
        self.assertEqual(e.reason, DropReason.FRAGMENT_MISMATCH)

    def test_final_before_held(self):
        """A final fragment below one already held is FRAGMENT_MISMATCH."""
        self.assembly.add(Fragment(3, 2, False, b"abc"))
        e = self.assertRaises(DatagramDropped, self.assembly.add,
                              Fragment(3, 1, True, b"abc"))
        self.assertEqual(e.reason, DropReason.FRAGMENT_MISMATCH)

    def test_two_finals(self):
        """Two different final fragments of one id are FRAGMENT_MISMATCH."""
        self.assembly.add(Fragment(3, 2, True, b"abc"))
        e = self.assertRaises(DatagramDropped, self.assembly.add,
                              Fragment(3, 1, True, b"abc"))
        self.assertEqual(e.reason, DropReason.FRAGMENT_MISMATCH)

    def test_too_large(self):
        """Held bytes are capped: past max_bytes the instruction is dropped."""
        assembly = FragmentAssembly(max_bytes=5)
        assembly.add(Fragment(1, 0, False, b"abc"))
        e = self.assertRaises(DatagramDropped, assembly.add,
                              Fragment(1, 1, False, b"def"))
        self.assertEqual(e.reason, DropReason.TOO_LARGE)
        self.assertEqual(assembly.pending_bytes, 0)
        e = self.assertRaises(DatagramDropped, assembly.add,
                              Fragment(2, 0, True, b"abcdef"))
        self.assertEqual(e.reason, DropReason.TOO_LARGE)
        e = self.assertRaises(DatagramDropped, assembly.add_payload,
                              Fragment(3, 0, True, b"abcdef").encode())
        self.assertEqual(e.reason, DropReason.TOO_LARGE)
        self.assertEqual(assembly.add(Fragment(4, 0, True, b"abcde")),
                         b"abcde")

    def test_tiny_fragments_bounded_by_count(self):
        """One-byte fragments cannot hold many times max_bytes of memory: past
        max_bytes // FRAGMENT_COST of them the instruction is dropped."""
        assembly = FragmentAssembly(max_bytes=64 * 1024)
        held = 64 * 1024 // FRAGMENT_COST
        for number in range(held):
            self.assertIsNone(assembly.add(Fragment(1, number, False, b"x")))
        self.assertEqual(assembly.pending_bytes, held)
        e = self.assertRaises(DatagramDropped, assembly.add, Fragment(1, held, False, b"x"))
        self.assertEqual(e.reason, DropReason.TOO_LARGE)
        self.assertEqual(assembly.pending_bytes, 0)

    def test_mtu_sized_fragments_fill_max_bytes(self):
        """Fragments of a real peer's size still fill the whole max_bytes."""
        assembly = FragmentAssembly(max_bytes=64 * 1024)
        piece = b"y" * 1300
        count = 64 * 1024 // len(piece)
        for number in range(count - 1):
            self.assertIsNone(assembly.add(Fragment(2, number, False, piece)))
        joined = assembly.add(Fragment(2, count - 1, True, piece))
        self.assertEqual(joined, piece * count)

    def test_high_number_bounded(self):
        """One fragment numbered 32767 holds only its own bytes."""
        self.assertIsNone(self.assembly.add(Fragment(1, 0x7FFF, False, b"x")))
        self.assertEqual(self.assembly.pending_bytes, 1)

    def test_duplicate_after_completion(self):
        """A duplicate of a finished instruction completes again (mosh)."""
        fragment = Fragment(9, 0, True, b"abc")
        self.assertEqual(self.assembly.add(fragment), b"abc")
        self.assertEqual(self.assembly.add(fragment), b"abc")
        self.assertEqual(self.assembly.add_payload(fragment.encode()), b"abc")

    def test_add_payload_short(self):
        """add_payload refuses a payload under 10 bytes as BAD_FRAGMENT."""
        e = self.assertRaises(DatagramDropped, self.assembly.add_payload,
                              b"\0" * 9)
        self.assertEqual(e.reason, DropReason.BAD_FRAGMENT)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 4),
                              st.booleans(), st.binary(max_size=4)),
                    max_size=12))
    def test_add_payload_matches_add(self, specs):
        """add_payload(f.encode()) behaves exactly like add(f)."""
        slow, fast = FragmentAssembly(max_bytes=10), FragmentAssembly(
            max_bytes=10)
        for id, number, final, contents in specs:
            fragment = Fragment(id, number, final, contents)
            outcomes = []
            for call in (lambda: slow.add(fragment),
                         lambda: fast.add_payload(fragment.encode())):
                try:
                    outcomes.append(call())
                except DatagramDropped as e:
                    outcomes.append(e.reason)
            self.assertEqual(outcomes[0], outcomes[1])
            self.assertEqual(slow.pending_bytes, fast.pending_bytes)

    @settings(max_examples=40, deadline=None)
    @given(st.binary(min_size=1, max_size=200), st.integers(1, 40),
           st.randoms(use_true_random=False))
    def test_any_order(self, data, size, rnd):
        """Shuffled and duplicated fragments assemble to the input."""
        fragments = pieces(data, size=size)
        shuffled = fragments + rnd.sample(fragments, len(fragments) // 2)
        rnd.shuffle(shuffled)
        assembly = FragmentAssembly()
        results = [r for r in map(assembly.add, shuffled)
                   if r is not None]
        self.assertEqual(results[0], data)
