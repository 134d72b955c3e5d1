"""A device's recent changes, kept encoded.

Every stored write encodes the whole device, history included; encoding 32
history entries with cbor2 costs about ten times the rest of the device.
So each entry is encoded once, when it is made, and the history is kept as
its stored form itself: one bytes object, a CBOR array of byte strings,
each the CBOR of one entry (a 5-item array).  Storing the history is then
a copy of those bytes, appending an entry one join; and one bytes object
costs less memory than a tuple of an object per entry (let alone the
tuple, dict and floats an entry stands for).  Readers (the API, the
dashboard) still see ``(version, cursor, at, kind, data)`` tuples, decoded
when they look.

Loading takes the entries' bytes as they are, without decoding them.
(Stores written before kept an array of 5-item arrays;
``History.from_stored`` reads both.)

The history is bounded in bytes as well as in entries: one events entry
can be as large as a request, and every read, feed page and update sends
the device whole.  Each entry weighs the larger of its JSON as the API
sends it (names, escapes and ``{"$bytes": ...}`` included; a float counted
at its longest, 24 characters) and its stored bytes (``entry_weight``);
appending drops the oldest entries until the weights fit the budget, so the
history's JSON and its stored form both do.  An entry over a quarter of
the budget is stored shortened (``shortened_entry``: ``"truncated": true``,
the counts, and the first keys and events that fit), so that a few entries
always fit.  A shortened entry is an ordinary entry: the stores keep it,
and ``bounded`` trims a history loaded from one (stored before the budget,
or under a larger one) the same way.

Weighing an entry means walking its data (and, for one stored, decoding
it), so appends avoid it while they can: no CBOR byte weighs more than
``JSON_PER_BYTE``, so a history whose stored bytes times that fits the
budget needs no weighing (most do).  A history past that is weighed once
and keeps each entry's weight (``History.weights``, 4 bytes an entry), each
append then weighing only the entry it adds.
"""

from array import array

import cbor2

from broker.registry.history_entry import (  # (some re-exported for the tests)
    ENTRY_OVERHEAD, JSON_PER_BYTE, _weight_of, cbor_head as _head, decode_entry, encode_entry,
    entry_weight, json_size, shortened_entry)

__all__ = ["EMPTY_HISTORY", "ENTRY_OVERHEAD", "HISTORY_BYTES", "History", "JSON_PER_BYTE",
           "append_entry", "decode_entry", "encode_entry", "entry_weight",
           "install_compiled_append", "json_size", "shortened_entry"]

_dumps = cbor2.dumps
_loads = cbor2.loads

#: bytes of history one device keeps by default (``[registry] history_bytes``):
#: with the other default limits a device's JSON stays under a quarter of a
#: megabyte, the change that made it (an update's ``events``) included.
HISTORY_BYTES = 128 * 1024
#: slack for the heads and brackets of the whole: the stored array's (up to 5
#: bytes) and the JSON list's ``[]`` (2, less the comma the last entry lacks)
_HEADS = 8


def _argument(data: bytes, pos: int) -> tuple:
    """``(argument, position after the head)`` of the CBOR head at ``pos``."""
    info = data[pos] & 0x1f
    if info < 24:
        return info, pos + 1
    if info == 24:
        return data[pos + 1], pos + 2
    width = 1 << (info - 24)       # 25..27: 2, 4, 8 bytes
    return int.from_bytes(data[pos + 1:pos + 1 + width], "big"), pos + 1 + width


def _entry_end(data: bytes, pos: int) -> int:
    """The position after the byte string (one stored entry) at ``pos``."""
    length, pos = _argument(data, pos)
    return pos + length


def _first_entry(data: bytes) -> int:
    """The position of the first entry of a stored array (after its head)."""
    return _argument(data, 0)[1]


def _measured(data: bytes, pos: int) -> array:
    """The weight of each stored entry from ``pos`` on."""
    weights = array("I")
    while pos < len(data):
        length, pos = _argument(data, pos)
        weights.append(entry_weight(data[pos:pos + length]))
        pos += length
    return weights


#: the heads of arrays and byte strings of fewer than 256 items (bytes)
_ARRAY_HEADS = tuple(_head(0x80, n) for n in range(256))
_BSTR_HEADS = tuple(_head(0x40, n) for n in range(256))


