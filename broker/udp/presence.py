"""Who is online: a coarse timing wheel of "silent since" deadlines.

A device is offline after ``offline_after`` seconds without an authentic
datagram.  Rather than a timer per device, or moving a device between
buckets on every datagram, each online device number sits in one
one-second bucket; when the bucket comes due the owner checks the device's
real last-heard time and either reports it offline or adds it again for
its new deadline.  A datagram costs nothing here, and a device heard
regularly is looked at once per ``offline_after``.  The owner keeps the
slot it was given (``wheel_slot``) so that stale entries (a session
replaced meanwhile) are recognised and skipped.
"""

from __future__ import annotations

import math


class PresenceWheel:
    """One-second buckets of device numbers whose silence deadline falls in them."""

    __slots__ = ("offline_after", "_buckets", "_slots")

    def __init__(self, offline_after: float) -> None:
        if offline_after <= 0:
            raise ValueError(f"offline_after must be positive, got {offline_after}")
        self.offline_after = offline_after
        self._buckets: dict[int, list] = {}
        self._slots: dict[int, int] = {}  # one shared int object per slot

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def add(self, number, heard: float) -> int:
        """Hold number until heard + offline_after; returns its slot (keep it)."""
        slot = math.ceil(heard + self.offline_after)
        slot = self._slots.setdefault(slot, slot)
        bucket = self._buckets.get(slot)
        if bucket is None:
            self._buckets[slot] = [number]
        else:
            bucket.append(number)
        return slot

    def next_due(self) -> float | None:
        """When the earliest bucket comes due (None: nothing held)."""
        return float(min(self._buckets)) if self._buckets else None

    def due(self, now: float) -> list[tuple[int, object]]:
        """Every (slot, number) whose bucket is due at now, removed from the wheel."""
        found = []
        for slot in sorted(slot for slot in self._buckets if slot <= now):
            found.extend((slot, number) for number in self._buckets.pop(slot))
            self._slots.pop(slot, None)
        return found
