"""Makers of odd datagrams for the differential tests of the compiled path.

The compiled receive path takes only the usual datagram whole and must
hand everything else to the Python code, with the same outcome; a real
peer sends few unusual ones, so these build them by hand, byte by byte
where broker.ssp's encoders would not: protobuf oddities (unknown, repeated,
non-minimal fields), zlib oddities, named CBOR diffs canonical or not,
instruction numbers in every relation to the receiver's, fragments out of
order, short plaintexts, the wrong direction, and damaged copies of real
datagrams (:func:`corrupt`).
"""

import struct
import zlib

import cbor2

from broker.ssp.crypto import seal
from broker.ssp.datagram import NO_TIMESTAMP, timestamp16
from broker.ssp.fragment import FINAL_BIT
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.instruction import (PROTOCOL_VERSION, UINT64_MAX, Instruction,
                                    serialize_instruction)
from broker.ssp.instruction import deflate as encode_zlib


def varint(value: int, pad: int = 0) -> bytes:
    """Protobuf base-128 varint; ``pad`` extra continuation bytes (a
    non-minimal encoding of the same value)."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value or pad:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
        if not value:
            out += b"\x80" * (pad - 1) + b"\x00"
            return bytes(out)


def _key(number, wire, pad=0) -> bytes:
    return varint(number << 3 | wire, pad)


PROTO_ODDITIES = (
    "plain", "reordered", "unknown_varint", "unknown_bytes", "unknown_fixed",
    "repeated", "diff_twice", "nonminimal", "version1", "version_absent",
    "version_wide", "omit_defaults", "wrong_wiretype", "truncated",
    "overlong_varint", "varint_overflow", "group", "field_zero", "packed_like")


def protobuf(inst: Instruction, oddity: str = "plain") -> bytes:
    """``inst`` serialized, with one protobuf ``oddity`` (PROTO_ODDITIES)."""
    if oddity == "plain":
        return serialize_instruction(inst)
    pad = 2 if oddity == "nonminimal" else 0
    version, old, new, ack, throwaway, diff, chaff = inst
    parts = [_key(number, 0, pad) + varint(value, pad) for number, value
             in ((1, version), (2, old), (3, new), (4, ack), (5, throwaway))]
    parts += [_key(number, 2, pad) + varint(len(data), pad) + data
              for number, data in ((6, diff), (7, chaff))]
    if oddity == "reordered":
        parts.reverse()
    elif oddity == "unknown_varint":
        parts.insert(3, _key(8, 0) + varint(12345))
    elif oddity == "unknown_bytes":
        parts.append(_key(99, 2) + varint(3) + b"xyz")
    elif oddity == "unknown_fixed":
        parts.insert(1, _key(20, 1) + bytes(range(8)))
        parts.append(_key(21, 5) + b"\x01\x02\x03\x04")
    elif oddity == "repeated":
        parts[:0] = [_key(2, 0) + varint(old + 3),
                     _key(3, 0) + varint(new + 7),
                     _key(5, 0) + varint(throwaway + 1)]
    elif oddity == "diff_twice":
        parts.insert(0, _key(6, 2) + varint(2) + b"\xff\xff")
    elif oddity == "version1":
        parts[0] = _key(1, 0) + varint(1)
    elif oddity == "version_absent":
        del parts[0]
    elif oddity == "version_wide":
        parts[0] = _key(1, 0) + varint(version + 2**32)  # a uint32 field
    elif oddity == "omit_defaults":
        values = (version, old, new, ack, throwaway, diff, chaff)
        parts = [part for part, value in zip(parts, values) if value]
    elif oddity == "wrong_wiretype":
        parts[1] = _key(2, 1) + old.to_bytes(8, "little")
    elif oddity == "truncated":
        return b"".join(parts)[:-1]
    elif oddity == "overlong_varint":
        parts[2] = _key(3, 0) + b"\xff" * 10 + b"\x01"
    elif oddity == "varint_overflow":
        parts[2] = _key(3, 0) + b"\xff" * 9 + b"\x7f"
    elif oddity == "group":
        parts.insert(2, _key(9, 3) + _key(1, 0) + varint(5) + _key(9, 4))
    elif oddity == "field_zero":
        parts.append(_key(0, 0) + varint(1))
    elif oddity == "packed_like":
        parts[3] = _key(4, 2) + varint(2) + varint(ack & 0x7F) + b"\x01"
    return b"".join(parts)


ZLIB_ODDITIES = ("default", "level9", "stored", "trailing", "truncated",
                 "garbage", "raw_deflate", "gzip", "empty")


def compress(raw: bytes, oddity: str = "default") -> bytes:
    """``raw`` compressed as mosh does, or with one ``oddity``
    (ZLIB_ODDITIES)."""
    if oddity == "default":
        return encode_zlib(raw)
    if oddity == "level9":
        return zlib.compress(raw, 9)
    if oddity == "stored":
        return zlib.compress(raw, 0)
    if oddity == "trailing":
        return encode_zlib(raw) + b"\x00junk"
    if oddity == "truncated":
        return encode_zlib(raw)[:-3]
    if oddity == "garbage":
        return b"\x78\x9c" + raw
    if oddity == "empty":
        return b""
    wbits = -15 if oddity == "raw_deflate" else 31
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(raw) + packer.flush()


def values_diff(patch) -> bytes:
    """The canonical CBOR diff that merges ``patch`` into the values."""
    return cbor2.dumps({0: patch}, canonical=True)


#: Diffs a peer could send (hex, or bytes), named: the usual shapes the
#: fast path takes, and every unusual one it must hand over.
CBOR_DIFFS = {
    "heartbeat": b"",
    "one_int": values_diff({"a": 5}),
    "every_scalar": values_diff({
        "t": "é☃", "b": b"\x00\xff", "i": -7, "u": 2**64 - 1, "n": -(2**64),
        "h": 1.5, "s": 0.1, "d": 1e300, "z": -0.0, "y": True, "f": False}),
    "delete": values_diff({"a": None}),
    "delete_absent": values_diff({"never-set": None}),
    "empty_values": bytes.fromhex("a100a0"),
    "ack_request": bytes.fromhex("a0"),
    "same_value": values_diff({"a": 5}),
    "int_then_float": values_diff({"a": 5.0}),
    "int_then_bool": values_diff({"a": True}),
    "noncanonical_int": bytes.fromhex("a100a161611805"),
    "noncanonical_int32": bytes.fromhex("a100a161611a00000005"),
    "noncanonical_int64": bytes.fromhex("a100a1616b1b0000000000000005"),
    "noncanonical_key0": bytes.fromhex("a11800a1616101"),
    "noncanonical_len": bytes.fromhex("a100a178016101"),
    "noncanonical_map_len": bytes.fromhex("b80100b8016161f5"),
    "unsorted_keys": bytes.fromhex("a100a2616201616101"),
    "neg_min": bytes.fromhex("a100a161613bffffffffffffffff"),
    "neg_2_63": bytes.fromhex("a100a161613b7fffffffffffffff"),
    "uint_max": bytes.fromhex("a100a161611bffffffffffffffff"),
    "half_subnormal": bytes.fromhex("a100a16161f90001"),
    "half_inf": bytes.fromhex("a100a16161f97c00"),
    "half_neg_inf": bytes.fromhex("a100a16161f9fc00"),
    "half_neg_zero": bytes.fromhex("a100a16161f98000"),
    "half_max": bytes.fromhex("a100a16161f97bff"),
    "single_1_5": bytes.fromhex("a100a16161fa3fc00000"),
    "single_subnormal": bytes.fromhex("a100a16161fa00000001"),
    "double_1_5": bytes.fromhex("a100a16161fb3ff8000000000000"),
    "double_min": bytes.fromhex("a100a16161fb0000000000000001"),
    "half_nan": bytes.fromhex("a100a16161f97e00"),
    "single_nan": bytes.fromhex("a100a16161fa7fc00000"),
    "double_nan": bytes.fromhex("a100a16161fb7ff8000000000000"),
    "half_nan_payload": bytes.fromhex("a100a16161f97e01"),
    "duplicate_value_key": bytes.fromhex("a100a2616101616102"),
    "duplicate_diff_key": bytes.fromhex("a200a000a0"),
    "indefinite_values": bytes.fromhex("a100bf616101ff"),
    "indefinite_diff": bytes.fromhex("bf00a1616101ff"),
    "indefinite_text_key": bytes.fromhex("a100a17f6161ff01"),
    "indefinite_text_value": bytes.fromhex("a100a161617f616261ff"),
    "indefinite_bytes": bytes.fromhex("a100a161615f4101ff"),
    "empty_indefinite_text": bytes.fromhex("a100a161617fff"),
    "tag_epoch": bytes.fromhex("a100a16161c101"),
    "tag_bignum": bytes.fromhex("a100a16161c24101"),
    "self_describe_diff": bytes.fromhex("d9d9f7a100a1616101"),
    "self_describe_value": bytes.fromhex("a100a16161d9d9f701"),
    "self_describe_key": bytes.fromhex("a100a1d9d9f7616101"),
    "trailing_byte": values_diff({"a": 1}) + b"\x00",
    "trailing_break": values_diff({"a": 1}) + b"\xff",
    "truncated": bytes.fromhex("a100a16161"),
    "stray_break": bytes.fromhex("ff"),
    "invalid_utf8_key": bytes.fromhex("a100a162c32801"),
    "invalid_utf8_value": bytes.fromhex("a100a1616161ff"),
    "surrogate_utf8": bytes.fromhex("a100a1616163eda080"),
    "overlong_utf8": bytes.fromhex("a100a1616162c0af"),
    "nul_in_key": bytes.fromhex("a100a162610001"),
    "empty_key": bytes.fromhex("a100a16001"),
    "float_key0": bytes.fromhex("a1f90000a1616101"),
    "neg_zero_key0": bytes.fromhex("a1f98000a1616101"),
    "false_key0": bytes.fromhex("a1f4a1616101"),
    "key0_noncanon_float": bytes.fromhex("a1fb0000000000000000a1616101"),
    "extra_diff_key": bytes.fromhex("a200a16161010501"),
    "key3": bytes.fromhex("a200a16161010301"),
    "values_array": bytes.fromhex("a10080"),
    "values_int": bytes.fromhex("a10001"),
    "values_null": bytes.fromhex("a100f6"),
    "int_value_key": bytes.fromhex("a100a10101"),
    "bytes_value_key": bytes.fromhex("a100a1416101"),
    "nested_array": bytes.fromhex("a100a16161820102"),
    "nested_map": bytes.fromhex("a100a16161a1616201"),
    "nested_null": bytes.fromhex("a100a1616182f601"),
    "nested_empty_map": bytes.fromhex("a100a16161a0"),
    "too_deep": bytes.fromhex("a100a16161" + "81" * 20 + "01"),
    "undefined": bytes.fromhex("a100a16161f7"),
    "simple16": bytes.fromhex("a100a16161f0"),
    "simple32": bytes.fromhex("a100a16161f820"),
    "huge_text_len": bytes.fromhex("a100a1617b0000000100000000"),
    "huge_map_len": bytes.fromhex("a100bb0000000100000000"),
    "events": bytes.fromhex("a201000281a1616b01"),
    "events_only_key1": bytes.fromhex("a10100"),
    "events_gap": bytes.fromhex("a2011864028101"),
    "values_and_events": bytes.fromhex("a300a161610101000281f5"),
    "not_a_map": bytes.fromhex("8101"),
    "bare_int": bytes.fromhex("01"),
    "many_values": values_diff({f"k{i}": i for i in range(12)}),
    "long_diff": values_diff({"blob": bytes(120)}),
}


#: Which instruction numbers a crafted instruction takes, relative to the
#: receiving session (see numbers()).
OLD_CHOICES = ("newest", "newest", "zero", "unknown", "oldest", "older")
NEW_CHOICES = ("next", "next", "skip", "same", "older", "max", "huge")
THROWAWAY_CHOICES = ("old", "newest", "zero", "above", "max")
ACK_CHOICES = ("front", "front", "back", "unknown", "max", "zero")


def numbers(session, old: str, new: str, throwaway: str, ack: str) -> tuple:
    """(old, new, ack, throwaway) numbers for an instruction to ``session``."""
    receiver, sender = session._receiver, session._sender
    held = receiver.nums
    newest = held[-1]
    old_num = {"newest": newest, "zero": 0, "unknown": newest + 1000,
               "oldest": held[0],
               "older": held[-2] if len(held) > 1 else newest}[old]
    new_num = {"next": newest + 1, "skip": newest + 3, "same": newest,
               "older": max(newest - 1, 0), "max": UINT64_MAX,
               "huge": 2**63}[new]
    throwaway_num = {"old": old_num, "newest": newest, "zero": 0,
                     "above": newest + 1, "max": UINT64_MAX}[throwaway]
    ack_num = {"front": sender.front_num, "back": sender.back_num,
               "unknown": sender.back_num + 50, "max": UINT64_MAX,
               "zero": 0}[ack]
    return tuple(min(num, UINT64_MAX)
                 for num in (old_num, new_num, ack_num, throwaway_num))


def seal_from(session, plaintext: bytes, *, direction=None, seq=None) -> bytes:
    """``plaintext`` sealed as ``session``'s next datagram (its key, header
    and sequence numbers), or with another ``direction`` or ``seq``."""
    link = session._link
    if seq is None:
        seq = link.next_seq
        link.next_seq = seq + 1
    return seal(session._ciphers.get(session._key),
                link.direction_out if direction is None else direction, seq,
                plaintext, session._header or b"")


def timestamps(now: float, reply=NO_TIMESTAMP) -> bytes:
    """The plaintext's two 16-bit timestamps: ``now``'s and ``reply``."""
    return struct.pack(">HH", timestamp16(now), reply)


def fragment_payloads(compressed: bytes, count: int, fragment_id: int,
                      order: str = "in") -> list:
    """The fragment payloads of one compressed instruction cut in ``count``
    (in order, reversed, with a duplicate, or the final one missing)."""
    size = max(1, -(-len(compressed) // count))
    pieces = [compressed[n * size:(n + 1) * size] for n in range(count)]
    payloads = [struct.pack(">QH", fragment_id,
                            n | (FINAL_BIT if n == count - 1 else 0)) + piece
                for n, piece in enumerate(pieces)]
    if order == "reversed":
        payloads.reverse()
    elif order == "duplicate":
        payloads.insert(0, payloads[0])
    elif order == "missing" and count > 1:
        del payloads[0]
    elif order == "not_final":
        payloads[-1] = struct.pack(">QH", fragment_id, count - 1) \
            + pieces[-1]
    return payloads


def craft(world, spec: dict, now: float) -> list:
    """The datagrams (sealed by the other side of ``world``) carrying one
    hand-made instruction to ``spec["target"]``; ``spec`` keys: target,
    old, new, throwaway, ack (choices above), diff (bytes), proto, zlib,
    fragments, order, plaintext ("ok", "reply", "no_ts", "short"),
    short (length), direction ("right", "wrong"), chaff."""
    target = world.session(spec["target"])
    source = world.session("broker" if spec["target"] == "device"
                           else "device")
    old, new, ack, throwaway = numbers(target, spec["old"], spec["new"],
                                       spec["throwaway"], spec["ack"])
    inst = tuple.__new__(Instruction, (PROTOCOL_VERSION, old, new, ack,
                                       throwaway, spec["diff"],
                                       spec.get("chaff", b"")))
    compressed = compress(protobuf(inst, spec.get("proto", "plain")),
                          spec.get("zlib", "default"))
    count = spec.get("fragments", 1)
    payloads = fragment_payloads(compressed, count,
                                 source._link.next_seq + 1,
                                 spec.get("order", "in"))
    kind = spec.get("plaintext", "ok")
    reply = {"ok": NO_TIMESTAMP, "reply": timestamp16(now - 0.04),
             "no_ts": NO_TIMESTAMP}.get(kind, NO_TIMESTAMP)
    direction = None
    if spec.get("direction") == "wrong":
        direction = 1 - source._link.direction_out
    out = []
    for payload in payloads:
        if kind == "no_ts":
            plaintext = (struct.pack(">HH", NO_TIMESTAMP, NO_TIMESTAMP)
                         + payload)
        else:
            plaintext = timestamps(now, reply) + payload
        if kind == "short":
            plaintext = plaintext[:spec.get("short", 5)]
        out.append(seal_from(source, plaintext, direction=direction))
    return out


CORRUPTIONS = ("flip", "truncate", "extend", "garbage", "empty",
               "header_version", "header_other", "header_zero", "header_short",
               "reflect", "splice", "nonce_flip", "tag_flip")


def corrupt(data: bytes, kind: str, position: int, extra: bytes,
            header: bool, other: bytes = b"") -> bytes:
    """``data`` damaged one way (CORRUPTIONS; ``reflect`` is done by the
    caller, which delivers a datagram back to the side that sent it)."""
    offset = HEADER_SIZE if header else 0
    if kind == "flip" and data:
        bit = position % (len(data) * 8)
        return bytes(b ^ (1 << (bit % 8)) if i == bit // 8 else b
                     for i, b in enumerate(data))
    if kind == "nonce_flip" and len(data) > offset + 8:
        i = offset + position % 8
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
    if kind == "tag_flip" and data:
        return data[:-1] + bytes([data[-1] ^ 0x80])
    if kind == "truncate":
        return data[:position % max(len(data), 1)]
    if kind == "extend":
        return data + extra
    if kind == "garbage":
        return extra + bytes(position % 64)
    if kind == "empty":
        return b""
    if kind == "header_version" and data:
        return bytes([2]) + data[1:]
    if kind == "header_other" and len(data) >= HEADER_SIZE:
        return data[:HEADER_SIZE - 1] + bytes([data[HEADER_SIZE - 1] ^ 2]) \
            + data[HEADER_SIZE:]
    if kind == "header_zero" and len(data) >= HEADER_SIZE:
        return data[:1] + bytes(8) + data[9:]
    if kind == "header_short":
        return data[:position % HEADER_SIZE]
    if kind == "splice" and other:
        cut = offset + 8 + position % 16
        return data[:cut] + other[cut:]
    return data

