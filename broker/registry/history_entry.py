"""One history entry: its stored form, what it weighs against a device's history
budget, and its shortened form (history.py's docstring says why).

An entry weighs the larger of its JSON as the API sends it, at most (names,
escapes and ``{"$bytes": ...}`` included; a float counted at its longest, 24
characters), and its stored bytes.
"""

import json
import struct
from itertools import takewhile

import cbor2

from broker.json_bytes import bytes_default
from broker.registry.values import FrozenMap, thaw

__all__ = ["ENTRY_OVERHEAD", "JSON_PER_BYTE", "cbor_head", "decode_entry", "encode_entry",
           "entry_weight", "json_size", "number_map_cbor", "shortened_entry"]

_dumps = cbor2.dumps
_loads = cbor2.loads
#: the API's JSON (broker.web.responses.json_bytes): compact, UTF-8 as it is
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                         default=bytes_default).encode

#: an entry's JSON beside its five values (each counted with a comma): the
#: names and braces, ``{"version":`` ... ``,"data":`` ``}``, and its comma.
ENTRY_OVERHEAD = 41
#: most an entry weighs per byte of its CBOR: no CBOR byte stands for more
#: JSON, comma included, than an empty bytes value, ``{"$bytes":""},`` (a
#: control character in text, ``\u0001``, is 6; ``false,`` 6; a float, 9
#: bytes, at most 25).
JSON_PER_BYTE = 14
#: bytes an entry's stored form adds to its CBOR (its byte string head), at most
_STORED_HEAD = 5


def json_size(value) -> int:
    """Bytes of ``value`` in the API's JSON."""
    text = _json(value)
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _item(value) -> int:
    """Bytes of ``value`` in JSON with a comma, at most: exact, but a float
    counts its longest, 24 characters (finding its shortest form costs more
    than all the rest of a report)."""
    kind = type(value)
    if kind is float:
        return 25
    if kind is int:
        return len(str(value)) + 1
    if (kind is str and value.isascii() and value.isprintable()
            and '"' not in value and "\\" not in value):
        return len(value) + 3
    return json_size(value) + 1


def _items(values) -> int:
    """``_item`` summed over ``values`` (the floats of a report counted at once)."""
    floats = list(map(type, values)).count(float)
    if floats == len(values):
        return 25 * floats
    return 25 * floats + sum(_item(value) for value in values if type(value) is not float)


def _keys(keys) -> int:
    """``_item`` summed over a map's keys (key names need no escapes: at once)."""
    text = "".join(keys)
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text) + 3 * len(keys)
    return sum(map(_item, keys))


def _data_size(data) -> int:
    """Bytes of an entry's data in JSON, at most (its keys' and items' own)."""
    if isinstance(data, dict):
        return 2 + _keys(data) + _items(data.values())
    if type(data) is tuple or type(data) is list:
        return 2 + _items(data)
    return _item(data)


def _json_weight(entry) -> int:
    """Bytes of an entry in a history list's JSON, at most."""
    version, cursor, at, kind, data = entry
    return (ENTRY_OVERHEAD + _item(version) + _item(cursor) + _item(at) + _item(kind)
            + _data_size(data))


def _weight_of(entry, n: int) -> int:
    """What an entry (its CBOR ``n`` bytes) counts against the budget: the
    larger of its JSON in a history list, at most, and its stored bytes."""
    return max(_json_weight(entry), n + _STORED_HEAD)


def entry_weight(blob: bytes) -> int:
    """What one stored entry counts against the budget (see ``_weight_of``)."""
    return _weight_of(_loads(blob), len(blob))


# -- hand-written CBOR (database.py's fast paths use it too) ----------------

