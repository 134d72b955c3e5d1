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

The heap itself (what is stale, when it is compacted) is broker.deadlines'
DeadlineQueue, or its compiled twin where the extension is built.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.logger import Logger

from broker import deadlines
from broker.ssp.speedups import CompiledDeadlineQueue

#: Timers closer together than this fire in one reactor call (seconds).  The
#: protocol's finest interval is mosh's 8 ms SEND_MINDELAY.
COALESCE = 0.001
#: The heap is compacted when stale entries exceed live ones and this many.
MIN_COMPACT = deadlines.MIN_COMPACT


def new_queue(min_compact: int):
    """The compiled DeadlineQueue where it is built, else the Python one."""
    if CompiledDeadlineQueue is not None:
        return CompiledDeadlineQueue(min_compact)
    return deadlines.DeadlineQueue(min_compact)


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
        self._queue = new_queue(MIN_COMPACT)
        self._call = None
        self._call_time = None
        self._running = False
        self._stopped = False
        self.fired = 0

    def __len__(self) -> int:
        """How many keys have a pending wake-up."""
        return len(self._queue)

    def __contains__(self, key) -> bool:
        return key in self._queue

    def when(self, key) -> float | None:
        """The pending wake-up time of key, or None."""
        return self._queue.when(key)

    def keys(self) -> list:
        """The keys with a pending wake-up."""
        return self._queue.keys()

    def heap_size(self) -> int:
        """Heap entries, live and stale (compaction bounds them)."""
        return self._queue.heap_size()

    def schedule(self, key: Hashable, when: float | None) -> None:
        """Wake key at ``when`` (monotonic seconds); None cancels its wake-up.

        Moving a wake-up later pushes nothing: the key's earlier heap entry
        comes up first and is then put back at the new time.  Sessions
        postpone far more often than they advance, so the heap (and the
        garbage it makes) stays small.
        """
        if when is None:
            self._queue.cancel(key)
        elif self._queue.schedule(key, when) and not self._running:
            self._arm()

    def cancel(self, key: Hashable) -> None:
        """Forget key's wake-up (a retired session): its heap entry is stale from now."""
        self._queue.cancel(key)

    def stop(self) -> None:
        """Cancel the one reactor timer for good (the service is stopping)."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._call_time = None

    def _arm(self) -> None:
        """Point the single reactor timer at the earliest wake-up."""
        if self._stopped:
            return
        earliest = self._queue.earliest()
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
        pop_due, callback = self._queue.pop_due, self._callback
        limit = now + COALESCE
        newest = self._queue.counter  # wake-ups scheduled while running wait for the next turn
        ran = 0
        while (key := pop_due(limit, newest)) is not None:
            ran += 1
            try:
                callback(key, now)
            except Exception:
                # One broken session must not stop the timer of all others.
                self.log.failure("wake-up of {key!r} failed", key=key)
        self.fired += ran
        return ran
