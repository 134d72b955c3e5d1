"""The transport instruction: protobuf, zlib, and size limits (ssp-mosh.md 6).

An instruction says "state ``new_num`` is state ``old_num`` plus ``diff``",
acknowledges the peer's ``ack_num`` and lets the peer forget states below
``throwaway_num``.  It travels as zlib(protobuf); mosh sets all seven fields
in order, including empty ``diff`` and ``chaff``, and we do the same so the
bytes match mosh's exactly.
"""

import zlib
from typing import NamedTuple

from google.protobuf.message import DecodeError

from broker.ssp.crypto import OVERHEAD
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.fragment import FRAGMENT_HEADER_SIZE
from broker.ssp.transportinstruction_pb2 import Instruction as _PBInstruction

_pb_from_string = _PBInstruction.FromString

PROTOCOL_VERSION = 2  # network.h MOSH_PROTOCOL_VERSION ("bumped for echo-ack")
UINT64_MAX = 2**64 - 1  # new_num: "shutting down"; ack_num: "shutdown acked"

MTU_IPV4 = 1252  # network.h: 1280 - 20 (IPv4) - 8 (UDP)
MTU_IPV6 = 1216  # network.h: 1280 - 40 - 16 (two extension headers) - 8
DEFAULT_SEND_MTU = 500  # network.h: before the address family is known
DATAGRAM_ADDED_BYTES = 4  # network.h Connection::ADDED_BYTES less the nonce
# compressor.h: mosh's inflate buffer is 2048 * 2048 bytes.
MOSH_MAX_INFLATED = 2048 * 2048
DEFAULT_MAX_INFLATED = 1 << 20  # ours: serialized instruction cap, bytes
# Deflate expands at most 1032:1 (a 258-byte match per 2 bits), so input
# shorter than cap / 1032 cannot inflate past the cap.
MAX_DEFLATE_RATIO = 1032


def fragment_payload_size(mtu: int, header_size: int = 0) -> int:
    """Most compressed-instruction bytes one fragment may carry.

    mtu less the framing header (0 for mosh, 17 for the broker), nonce and
    tag (24), timestamps (4) and fragment header (10): mosh 1214 / 1178,
    broker 1197 / 1161 (transportsender-impl.h, Connection::set_MTU).
    """
    size = (mtu - header_size - OVERHEAD - DATAGRAM_ADDED_BYTES
            - FRAGMENT_HEADER_SIZE)
    if size < 1:
        raise ValueError(f"MTU {mtu} leaves no room for a fragment")
    return size


class Instruction(NamedTuple):
    """One transport instruction (TransportBuffers.Instruction).

    An immutable value; a NamedTuple rather than a frozen dataclass because
    one is built for every datagram received and tuple construction costs a
    fraction of a frozen dataclass's ``__init__``.  Build it with keywords.
    """

    protocol_version: int = PROTOCOL_VERSION
    old_num: int = 0
    new_num: int = 0
    ack_num: int = 0
    throwaway_num: int = 0
    diff: bytes = b""
    chaff: bytes = b""

    def fragment_key(self) -> tuple:
        """What the Fragmenter compares to decide on a new instruction id:
        every field but the diff (``Fragmenter::make_fragments``)."""
        return (self.protocol_version, self.old_num, self.new_num,
                self.ack_num, self.throwaway_num, self.chaff)


_new_instruction = tuple.__new__


# Idle protobuf messages for reuse: building one with seven keywords costs
# about a third of a small instruction's serialization. Every field is set
# on every use (proto2: set means present, zeros included), so nothing
# carries over (tests/ssp/test_instruction.py checks it). Taking one from
# the list and putting it back are atomic, so threads never share one; one
# that failed is not put back.
_idle_messages: list = []


def serialize_instruction(inst: Instruction) -> bytes:
    """Protobuf bytes with all seven fields, in field order (as mosh)."""
    try:
        message = _idle_messages.pop()
    except IndexError:
        message = _PBInstruction()
    (message.protocol_version, message.old_num, message.new_num,
     message.ack_num, message.throwaway_num, message.diff,
     message.chaff) = inst
    data = message.SerializeToString()
    message.diff = b""  # hold no diff while idle
    _idle_messages.append(message)
    return data


