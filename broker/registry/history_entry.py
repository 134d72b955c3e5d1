"""One history entry: its stored form, what it weighs against a device's history
budget, and its shortened form (history.py's docstring says why).

An entry weighs the larger of its JSON as the API sends it, at most (names,
escapes and ``{"$bytes": ...}`` included; a float counted at its longest, 24
characters), and its stored bytes.
"""

import json
from itertools import takewhile

import cbor2

from broker.json_bytes import bytes_default
from broker.registry.values import thaw

__all__ = ["ENTRY_OVERHEAD", "JSON_PER_BYTE", "decode_entry", "encode_entry",
           "entry_weight", "json_size", "shortened_entry"]

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


def encode_entry(version: int, cursor: int, at: float, kind: str, data) -> bytes:
    """The CBOR of one history entry."""
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
