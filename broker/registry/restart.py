"""Where the change sequence continues after a restart: dead cursor ranges.

The registry tells observers of a change, with its cursor, before the store
has made it durable (group commit follows), and ``changes_since`` serves it
at once. After a crash (``kill -9``, power loss) the restarted registry loads
only what was durable; a dashboard may hold a cursor of changes that were
lost. Were those cursors issued again for other changes, that dashboard
would resume past changes it never saw and keep values that were rolled
back. So after an unclean stop the registry continues CURSOR_GAP above the
highest cursor it loaded, and the store durably remembers the skipped range,
from the last cursor below which every change was durable, as *dead*: a
cursor strictly inside a dead range is answered with a reset (a snapshot).

A clean stop (the store's ``close`` committed everything) needs no gap; the
store says which it was (``Loaded.clean``). The range and a "running" mark
are made durable before the restarted registry announces anything
(``Store.begin``), so a crash right after a restart is unclean too. A dead
range wholly below the feed's horizon is dropped: such cursors are reset
by the horizon anyway.

A loaded entry whose cursor lies inside a dead range (stored above the
durable mark: a commit that ``max_batch`` cut wrote a device as it was
later, or commits after a failed one) moves to a new cursor above the
restart's (``move_out``), in the same transaction as the range: a cursor
handed out -- a snapshot page's end, an event id -- is never a dead one,
else a client paging through a snapshot would be reset on every page.

Why CURSOR_GAP = 2**32 is enough: changes announced but not yet durable
wait in the store's queue, each holding its Deferred (and queue entries),
a few hundred bytes, until its commit; 2**32 of them would need far more
than a terabyte, so memory ends such a backlog long before. While storage
fails outright the queue empties (failed writes errback) and the window
grows with time only: at the registry's measured peak (about 230k changes
a second, bench/registry.py) 2**32 cursors last over five hours of failing
commits. And cursors stay exact JSON numbers: 2**53 / 2**32 is two million
unclean starts.
"""

from bisect import bisect_right

from twisted.logger import Logger

#: cursors skipped after an unclean stop (module docstring).
CURSOR_GAP = 1 << 32
#: cursors are JSON numbers: a client in JavaScript reads them exactly below 2**53.
MAX_SAFE_CURSOR = (1 << 53) - 1

_log = Logger(namespace="broker.registry.restart")


def continue_cursors(loaded, cursor, horizon):
    """``(cursor to continue from, dead ranges to keep)`` for a registry that
    loaded ``loaded`` (a ``Loaded``): ``cursor`` is the highest cursor in the
    loaded data, ``horizon`` the feed's. Ranges are ``(low, high)`` pairs,
    both ends excluded (``high`` is a live cursor: the restart's own)."""
    dead = [(low, high) for low, high in loaded.dead if high > horizon]
    top = max([cursor] + [high for _, high in dead])
    if loaded.clean:
        return top, merge(dead)
    low = top if loaded.durable is None else min(loaded.durable, top)
    high = top + CURSOR_GAP
    if high > MAX_SAFE_CURSOR:
        _log.critical("the change cursor ({cursor}) is beyond 2**53 after an unclean stop: "
                      "JavaScript clients cannot resume from it exactly", cursor=high)
    return high, merge(dead + [(low, high)])


def merge(ranges):
    """Sorted, disjoint dead ranges covering the same cursors as ``ranges``.

    Overlapping ranges merge; ranges that only touch stay apart, as the
    shared end is a live cursor."""
    out = []
    for low, high in sorted(ranges):
        if out and low < out[-1][1]:
            if high > out[-1][1]:
                out[-1] = (out[-1][0], high)
        else:
            out.append((low, high))
    return out


def move_out(devices, tombstones, dead, cursor):
    """Give each loaded entry strictly inside a ``dead`` range a new cursor
    above ``cursor``, in cursor order: ``devices`` (Device records) change in
    place, ``tombstones`` (a list of ``(cursor, name, number, version)``) get
    new tuples. Returns ``(the highest cursor now, moves)``, a move being
    ``(kind, number, old cursor, new cursor)``, kind "device" or "tombstone"."""
    lows = [low for low, _ in dead]
    highs = [high for _, high in dead]

    def inside(c):
        i = bisect_right(highs, c)
        return i < len(lows) and lows[i] < c
    found = [(dev.cursor, "device", dev) for dev in devices if inside(dev.cursor)]
    found += [(t[0], "tombstone", i) for i, t in enumerate(tombstones) if inside(t[0])]
    found.sort(key=lambda item: item[0])
    moves = []
    for old, kind, item in found:
        cursor += 1
        if kind == "device":
            item.cursor = cursor
            moves.append((kind, item.number, old, cursor))
        else:
            stone = tombstones[item]
            tombstones[item] = (cursor,) + tuple(stone[1:])
            moves.append((kind, stone[2], old, cursor))
    return cursor, moves