_U64 = 1 << 64
_BYTE = tuple(bytes((b,)) for b in range(256))   # one-byte CBOR heads and items
_FLOAT64 = struct.Struct(">Bd").pack
_H8 = struct.Struct(">BB").pack
_H16 = struct.Struct(">BH").pack
_H32 = struct.Struct(">BI").pack
_H64 = struct.Struct(">BQ").pack
#: most texts number_map_cbor keeps encoded
_TEXTS_SIZE = 10_000
#: the longest text kept (the registry's default longest key): keys also come
#: from devices' own states, which may hold longer ones, and the cache must
#: stay small whatever a device sends
_TEXT_KEPT = 64
#: number_map_cbor's CBOR of a key (ASCII text keys only, as many as key tuples)
_TEXTS = {}


def cbor_head(major, n):
    """CBOR head of major type ``major`` (shifted) with argument ``n`` (0 <= n < 2**64)."""
    if n < 24:
        return _BYTE[major | n]
    if n < 0x100:
        return _H8(major | 24, n)
    if n < 0x10000:
        return _H16(major | 25, n)
    if n < 0x100000000:
        return _H32(major | 26, n)
    return _H64(major | 27, n)


def number_map_cbor(mapping):
    """``cbor2.dumps(dict(mapping))`` for a map of text keys to numbers and
    bools (a device's usual readings), written here because cbor2's setup
    per call costs more than these few bytes; None for any other map (the
    caller uses cbor2 then: its bytes, and its errors)."""
    n = len(mapping)
    parts = [_BYTE[0xa0 | n] if n < 24 else cbor_head(0xa0, n)]
    append = parts.append
    texts = _TEXTS
    for key, value in mapping.items():
        text = texts.get(key)
        if text is None:
            if type(key) is not str or not key.isascii():
                return None
            text = cbor_head(0x60, len(key)) + key.encode("ascii")
            if len(texts) < _TEXTS_SIZE and len(key) <= _TEXT_KEPT:
                texts[key] = text
        append(text)
        tv = type(value)
        if tv is float:
            if value - value != 0.0:        # NaN or infinity: cbor2's own form
                return None
            append(_FLOAT64(0xfb, value))
        elif tv is int:
            if 0 <= value < 24:
                append(_BYTE[value])
            elif 0 <= value < _U64:
                append(cbor_head(0, value))
            elif -_U64 <= value < 0:
                append(cbor_head(0x20, -1 - value))
            else:
                return None
        elif tv is bool:
            append(b"\xf5" if value else b"\xf4")
        else:
            return None
    return b"".join(parts)


def _uint(n):
    """CBOR of an int ``0 <= n < 2**64`` (a version or cursor: mostly 4 bytes)."""
    if 0x10000 <= n < 0x100000000:
        return _H32(0x1a, n)
    return _BYTE[n] if n < 24 else cbor_head(0, n)


def encode_entry(version: int, cursor: int, at: float, kind: str, data) -> bytes:
    """The CBOR of one history entry: written here for the usual one (a map
    of numbers at a finite float time: cbor2's setup costs more than these
    few bytes), cbor2's for any other."""
    if (type(data) is dict or type(data) is FrozenMap) and type(at) is float \
            and at - at == 0.0 and type(version) is int and type(cursor) is int \
            and 0 <= version < _U64 and 0 <= cursor < _U64 and type(kind) is str:
        text = _TEXTS.get(kind)
        if text is None:
            if not kind.isascii():
                return _dumps((version, cursor, at, kind, data))
            text = cbor_head(0x60, len(kind)) + kind.encode("ascii")
            if len(_TEXTS) < _TEXTS_SIZE and len(kind) <= _TEXT_KEPT:
                _TEXTS[kind] = text
        if len(data) == 1:                  # one reading: its two items here
            (key, value), = data.items()
            name = _TEXTS.get(key)
            tv = type(value)
            if name is not None and (tv is float and value - value == 0.0
                                     or tv is int and 0 <= value < 0x100000000):
                return b"".join((
                    b"\x85",
                    _BYTE[version] if version < 24 else _H32(0x1a, version)
                    if 0x10000 <= version < 0x100000000 else cbor_head(0, version),
                    _H32(0x1a, cursor) if 0x10000 <= cursor < 0x100000000
                    else cbor_head(0, cursor),
                    _FLOAT64(0xfb, at), text, b"\xa1", name,
                    _FLOAT64(0xfb, value) if tv is float else _BYTE[value] if value < 24
                    else _H32(0x1a, value) if value >= 0x10000 else cbor_head(0, value)))
        body = number_map_cbor(data)
        if body is not None:
            return b"".join((b"\x85", _uint(version), _uint(cursor), _FLOAT64(0xfb, at), text,
                             body))
    return _dumps((version, cursor, at, kind, data))


