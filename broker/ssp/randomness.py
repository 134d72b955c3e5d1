"""A ``random_bytes(n)`` that calls its source once per block, not per call.

Sessions take randomness as an argument (``random_bytes(n)``), and they ask
for a little at every instruction they send: 17 bytes of chaff. From the
system's random source that is a system call per datagram, about as costly
as the datagram's encryption; an owner that drives many sessions shares one
``BufferedRandom`` among them instead. Every byte of the source is handed
out once, in order, so the output is as random as the source.
"""

__all__ = ["BufferedRandom"]

#: Bytes asked of the source at a time: some 240 instructions' chaff.
BLOCK = 4096


class BufferedRandom:
    """``random_bytes(n)`` over ``source(n)``, read ``block`` bytes at a time.

    Not for secrets that must not outlive their use in memory (keys): the
    unused rest of a block stays in memory until handed out. A request
    larger than a block goes to the source directly.
    """

    __slots__ = ("_source", "_block", "_buffer", "_position")

    def __init__(self, source, block: int = BLOCK) -> None:
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        self._source = source
        self._block = block
        self._buffer = b""
        self._position = 0

    def __call__(self, n: int) -> bytes:
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        start = self._position
        end = start + n
        if end > len(self._buffer):
            if n > self._block:
                return self._source(n)
            self._buffer = self._source(self._block)
            start, end = 0, n
        self._position = end
        return self._buffer[start:end]
