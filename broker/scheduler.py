"""One reactor timer for many deadlines: a heap of wake-up times.

Used by each part of the broker that holds a deadline per client (the SSP
sessions of broker.udp, the long polls of broker.web.api, the node
simulator): one heap and one reactor timer per part, whatever the number of
clients.  mosh
gives each connection its own select() timeout; a broker holding a
million sessions cannot keep a million reactor timers.  Sessions here only
say when they next need to run (``next_wakeup``); the scheduler keeps those
times in one binary heap and arms a single ``IDelayedCall`` for the earliest.
A session without a wake-up (an idle device: the broker only answers) costs
the scheduler nothing at all.

Entries are never removed from the middle of the heap.  A key has at most
one live entry: an earlier wake-up pushes a new entry (the old one is
skipped when it comes up), a later one pushes nothing (the old entry comes
up first and is put back at the wanted time), a cancelled key's entry is
stale at once; the heap is rebuilt when stale entries outnumber live ones,
so a cancelled key (an answered long poll) is not held until its time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from heapq import heappush

from twisted.logger import Logger

#: Timers closer together than this fire in one reactor call (seconds).  The
#: protocol's finest interval is mosh's 8 ms SEND_MINDELAY.
COALESCE = 0.001
#: The heap is compacted when stale entries exceed live ones and this many.
MIN_COMPACT = 4096


class WakeupScheduler:
    """Calls ``callback(key, now)`` for each key whose wake-up time has come.

    ``clock`` is an IReactorTime (the reactor, or ``task.Clock`` in tests),
    used only for its one ``callLater``; ``now`` is the monotonic time source
    the sessions are driven with (``clock.seconds`` by default).
    """

    log = Logger()

    def __init__(self, clock, callback: Callable[[Hashable, float], None],
                 now: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._callback = callback
        self._now = now or clock.seconds
        self._heap: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}      # the time each key wants
        self._queued: dict[Hashable, float] = {}   # the time of its live heap entry
        self._counter = 0  # tie-breaker: keys need not be comparable
        self._call = None
        self._call_time = None
        self._running = False
        self._stopped = False
        self.fired = 0

    def __len__(self) -> int:
        """How many keys have a pending wake-up."""
        return len(self._due)

    def __contains__(self, key) -> bool:
        return key in self._due

    def when(self, key) -> float | None:
        """The pending wake-up time of key, or None."""
        return self._due.get(key)

    def schedule(self, key: Hashable, when: float | None) -> None:
        """Wake key at ``when`` (monotonic seconds); None cancels its wake-up.

        Moving a wake-up later pushes nothing: the key's earlier heap entry
        comes up first and is then put back at the new time.  Sessions
        postpone far more often than they advance, so the heap (and the
        garbage it makes) stays small.
        """
        due = self._due
        if when is None:
            self.cancel(key)
            return
        due[key] = when
        queued = self._queued.get(key)
        if queued is not None and queued <= when:
            return
        self._push(key, when)
        if not self._running:
            self._arm()

    def _push(self, key, when: float) -> None:
        queued = self._queued
        queued[key] = when
        self._counter = counter = self._counter + 1
        heap = self._heap
        heappush(heap, (when, counter, key))
        if len(heap) > MIN_COMPACT and len(heap) > 2 * len(queued):   # (_maybe_compact)
            self._compact()

    def cancel(self, key: Hashable) -> None:
        """Forget key's wake-up (a retired session): its heap entry is stale from now."""
        self._due.pop(key, None)
        if self._queued.pop(key, None) is not None:
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        heap = self._heap
        if len(heap) > MIN_COMPACT and len(heap) > 2 * len(self._queued):
            self._compact()

    def stop(self) -> None:
        """Cancel the one reactor timer for good (the service is stopping)."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._call_time = None

    def _compact(self) -> None:
        """Rebuild the heap from the live entries (one per queued key)."""
        queued = self._queued
        for key in [key for key in queued if key not in self._due]:
            del queued[key]
        heap = [(when, self._counter + i, key) for i, (key, when) in enumerate(queued.items())]
        self._counter += len(heap)
        heapq.heapify(heap)
        self._heap = heap

    def _earliest(self) -> float | None:
        """The earliest live heap entry, dropping stale ones on the way."""
        heap, queued, due = self._heap, self._queued, self._due
        while heap:
            when, _, key = heap[0]
            if queued.get(key) == when:
                if key in due:
                    return when
                del queued[key]  # cancelled
            heapq.heappop(heap)
        return None

    def _arm(self) -> None:
        """Point the single reactor timer at the earliest wake-up."""
        if self._stopped:
            return
        earliest = self._earliest()
        call = self._call
        if earliest is None:
            if call is not None and call.active():
                call.cancel()
            self._call = self._call_time = None
            return
        if (call is not None and call.active() and self._call_time is not None
                and self._call_time <= earliest + COALESCE):
            # The timer fires early enough; an early fire just re-arms.
            return
        delay = max(0.0, earliest - self._now())
        if call is not None and call.active():
            call.reset(delay)
        else:
            self._call = self._clock.callLater(delay, self._fire)
        self._call_time = earliest

    def _fire(self) -> None:
        """Run every wake-up that is due (within COALESCE), then re-arm."""
        self._call = self._call_time = None
        self._running = True
        try:
            self.run_due(self._now())
        finally:
            self._running = False
            self._arm()

    def run_due(self, now: float) -> int:
        """Call back every key due at ``now``; returns how many ran."""
        heap, due, queued, callback = self._heap, self._due, self._queued, self._callback
        limit = now + COALESCE
        newest = self._counter  # wake-ups scheduled while running wait for the next turn
        ran = 0
        while heap and heap[0][0] <= limit and heap[0][1] <= newest:
            when, _, key = heapq.heappop(heap)
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
            ran += 1
            try:
                callback(key, now)
            except Exception:
                # One broken session must not stop the timer of all others.
                self.log.failure("wake-up of {key!r} failed", key=key)
        self.fired += ran
        return ran
