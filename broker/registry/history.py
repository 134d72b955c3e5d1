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
the device whole.  Each entry counts its bytes plus ``ENTRY_OVERHEAD``
(what its JSON adds around its data); appending drops the oldest entries
until the whole fits the budget, and an entry over a quarter of the budget
is stored shortened (``shortened_entry``: ``"truncated": true``, the
counts, and the first keys and events that fit), so that a few entries
always fit.  A shortened entry is an ordinary entry: the stores keep it,
and histories stored before load as they were.
"""

import cbor2

from broker.registry.values import thaw

_dumps = cbor2.dumps
_loads = cbor2.loads

#: bytes of history one device keeps by default (``[registry] history_bytes``):
#: with the other default limits a device's JSON stays under a quarter of a
#: megabyte, the change that made it (an update's ``events``) included.
HISTORY_BYTES = 128 * 1024
#: bytes each entry counts beside its own CBOR: what its JSON adds around its
#: data (the names and values of version, cursor, at and kind: 47 bytes of
#: names and punctuation, a time of about 18 digits, numbers written longer
#: than in CBOR), so that the budget bounds many small entries' JSON too.
ENTRY_OVERHEAD = 80
#: heads the stored form may add to the bytes counted: the array's (up to 3
#: bytes for up to 65535 entries) and the new entry's (up to 5).
_HEADS = 8


def encode_entry(version: int, cursor: int, at: float, kind: str, data) -> bytes:
    """The CBOR of one history entry."""
    return _dumps((version, cursor, at, kind, data))


def decode_entry(blob: bytes) -> tuple:
    """One entry as ``(version, cursor, at, kind, data)``, data frozen."""
    version, cursor, at, kind, data = _loads(blob)
    return version, cursor, at, kind, thaw(data)


def shortened_entry(version: int, cursor: int, at: float, kind: str, data,
                    limit: int) -> bytes:
    """The CBOR of an entry too large to keep whole, in about ``limit`` bytes.

    Its data becomes a map saying so: ``"truncated": true``; for a patch
    (``reported``, ``desired``) ``"keys"``, how many it had, and ``"patch"``,
    its first keys that fit; for events (``events``, ``reported`` with
    events) ``"count"``, how many, and ``"events"``, the first that fit.  A
    shortened ``reported`` entry always has both ``patch`` and ``events``,
    the shape of a report with events, which readers already know.
    """
    patch, events = _parts(kind, data)
    short = {"truncated": True}
    if patch is not None:
        short["keys"] = len(patch)
        short["patch"] = {}
    if events is not None:
        short["count"] = len(events)
        short["events"] = ()
    # 4: the heads of the patch map and the events array as they grow
    spare = limit - len(encode_entry(version, cursor, at, kind, short)) - 4
    if patch:
        kept = {}
        for key, value in patch.items():
            spare -= len(_dumps(key)) + len(_dumps(value))
            if spare < 0:
                break
            kept[key] = value
        short["patch"] = kept
    if events and spare > 0:
        kept = []
        for event in events:
            spare -= len(_dumps(event))
            if spare < 0:
                break
            kept.append(event)
        short["events"] = kept
    return encode_entry(version, cursor, at, kind, short)


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


def _head(major: int, n: int) -> bytes:
    """CBOR head of major type ``major`` (shifted) with argument ``n``."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


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


#: the heads of arrays and byte strings of fewer than 256 items (bytes)
_ARRAY_HEADS = tuple(_head(0x80, n) for n in range(256))
_BSTR_HEADS = tuple(_head(0x40, n) for n in range(256))


class History:
    """An immutable sequence of history entries held as their stored CBOR.

    Indexing and iteration give decoded tuples; ``encoded`` gives each
    entry's bytes and ``cbor()`` the stored form.  Equal to another History
    with the same bytes, and to a tuple of the same decoded entries.
    """

    __slots__ = ("stored",)

    def __init__(self, stored: bytes = b"\x80"):
        self.stored = stored

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

    def appended(self, version, cursor, at, kind, data, size: int,
                 budget: int = HISTORY_BYTES) -> "History":
        """This history plus one entry, keeping the newest ``size`` entries
        that fit in ``budget`` bytes (each counted with ENTRY_OVERHEAD); an
        entry over a quarter of the budget is kept shortened."""
        entry = encode_entry(version, cursor, at, kind, data)
        n = len(entry)
        if n + ENTRY_OVERHEAD > budget >> 2:       # rare: a big batch of events
            entry = shortened_entry(version, cursor, at, kind, data,
                                    (budget >> 2) - ENTRY_OVERHEAD)
            n = len(entry)
        stored = self.stored
        head = stored[0]                            # (heads of one or two bytes inline)
        if head < 0x98:
            count, start = head - 0x7f, 1
        else:
            count, start = _argument(stored, 0)
            count += 1
        room = budget - n - _HEADS                  # for the entries kept, overheads included
        end = len(stored)
        if end + count * ENTRY_OVERHEAD > room:     # near the budget: drop by bytes too
            while count > 1 and (count > size or end - start + count * ENTRY_OVERHEAD > room):
                start = _entry_end(stored, start)
                count -= 1
        while count > size:                         # drop the oldest entries
            head = stored[start]
            if head == 0x58:
                start += 2 + stored[start + 1]
            elif head < 0x58:
                start += head - 0x3f
            else:
                length, start = _argument(stored, start)
                start += length
            count -= 1
        return History(b"".join((
            _ARRAY_HEADS[count] if count < 256 else _head(0x80, count),
            stored[start:],
            _BSTR_HEADS[n] if n < 256 else _head(0x40, n), entry)))

    def bounded(self, size: int, budget: int = HISTORY_BYTES) -> "History":
        """The newest entries within ``size`` and ``budget`` as ``appended``
        keeps them (for a history stored under larger limits, or before
        there was a budget); this very history if it is within them."""
        count = len(self)
        if count <= size and len(self.stored) + count * ENTRY_OVERHEAD <= budget:
            return self                             # (loading: most need no decoding)
        encoded = self.encoded
        total = 3                                   # the array's head
        kept = 0
        for blob in reversed(encoded):
            total += len(_head(0x40, len(blob))) + len(blob) + ENTRY_OVERHEAD
            if kept == size or total > budget:
                break
            kept += 1
        if kept == len(encoded):
            return self
        return History.of_encoded(encoded[len(encoded) - kept:])

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
