"""The wake-up times behind broker.scheduler: one binary heap, nothing removed from its middle.

A key has at most one live heap entry: an earlier wake-up pushes a new
entry (the old one is skipped when it comes up), a later one pushes nothing
(the old entry comes up first and is put back at the wanted time), a
cancelled key's entry is stale at once; the heap is rebuilt when stale
entries outnumber live ones, so a cancelled key is not held until its time.

This is the reference; ``broker.ssp._speedups.DeadlineQueue`` is its
compiled twin (the same entries, in the same order, with the same answers:
tests/test_deadlines.py), which broker.scheduler uses where it is built.
Times are numbers (never NaN); keys are hashable and never None.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from heapq import heappop, heappush

#: The heap is compacted when stale entries exceed live ones and this many.
MIN_COMPACT = 4096


class DeadlineQueue:
    """Each key's wanted wake-up time, and the heap that finds the earliest."""

    __slots__ = ("_heap", "_due", "_queued", "counter", "_min_compact")

    def __init__(self, min_compact: int = MIN_COMPACT) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}      # the time each key wants
        self._queued: dict[Hashable, float] = {}   # the time of its live heap entry
        #: The number of the newest heap entry (a tie-breaker: keys need not
        #: be comparable; and run_due's bound for entries pushed while it runs).
        self.counter = 0
        self._min_compact = min_compact

    def __len__(self) -> int:
        """How many keys have a pending wake-up."""
        return len(self._due)

    def __contains__(self, key) -> bool:
        return key in self._due

    def when(self, key) -> float | None:
        """The pending wake-up time of key, or None."""
        return self._due.get(key)

    def keys(self) -> list:
        """The keys with a pending wake-up."""
        return list(self._due)

    def heap_size(self) -> int:
        """Heap entries, live and stale (what compaction bounds)."""
        return len(self._heap)

    def schedule(self, key: Hashable, when: float) -> bool:
        """Wake key at ``when``; True if that pushed a heap entry (the earliest
        wake-up may have come forward), False if key's entry comes up first."""
        if key is None:
            raise TypeError("a wake-up's key cannot be None")
        self._due[key] = when
        queued = self._queued.get(key)
        if queued is not None and queued <= when:
            return False
        self._push(key, when)
        return True

    def _push(self, key, when) -> None:
        queued = self._queued
        queued[key] = when
        self.counter = counter = self.counter + 1
        heap = self._heap
        heappush(heap, (when, counter, key))
        if len(heap) > self._min_compact and len(heap) > 2 * len(queued):
            self._compact()

    def cancel(self, key: Hashable) -> None:
        """Forget key's wake-up: its heap entry is stale from now."""
        self._due.pop(key, None)
        if self._queued.pop(key, None) is not None:
            heap = self._heap
            if len(heap) > self._min_compact and len(heap) > 2 * len(self._queued):
                self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the live entries (one per queued key)."""
        queued = self._queued
        for key in [key for key in queued if key not in self._due]:
            del queued[key]
        heap = [(when, self.counter + i + 1, key) for i, (key, when) in enumerate(queued.items())]
        self.counter += len(heap)
        heapq.heapify(heap)
        self._heap = heap

    def earliest(self) -> float | None:
        """The earliest live wake-up, dropping stale entries on the way."""
        heap, queued, due = self._heap, self._queued, self._due
        while heap:
            when, _, key = heap[0]
            if queued.get(key) == when:
                if key in due:
                    return when
                del queued[key]  # cancelled
            heappop(heap)
        return None

    def pop_due(self, limit: float, newest: int):
        """The next key due by ``limit`` among the heap entries numbered up to
        ``newest`` (its wake-up is then forgotten), or None if there is none.
        A key postponed beyond limit is put back at its wanted time."""
        heap, due, queued = self._heap, self._due, self._queued
        while heap and heap[0][0] <= limit and heap[0][1] <= newest:
            when, _, key = heappop(heap)
            if queued.get(key) != when:
                continue  # superseded by an earlier entry
            del queued[key]
            wanted = due.get(key)
            if wanted is None:
                continue  # cancelled
            if wanted > limit:
                self._push(key, wanted)  # postponed meanwhile
                continue
            del due[key]
            return key
        return None
