"""A device's recent changes, kept encoded.

Every stored write encodes the whole device, history included; encoding 32
history entries with cbor2 costs about ten times the rest of the device.
So each entry is encoded once, when it is made, and kept as its CBOR bytes:
storing the history is then a join, and an entry costs a third of the
memory of the tuple, dict and floats it stands for.  Readers (the API, the
dashboard) still see ``(version, cursor, at, kind, data)`` tuples, decoded
when they look.

In storage the history is a CBOR array of byte strings, each the CBOR of
one entry (a 5-item array): loading takes the entries' bytes as they are,
without decoding them.  (Stores written before kept an array of 5-item
arrays; ``History.from_stored`` reads both.)
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


class History:
    """An immutable sequence of history entries held as their CBOR bytes.

    Indexing and iteration give decoded tuples; ``encoded`` and ``cbor()``
    give bytes.  Equal to another History with the same bytes, and to a
    tuple of the same decoded entries.
    """

    __slots__ = ("encoded",)

    def __init__(self, encoded: tuple = ()):
        self.encoded = encoded

    @classmethod
    def of(cls, entries) -> "History":
        """A History of ``(version, cursor, at, kind, data)`` entries."""
        return cls(tuple(encode_entry(*entry) for entry in entries))

    @classmethod
    def from_stored(cls, items) -> "History":
        """The History of a decoded stored array (byte strings, or the
        5-item arrays of older stores)."""
        if all(type(item) is bytes for item in items):
            return cls(tuple(items))
        return cls.of(tuple(entry) for entry in items)

    def appended(self, version, cursor, at, kind, data, size: int) -> "History":
        """This history plus one entry, keeping the newest ``size``."""
        encoded = self.encoded + (encode_entry(version, cursor, at, kind, data),)
        if len(encoded) > size:
            encoded = encoded[-size:]
        return History(encoded)

    def with_cursors(self, version: int, cursor: int) -> "History":
        """This history with the cursor of its newest entries, written as 0
        by a writer that could not know it, taken from the change that has
        ``version`` at ``cursor`` (one cursor per version in between).  Only
        those entries are decoded and encoded again."""
        encoded = self.encoded
        index = len(encoded)
        fixed = []
        while index:
            v, c, at, kind, data = _loads(encoded[index - 1])
            if c != 0:
                break
            index -= 1
            fixed.append(encode_entry(v, cursor - (version - v), at, kind, data))
        if not fixed:
            return self
        return History(encoded[:index] + tuple(reversed(fixed)))

    def cbor(self) -> bytes:
        """The stored form: a CBOR array of each entry's bytes."""
        return _dumps(self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)

    def __bool__(self) -> bool:
        return bool(self.encoded)

    def __iter__(self):
        return map(decode_entry, self.encoded)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return History(self.encoded[index])
        return decode_entry(self.encoded[index])

    def __eq__(self, other):
        if isinstance(other, History):
            return self.encoded == other.encoded
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self):
        return hash(self.encoded)

    def __repr__(self) -> str:
        return f"History({tuple(self)!r})"


EMPTY_HISTORY = History()
