"""Requests per second per caller (token or device): a token bucket each, bounded in number.

A bucket is two floats in a small list; idle buckets are full buckets, so
they are dropped when the table grows past its bound and nothing is lost.
"""

from __future__ import annotations

import math

#: buckets kept before full (idle) ones are swept out.
MAX_BUCKETS = 10_000
#: the longest Retry-After told (seconds): past it a client had better ask again.
MAX_RETRY_AFTER = 3600


class RateLimiter:
    """Allows ``rate`` requests a second per key, in bursts of up to ``2 * rate``."""

    __slots__ = ("rate", "burst", "_clock", "_buckets")

    def __init__(self, rate: float, clock) -> None:
        self.rate = rate
        self.burst = max(1.0, 2.0 * rate)
        self._clock = clock
        self._buckets: dict[str, list] = {}

    def check(self, key: str) -> float:
        """0.0 if a request of ``key`` may go now (and takes its token), else seconds to wait."""
        if self.rate <= 0:
            return 0.0
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._sweep(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        full = [key for key, (tokens, stamp) in self._buckets.items()
                if tokens + (now - stamp) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> bytes:
    """A Retry-After value: whole seconds, at least 1 and at most MAX_RETRY_AFTER
    (a wait that is huge, inf or nan is told as the most)."""
    if not seconds <= MAX_RETRY_AFTER:
        return str(MAX_RETRY_AFTER).encode("ascii")
    return str(max(1, math.ceil(seconds))).encode("ascii")
