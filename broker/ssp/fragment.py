"""Transport fragments and their reassembly (ssp-mosh.md section 5).

A compressed instruction is cut into slices that fit one datagram, each
behind a 10-byte header: instruction id (u64 BE), then a u16 BE whose bit 15
is the final flag and bits 0..14 the fragment number.  The receiver
assembles one instruction id at a time, as mosh does
(``src/network/transportfragment.cc``), but where mosh asserts or aborts on
inconsistent input we drop the datagram and go on.
"""

import struct

from broker.ssp.errors import DatagramDropped, DropReason

FRAGMENT_HEADER_SIZE = 10  # transportfragment.h Fragment::frag_header_len
MAX_FRAGMENTS = 1 << 15  # fragment numbers are 15 bits
FINAL_BIT = 0x8000
DEFAULT_MAX_ASSEMBLY = 1 << 20  # bytes of compressed instruction held at most
# What one held fragment costs beside its bytes (a bytes object and a dict
# entry, about 100 bytes in CPython): fragments held at most are max_bytes
# over this (at least MIN_HELD_FRAGMENTS), so that tiny fragments cannot
# hold many times max_bytes of memory. A real peer's fragments are
# MTU-sized (about 1300 bytes), far above it.
FRAGMENT_COST = 128
MIN_HELD_FRAGMENTS = 8

_HEADER = struct.Struct(">QH")
_header_unpack_from = _HEADER.unpack_from
_header_pack = _HEADER.pack


class Fragment:
    """One slice of a compressed instruction."""

    __slots__ = ("id", "number", "final", "contents")

    def __init__(self, id: int, number: int, final: bool,
                 contents: bytes) -> None:
        self.id = id
        self.number = number
        self.final = final
        self.contents = contents

    def __repr__(self) -> str:
        return (f"Fragment(id={self.id}, number={self.number}, "
                f"final={self.final}, contents=<{len(self.contents)} bytes>)")

    def __eq__(self, other):
        if not isinstance(other, Fragment):
            return NotImplemented
        return (self.id == other.id and self.number == other.number
                and self.final == other.final
                and self.contents == other.contents)

    __hash__ = None

    def encode(self) -> bytes:
        """Header + contents; always at least 10 bytes (mosh needs that)."""
        if not 0 <= self.number < MAX_FRAGMENTS:
            # mosh aborts on a fragment number that does not fit 15 bits.
            raise ValueError(f"fragment number {self.number} does not fit "
                             "15 bits")
        word = self.number | FINAL_BIT if self.final else self.number
        return _header_pack(self.id, word) + self.contents

    @classmethod
    def decode(cls, data) -> "Fragment":
        """Parse a datagram payload; DatagramDropped(BAD_FRAGMENT) if short."""
        if len(data) < FRAGMENT_HEADER_SIZE:
            # mosh fatal_asserts here: an authentic short payload kills it.
            raise DatagramDropped(
                DropReason.BAD_FRAGMENT,
                f"{len(data)} payload bytes, fragment header needs "
                f"{FRAGMENT_HEADER_SIZE}")
        id, word = _header_unpack_from(data)
        return cls(id, word & 0x7FFF, word >= FINAL_BIT,
                   bytes(data[FRAGMENT_HEADER_SIZE:]))


