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

Versions after an unclean stop: a device's version, like a cursor, is
announced (ETag, long poll ``version=``, WebSocket, feed) before it is
durable, so a version seen before a crash may be lost with its state, and
issued again afterwards for another state: a write with ``If-Match`` on it
would then succeed against a state its writer never saw. So an unclean
start also moves every device to a new cursor above the restart's (clients
that resume hear of each device again, with its new version) and raises
its version to that new cursor, and at least CURSOR_GAP above the loaded
one, in the same transaction as the dead range (``Store.begin``). Why that
is enough: each change raises a device's version by one and the global
cursor by at least one (and a device broker-admin added starts at version
1, one above its first cursor at most), so no version ever issued exceeds
the highest cursor ever issued by more than one; the restart's cursor is
above every cursor issued before the crash (that is what the gap is for),
also after a restore of an older copy (sqlite_backup.py raises the copy's
sequence). The state a loaded version names is the one stored with it,
so the loaded versions themselves were never wrong: clients holding one
get a 412 on ``If-Match`` and the device again from the feed. Versions so
stay at or near the cursors, and within the cursors' budget below 2**53.

For the same reason a new device's version starts at the registry's
cursor (``add_device``, the reload of a device broker-admin added, and
``move_out`` for one no broker reloaded): a device removed and added
again under its name never issues a version its predecessor issued, so
an ETag of the removed device never names a state of the new one.

broker-admin's changes (admin.py) are stored at PENDING_CURSOR, not at a
cursor of their own: a running broker issues cursors broker-admin cannot
know (those not yet durable), so any it chose could be issued twice. The
running broker gives an added device a cursor when it reloads it, and its
removal of a device replaces broker-admin's tombstone with its own
(sqlite_plan.py); a removal of a device it never loaded (added and
removed between two reloads) drops broker-admin's tombstone, as no client
heard of that device. What no broker reloaded gets its cursor from
``move_out`` at the next start, like an entry in a dead range (a pending
device's version too: it starts at that cursor), pending
tombstones before every other moved entry, pending devices after them all,
so that a name removed and added again ends present for every client (an
existing device is its name's latest incarnation: any tombstone of its
name is older, whatever the cursors say).

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
#: the cursor of an entry broker-admin stored (admin.py): not in the feed
#: yet; the broker that loads it gives it a cursor of its own (move_out).
PENDING_CURSOR = 0

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


def move_out(devices, tombstones, dead, cursor, unclean=False):
    """Give loaded entries new cursors above ``cursor``: each one strictly
    inside a ``dead`` range or at PENDING_CURSOR (broker-admin's), and after
    an unclean start (``unclean``) every device, whose version then jumps
    too (module docstring). ``devices`` (Device records) change in place,
    ``tombstones`` (a list of ``(cursor, name, number, version)``) get new
    tuples. Returns ``(the highest cursor now, moves)``, a move being
    ``(kind, number, old cursor, new cursor, version)``, kind "device" or
    "tombstone", version the entry's own (a device's new one).

    Order: broker-admin's tombstones first, then the registry's own entries
    in cursor order, then broker-admin's devices (each pending group in
    stored order). A device that exists is its name's latest incarnation,
    so every tombstone of its name is older; pending entries carry no
    cursor to tell that, and sorting them by their shared PENDING_CURSOR
    sent a re-added name's tombstone after the new device, which feed
    clients then dropped. For the same reason a device of a pending
    tombstone's name that would not move moves too, after the tombstone."""
    lows = [low for low, _ in dead]
    highs = [high for _, high in dead]

    def inside(c):
        i = bisect_right(highs, c)
        return i < len(lows) and lows[i] < c
    pending_names = {t[1] for t in tombstones if t[0] <= PENDING_CURSOR}
    first = [(t[0], "tombstone", i) for i, t in enumerate(tombstones)
             if t[0] <= PENDING_CURSOR]
    found = [(t[0], "tombstone", i) for i, t in enumerate(tombstones)
             if t[0] > PENDING_CURSOR and inside(t[0])]
    last = []
    for dev in devices:
        if dev.cursor <= PENDING_CURSOR:
            last.append((dev.cursor, "device", dev))
        elif unclean or inside(dev.cursor) or dev.name in pending_names:
            found.append((dev.cursor, "device", dev))
    found.sort(key=lambda item: item[0])
    moves = []
    for old, kind, item in first + found + last:
        cursor += 1
        if kind == "device":
            item.cursor = cursor
            if unclean:
                item.version = max(cursor, item.version + CURSOR_GAP)
            elif old <= PENDING_CURSOR:
                # broker-admin's device: its version starts at its cursor, above
                # every version of a device of its name removed before.
                item.version = max(cursor, item.version)
            moves.append((kind, item.number, old, cursor, item.version))
        else:
            stone = tombstones[item]
            tombstones[item] = (cursor,) + tuple(stone[1:])
            moves.append((kind, stone[2], old, cursor, stone[3]))
    if moves and max(cursor, max(move[4] for move in moves)) > MAX_SAFE_CURSOR:
        _log.critical("device versions and change cursors ({cursor}) are beyond 2**53: "
                      "JavaScript clients cannot read them exactly", cursor=cursor)
    return cursor, moves