def decode_entry(blob: bytes) -> tuple:
    """One entry as ``(version, cursor, at, kind, data)``, data frozen."""
    version, cursor, at, kind, data = _loads(blob)
    return version, cursor, at, kind, thaw(data)


def shortened_entry(version: int, cursor: int, at: float, kind: str, data,
                    limit: int) -> bytes:
    """The CBOR of an entry too large to keep whole, weighing (``entry_weight``)
    at most ``limit`` when its counts and flag fit at all.

    Its data becomes a map saying so: ``"truncated": true``; for a patch
    (``reported``, ``desired``) ``"keys"``, how many it had, and ``"patch"``,
    its first keys that fit; for events (``events``, ``reported`` with
    events) ``"count"``, how many, and ``"events"``, the first that fit.  A
    shortened ``reported`` entry always has both ``patch`` and ``events``,
    the shape of a report with events, which readers already know.
    """
    patch, events = _parts(kind, data)
    short = {"truncated": True}
    if _is_shortened(data):                 # shortened again (a smaller budget)
        short.update(data)
        patch, events = data.get("patch"), data.get("events")
    if patch is not None:
        short.setdefault("keys", len(patch))
        short["patch"] = {}
    if events is not None:
        short.setdefault("count", len(events))
        short["events"] = ()
    skeleton = (version, cursor, at, kind, short)
    # what is left of the limit in JSON and in CBOR (4: the heads of the patch
    # map and the events array as they grow)
    spare = [limit - _json_weight(skeleton), limit - len(_dumps(skeleton)) - _STORED_HEAD - 4]
    if patch:
        short["patch"] = dict(takewhile(lambda item: _fits(
            spare, _item(item[0]) + _item(item[1]),
            len(_dumps(item[0])) + len(_dumps(item[1]))), patch.items()))
    if events and min(spare) > 0:
        short["events"] = list(takewhile(lambda event: _fits(
            spare, _item(event), len(_dumps(event))), events))
    return encode_entry(version, cursor, at, kind, short)


def _fits(spare: list, json_bytes: int, cbor_bytes: int) -> bool:
    """Whether an item of these sizes fits what is ``spare`` (taken from it)."""
    spare[0] -= json_bytes
    spare[1] -= cbor_bytes
    return spare[0] >= 0 and spare[1] >= 0


def _is_shortened(data) -> bool:
    """Whether ``data`` is a shortened entry's (a map of only its keys)."""
    return (isinstance(data, dict) and data.get("truncated") is True
            and data.keys() <= {"truncated", "keys", "patch", "count", "events"}
            and isinstance(data.get("patch", {}), dict)
            and isinstance(data.get("events", ()), (tuple, list)))


def _parts(kind: str, data) -> tuple:
    """``(patch, events)`` an entry's data carries, None for a part it has not."""
    if kind == "events":
        return None, (data if isinstance(data, (tuple, list)) else ())
    if not isinstance(data, dict):
        return None, None
    if kind == "desired":
        return data, None
    if kind == "reported":
        if (data.keys() == {"patch", "events"} and isinstance(data["patch"], dict)
                and isinstance(data["events"], (tuple, list))):
            return data["patch"], data["events"]
        return data, ()
    return None, None
