"""Decoding exactly one CBOR item: a device-state diff.

``cbor2.loads`` ignores bytes after the item, and a diff with bytes after it
must be refused (docs/protocol.md). A ``CBORDecoder`` over a file tells
where the item ended, but giving a decoder a new file (a ``BytesIO`` per
diff) costs more than decoding a small diff; so each reused decoder keeps a
small reader of its own, and each diff goes through it.

Tags: protocol.md section 5 allows none but the self-describe tag 55799
(ignored). cbor2 decodes many tags into plain values by itself (28(0) is
0, 2(h'01') is 1), so a type check after decoding cannot see them; the
decoder's ``semantic_decoders`` refuse every tag instead. cbor2 looks a tag
up there only when it meets one: a diff without tags pays nothing.
"""

from collections.abc import Mapping

import cbor2

from broker.ssp.state import bad_diff

__all__ = ["OneItemDecoder"]

_CBORDecoder = cbor2.CBORDecoder
_NOT_CBOR = (cbor2.CBORError, ValueError, TypeError, OverflowError,
             LookupError, RecursionError)


#: The one tag a diff may carry (RFC 8949 3.4.6), ignored.
SELF_DESCRIBE_TAG = 55799


def _untagged(value, immutable=False):
    return value


class _OnlySelfDescribe(Mapping):
    """Semantic decoders for every tag: 55799 is dropped, any other refused
    (the decoder turns the ValueError into a CBORDecodeError)."""

    __slots__ = ()

    def __getitem__(self, tag):
        return _untagged if tag == SELF_DESCRIBE_TAG else _refuse_tag

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def _refuse_tag(value, immutable=False):
    raise ValueError("a tag (only the self-describe tag 55799 is allowed)")


_TAGS = _OnlySelfDescribe()


class _Reader:
    """The file a reused CBORDecoder reads: one diff at a time.

    A decoder takes a file's ``read`` when it is given the file, which
    costs more than a whole small decode; so each decoder keeps its reader
    and gets the next diff through it. A decoder reads ahead, then seeks
    back over what it did not use: ``position`` ends after the item.
    """

    __slots__ = ("data", "position")

    def __init__(self) -> None:
        self.data = b""
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.data
        start = self.position
        if start == 0 and (size < 0 or size >= len(data)):
            self.position = len(data)
            return data  # the usual case: all of a small diff, no copy
        chunk = data[start:] if size < 0 else data[start:start + size]
        self.position = start + len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.position
        elif whence == 2:
            offset += len(self.data)
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position


class OneItemDecoder:
    """Decodes exactly one CBOR item from bytes, else raises
    DatagramDropped(BAD_DIFF).

    ``cbor2.loads`` ignores bytes after the item, so a decoder over a
    reader that tells where the item ended. Building a CBORDecoder costs
    about half of a small diff's decoding, so idle ones are reused: a
    decoder keeps nothing from one decode() to the next
    (tests/ssp/test_device_state.py checks that). Taking one from the list
    and putting it back are atomic, so threads never share one; one that
    failed is not put back. ``max_depth`` bounds the nesting of arrays and
    maps.
    """

    __slots__ = ("_max_depth", "_idle")

    def __init__(self, max_depth: int) -> None:
        self._max_depth = max_depth
        self._idle = []

    def decode(self, data: bytes):
        """The one CBOR item ``data`` holds."""
        try:
            decoder, reader = self._idle.pop()
        except IndexError:
            reader = _Reader()
            decoder = _CBORDecoder(reader, max_depth=self._max_depth,
                                   allow_duplicate_keys=False,
                                   semantic_decoders=_TAGS)
        reader.data = data
        reader.position = 0
        try:
            item = decoder.decode()
        except _NOT_CBOR as error:
            raise bad_diff(f"not CBOR: {error}") from None
        left = len(data) - reader.position
        reader.data = b""  # hold no diff while idle
        self._idle.append((decoder, reader))
        if left:
            raise bad_diff(f"{left} bytes after the CBOR item")
        return item
