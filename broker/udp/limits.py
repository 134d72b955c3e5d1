"""Rate limits of the UDP endpoint: global token buckets and per-device windows.

Per-device counting uses one-second windows held in a dict that is emptied
when the window turns, so only devices heard in the current second cost
memory; a million idle devices carry no limiter state at all.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; time is an argument."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._tokens = self.burst
        self._stamp = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; False means over the limit."""
        tokens = self._tokens
        elapsed = now - self._stamp
        if elapsed > 0:
            tokens += elapsed * self.rate
            burst = self.burst
            if not tokens < burst:    # (min(burst, tokens) without the call)
                tokens = burst
            self._stamp = now
        if tokens >= cost:
            self._tokens = tokens - cost
            return True
        self._tokens = tokens
        return False


class WindowCounter:
    """Counts events per key in one-second windows; ``allow`` says if a key is under ``limit``.

    The table is replaced (not grown) every window, so its size is bounded by
    the keys seen in one second, and those by the global limits.
    """

    __slots__ = ("limit", "_window", "_counts")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._window = None
        self._counts: dict = {}

    def __len__(self) -> int:
        return len(self._counts)

    def allow(self, key, now: float) -> bool:
        """Count one event for key; False once key passed ``limit`` in this window."""
        window = int(now)
        if window != self._window:
            self._window = window
            self._counts = {}
        counts = self._counts
        count = counts.get(key, 0) + 1
        counts[key] = count
        return count <= self.limit

    def exhausted(self, key, now: float) -> bool:
        """Whether key already used its whole budget in this window (counts nothing)."""
        if int(now) != self._window:
            return False
        return self._counts.get(key, 0) >= self.limit