class History:
    """An immutable sequence of history entries held as their stored CBOR.

    Indexing and iteration give decoded tuples; ``encoded`` gives each
    entry's bytes and ``cbor()`` the stored form.  Equal to another History
    with the same bytes, and to a tuple of the same decoded entries.
    """

    __slots__ = ("stored", "weights")

    def __init__(self, stored: bytes = b"\x80", weights=None):
        self.stored = stored
        #: each entry's weight once measured (near the budget), else None
        self.weights = weights

    @classmethod
    def of(cls, entries) -> "History":
        """A History of ``(version, cursor, at, kind, data)`` entries."""
        return cls(_dumps([encode_entry(*entry) for entry in entries]))

    @classmethod
    def of_encoded(cls, encoded) -> "History":
        """A History of entries given as their bytes."""
        return cls(_dumps(list(encoded)))

    @classmethod
    def from_stored(cls, items) -> "History":
        """The History of a decoded stored array (byte strings, or the
        5-item arrays of older stores)."""
        if all(type(item) is bytes for item in items):
            return cls.of_encoded(items)
        return cls.of(tuple(entry) for entry in items)

    @property
    def encoded(self) -> tuple:
        """Each entry's CBOR, oldest first."""
        return tuple(_loads(self.stored))

    def weight(self) -> int:
        """The sum of the entries' weights: what the history counts against
        its budget (its JSON list and its stored array are at most that plus
        8 bytes)."""
        weights = self.weights
        return sum(_measured(self.stored, _first_entry(self.stored)) if weights is None
                   else weights)

    def appended(self, version, cursor, at, kind, data, size: int,
                 budget: int = HISTORY_BYTES) -> "History":
        """This history plus one entry, keeping the newest ``size`` entries
        whose weights fit in ``budget``; an entry weighing over a quarter of
        the budget is kept shortened."""
        entry = encode_entry(version, cursor, at, kind, data)
        n = len(entry)
        quarter = budget >> 2
        weight = None                               # the new entry's, once measured
        if n * JSON_PER_BYTE + ENTRY_OVERHEAD > quarter:     # it may be over a quarter
            weight = _weight_of((version, cursor, at, kind, data), n)
            if weight > quarter:                    # rare: a big batch of events
                entry = shortened_entry(version, cursor, at, kind, data, quarter)
                n = len(entry)
                weight = entry_weight(entry)
        stored = self.stored
        head = stored[0]                            # (heads of one or two bytes inline)
        if head < 0x98:
            count, start = head - 0x7f, 1
        elif head == 0x98:
            count, start = stored[1] + 1, 2
        else:
            count, start = _argument(stored, 0)
            count += 1                              # (count: the new entry included)
        room = budget - _HEADS
        weights = self.weights
        if weights is None:                         # not measured: most histories
            if (len(stored) - start + n) * JSON_PER_BYTE + count * ENTRY_OVERHEAD <= room:
                while count > size:                 # far from the budget: drop by count
                    head = stored[start]
                    if head == 0x58:
                        start += 2 + stored[start + 1]
                    elif head < 0x58:
                        start += head - 0x3f
                    else:
                        start = _entry_end(stored, start)
                    count -= 1
                return History(b"".join((
                    _ARRAY_HEADS[count] if count < 256 else _head(0x80, count),
                    stored[start:],
                    _BSTR_HEADS[n] if n < 256 else _head(0x40, n), entry)))
            weights = _measured(stored, start)      # near the budget: measured from now on
        if weight is None:
            weight = _weight_of((version, cursor, at, kind, data), n)
        total = sum(weights) + weight
        first = 0
        while count > 1 and (count > size or total > room):
            total -= weights[first]                 # drop the oldest entry
            first += 1
            start = _entry_end(stored, start)
            count -= 1
        weights = weights[first:]
        weights.append(weight)
        return History(b"".join((
            _ARRAY_HEADS[count] if count < 256 else _head(0x80, count),
            stored[start:],
            _BSTR_HEADS[n] if n < 256 else _head(0x40, n), entry)), weights)

    def bounded(self, size: int, budget: int = HISTORY_BYTES) -> "History":
        """The newest entries within ``size`` and ``budget`` as ``appended``
        keeps them, any weighing over a quarter of the budget shortened (for
        a history stored under larger limits, or before there was a budget);
        this very history if it is within them."""
        count = len(self)
        room = budget - _HEADS
        if count <= size and len(self.stored) * JSON_PER_BYTE + count * ENTRY_OVERHEAD <= room:
            return self                             # (loading: most need no decoding)
        quarter = budget >> 2
        kept = []
        weights = array("I")
        total = 0
        for blob in reversed(self.encoded):
            if len(kept) == size:
                break
            weight = entry_weight(blob)
            if weight > quarter:                    # shortened, as appended keeps it
                blob = shortened_entry(*decode_entry(blob), quarter)
                weight = entry_weight(blob)
            if total + weight > room:
                break
            total += weight
            kept.append(blob)
            weights.append(weight)
        kept.reverse()
        weights.reverse()
        if kept == list(self.encoded):
            return self
        return History(_dumps(kept), weights)

    def with_cursors(self, version: int, cursor: int) -> "History":
        """This history with the cursor of its newest entries, written as 0
        by a writer that could not know it, taken from the change that has
        ``version`` at ``cursor`` (one cursor per version in between).  A
        version written as 0 is that change's own (a new device's "created"
        entry: its first version is its creation's cursor, which the writer
        could not know either).  Only those entries are decoded and encoded
        again."""
        encoded = self.encoded
        index = len(encoded)
        fixed = []
        while index:
            v, c, at, kind, data = _loads(encoded[index - 1])
            if c != 0:
                break
            index -= 1
            v = v or version
            fixed.append(encode_entry(v, cursor - (version - v), at, kind, data))
        if not fixed:
            return self
        return History.of_encoded(encoded[:index] + tuple(reversed(fixed)))

    def cbor(self) -> bytes:
        """The stored form: a CBOR array of each entry's bytes."""
        return self.stored

    def __len__(self) -> int:
        info = self.stored[0] & 0x1f
        return info if info < 24 else _argument(self.stored, 0)[0]

    def __bool__(self) -> bool:
        return self.stored != b"\x80"

    def __iter__(self):
        return map(decode_entry, _loads(self.stored))

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if start == 0 and stop == len(self) and step == 1:
                return self
            return History.of_encoded(self.encoded[index])
        return decode_entry(self.encoded[index])

    def __eq__(self, other):
        if isinstance(other, History):
            return self.stored == other.stored
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self):
        return hash(self.stored)

    def __repr__(self) -> str:
        return f"History({tuple(self)!r})"


EMPTY_HISTORY = History()

#: ``append_entry(history, version, cursor, at, kind, data, size, budget)``
#: is ``history.appended(...)``, the call the registry makes for every
#: change: broker/registry/speedups.py installs the compiled one, which
#: does the usual append in C and hands the others to the method.
append_entry = History.appended


def install_compiled_append(compiled) -> None:
    """Use ``compiled`` as ``append_entry``; None goes back to the method."""
    global append_entry
    append_entry = compiled or History.appended