class Fragmenter:
    """Cuts compressed instructions into fragments, numbering instructions.

    The id goes up (first id 1) whenever the instruction differs from the
    previous one in anything but the diff, or the payload size changed
    (``Fragmenter::make_fragments``).  Retransmitting the same instruction
    keeps its id, so the peer may combine fragments of both sends.
    """

    __slots__ = ("next_id", "_last_key", "_last_size")

    def __init__(self) -> None:
        self.next_id = 0
        self._last_key = None
        self._last_size = None

    def make_fragments(self, compressed: bytes, instruction_key,
                       max_payload: int) -> list[Fragment]:
        """Fragments for one compressed instruction.

        ``instruction_key`` is compared with == against the previous call's
        (pass ``instruction.fragment_key()`` or the instruction itself);
        ``max_payload`` is the most contents bytes per fragment (e.g.
        ``broker.ssp.instruction.fragment_payload_size``).
        """
        if max_payload < 1:
            raise ValueError(f"max_payload must be positive, "
                             f"got {max_payload}")
        if not compressed:
            raise ValueError("compressed instruction is empty")
        count = -(-len(compressed) // max_payload)
        if count > MAX_FRAGMENTS:
            raise ValueError(f"instruction needs {count} fragments, "
                             f"at most {MAX_FRAGMENTS} fit 15 bits")
        if (self._last_key is None or instruction_key != self._last_key
                or max_payload != self._last_size):
            self.next_id += 1
        self._last_key = instruction_key
        self._last_size = max_payload
        id = self.next_id
        if count == 1:
            return [Fragment(id, 0, True, compressed)]
        last = count - 1
        return [Fragment(id, n, n == last,
                         compressed[n * max_payload:(n + 1) * max_payload])
                for n in range(count)]


class FragmentAssembly:
    """Joins the fragments of one instruction id at a time.

    A fragment with another id discards the partial assembly and starts
    anew (mosh: ``FragmentAssembly::add_fragment``).  The bytes held are
    bounded by ``max_bytes``, and the fragments held by ``max_bytes`` over
    FRAGMENT_COST; an instruction past either is dropped as TOO_LARGE.  After a complete instruction the id is kept, so a duplicate
    of a finished single-fragment instruction completes again (as in mosh:
    harmless, the receiver already knows its state number).
    """

    __slots__ = ("current_id", "max_bytes", "_parts", "_total", "_size")

    def __init__(self, max_bytes: int = DEFAULT_MAX_ASSEMBLY) -> None:
        self.max_bytes = max_bytes
        self.current_id = None
        # None while nothing is held: an idle session keeps no dict.
        self._parts: dict[int, bytes] | None = None
        self._total = -1  # number of fragments once the final one arrived
        self._size = 0

    @property
    def pending_bytes(self) -> int:
        """Compressed bytes held for an incomplete instruction."""
        return self._size

    def _reset(self) -> None:
        self._parts = None
        self._total = -1
        self._size = 0

    def add_payload(self, payload: bytes) -> bytes | None:
        """Decode a datagram payload and add it: ``add(Fragment.decode(p))``
        without building a Fragment for a single-fragment instruction (the
        per-datagram hot path).  Raises DatagramDropped like both."""
        if len(payload) < FRAGMENT_HEADER_SIZE:
            raise DatagramDropped(
                DropReason.BAD_FRAGMENT,
                f"{len(payload)} payload bytes, fragment header needs "
                f"{FRAGMENT_HEADER_SIZE}")
        id, word = _header_unpack_from(payload)
        if word == FINAL_BIT and id != self.current_id:
            # Fragment 0 and final: a whole instruction in one datagram.
            self.current_id = id
            if self._parts:
                self._reset()
            if len(payload) - FRAGMENT_HEADER_SIZE > self.max_bytes:
                raise DatagramDropped(
                    DropReason.TOO_LARGE,
                    f"instruction of {len(payload) - FRAGMENT_HEADER_SIZE} "
                    "compressed bytes")
            return payload[FRAGMENT_HEADER_SIZE:]
        return self.add(Fragment(id, word & 0x7FFF, word >= FINAL_BIT,
                                 payload[FRAGMENT_HEADER_SIZE:]))

    def add(self, fragment: Fragment) -> bytes | None:
        """Store a fragment; return the joined compressed instruction when
        complete, else None.  Raises DatagramDropped FRAGMENT_MISMATCH or
        TOO_LARGE (and forgets the partial assembly)."""
        number = fragment.number
        contents = fragment.contents
        if fragment.id != self.current_id:
            self.current_id = fragment.id
            if self._parts:
                self._reset()
            if fragment.final and number == 0:
                # The common case: a whole instruction in one datagram.
                if len(contents) > self.max_bytes:
                    raise DatagramDropped(
                        DropReason.TOO_LARGE,
                        f"instruction of {len(contents)} compressed bytes")
                return contents
        parts = self._parts
        if parts is None:
            parts = self._parts = {}
        old = parts.get(number)
        if old is not None:
            if old != contents:
                self._reset()
                raise DatagramDropped(DropReason.FRAGMENT_MISMATCH,
                                      f"fragment {number} of instruction "
                                      f"{fragment.id} changed")
        else:
            if 0 <= self._total <= number:
                self._reset()
                raise DatagramDropped(DropReason.FRAGMENT_MISMATCH,
                                      f"fragment {number} after final "
                                      f"fragment {self._total - 1}")
            size = self._size + len(contents)
            if size > self.max_bytes:
                self._reset()
                raise DatagramDropped(DropReason.TOO_LARGE,
                                      f"instruction over {self.max_bytes} "
                                      "compressed bytes")
            held = max(MIN_HELD_FRAGMENTS, self.max_bytes // FRAGMENT_COST)
            if len(parts) >= held:
                self._reset()
                raise DatagramDropped(DropReason.TOO_LARGE,
                                      f"more than {held} fragments held")
            parts[number] = contents
            self._size = size
        if fragment.final:
            if self._total not in (-1, number + 1) or max(parts) > number:
                self._reset()
                raise DatagramDropped(DropReason.FRAGMENT_MISMATCH,
                                      f"final fragment {number} contradicts "
                                      "the fragments held")
            self._total = number + 1
        if len(parts) != self._total:
            return None
        joined = b"".join([parts[n] for n in range(self._total)])
        self._reset()
        return joined