# zlib.compress() sets up deflate with memLevel 8: a 64 KiB hash table to
# clear and 64 KiB of symbol buffer, several times the cost of compressing
# an ack. memLevel 1 (a 256-entry table, a block per 127 symbols) gives the
# same bytes for inputs this short: the same level, window and so header,
# fewer symbols than one block holds, and no hash chain long enough for the
# smaller table to change which match is found (tests check byte identity).
SMALL_INSTRUCTION = 96  # bytes of protobuf; acks and small diffs
_SMALL_MEM_LEVEL = 1
_compressobj = zlib.compressobj
_DEFLATED = zlib.DEFLATED
_DEFAULT_LEVEL = 6  # zlib's Z_DEFAULT_COMPRESSION, as mosh's compress2()
_WINDOW_BITS = 15


#: The compiled module's deflate (broker.ssp.speedups installs it): the
#: same bytes from one zlib stream it keeps and resets, where setting one up
#: here costs several times the compressing. None: not built, or turned off.
_compiled_deflate = None


def install_compiled_deflate(compiled) -> None:
    """Use ``compiled(raw)`` (bytes, or None where it cannot say) for short
    instructions; None goes back to Python's zlib alone."""
    global _compiled_deflate
    _compiled_deflate = compiled


def deflate(raw: bytes) -> bytes:
    """One zlib stream at zlib's default level and window, as mosh makes."""
    if len(raw) > SMALL_INSTRUCTION:
        return zlib.compress(raw)
    compiled = _compiled_deflate
    if compiled is not None and type(raw) is bytes:   # (it takes bytes only)
        deflated = compiled(raw)
        if deflated is not None:
            return deflated
    compressor = _compressobj(_DEFAULT_LEVEL, _DEFLATED, _WINDOW_BITS,
                              _SMALL_MEM_LEVEL)
    return compressor.compress(raw) + compressor.flush()


def encode_instruction(inst: Instruction) -> bytes:
    """zlib(protobuf) at zlib's default level, byte-identical to mosh."""
    return deflate(serialize_instruction(inst))


def inflate(data: bytes, max_inflated: int = DEFAULT_MAX_INFLATED) -> bytes:
    """Inflate one zlib stream, refusing more than ``max_inflated`` bytes.

    The cap is enforced while inflating (max_length), so a zlib bomb costs
    at most ``max_inflated`` bytes of memory.  Bytes after the end of the
    stream are ignored, as zlib's ``uncompress()`` in mosh ignores them.
    """
    if max_inflated < 1:
        raise ValueError("max_inflated must be positive")
    if len(data) * MAX_DEFLATE_RATIO < max_inflated:
        # Too short to inflate past the cap: one call, no inflater object.
        try:
            return zlib.decompress(data)
        except zlib.error as e:
            raise DatagramDropped(DropReason.BAD_ZLIB, str(e)) from None
    inflater = zlib.decompressobj()
    try:
        # One byte over the cap tells "too large" from "exactly the cap".
        raw = inflater.decompress(data, max_inflated + 1)
    except zlib.error as e:
        raise DatagramDropped(DropReason.BAD_ZLIB, str(e)) from None
    if len(raw) > max_inflated:
        raise DatagramDropped(DropReason.TOO_LARGE,
                              f"instruction inflates past {max_inflated} "
                              "bytes")
    if not inflater.eof:
        raise DatagramDropped(DropReason.BAD_ZLIB,
                              "incomplete or truncated zlib stream")
    return raw


def parse_instruction(raw) -> Instruction:
    """Instruction from protobuf bytes.

    Raises DatagramDropped BAD_INSTRUCTION (unparseable; mosh aborts) or
    BAD_VERSION (protocol_version other than 2, absent included).
    """
    try:
        message = _pb_from_string(raw)
    except DecodeError as e:
        raise DatagramDropped(DropReason.BAD_INSTRUCTION, str(e)) from None
    version = message.protocol_version
    if version != PROTOCOL_VERSION:
        raise DatagramDropped(DropReason.BAD_VERSION,
                              f"protocol version {version}, expected "
                              f"{PROTOCOL_VERSION}")
    return _new_instruction(Instruction, (
        version, message.old_num, message.new_num, message.ack_num,
        message.throwaway_num, message.diff, message.chaff))


def decode_instruction(data, max_inflated: int = DEFAULT_MAX_INFLATED
                       ) -> Instruction:
    """Instruction from the joined fragment contents (zlib(protobuf)).

    Raises DatagramDropped BAD_ZLIB / TOO_LARGE / BAD_INSTRUCTION /
    BAD_VERSION.
    """
    return parse_instruction(inflate(data, max_inflated))
