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
"""

import cbor2

from broker.registry.values import thaw

_dumps = cbor2.dumps
_loads = cbor2.loads


def encode_entry(version: int, cursor: int, at: float, kind: str, data) -> bytes:
    """The CBOR of one history entry."""
    return _dumps((version, cursor, at, kind, data))


def decode_entry(blob: bytes) -> tuple:
    """One entry as ``(version, cursor, at, kind, data)``, data frozen."""
    version, cursor, at, kind, data = _loads(blob)
    return version, cursor, at, kind, thaw(data)


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

    def appended(self, version, cursor, at, kind, data, size: int) -> "History":
        """This history plus one entry, keeping the newest ``size``."""
        entry = encode_entry(version, cursor, at, kind, data)
        stored = self.stored
        head = stored[0]                            # (heads of one or two bytes inline)
        if head < 0x98:
            count, start = head - 0x7f, 1
        else:
            count, start = _argument(stored, 0)
            count += 1
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
        n = len(entry)
        return History(b"".join((
            _ARRAY_HEADS[count] if count < 256 else _head(0x80, count),
            stored[start:],
            _BSTR_HEADS[n] if n < 256 else _head(0x40, n), entry)))

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
