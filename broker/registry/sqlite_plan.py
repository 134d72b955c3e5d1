"""One transaction's SQL steps from the SQLite store's queued writes (sqlite_store.py).

Coalescing: each changed device's current state is encoded once and its
latest session record written once, in multi-row statements
(sqlite_rows.py); other operations keep their order. Tombstones broker-admin
stored (at restart.PENDING_CURSOR) are not this registry's: a prune keeps
them, a removal of their device replaces them, and ``("drop_pending",
number)`` deletes the one of a device the registry never loaded.
"""

from . import database
from .database import encode_state, session_params
from .restart import PENDING_CURSOR
from .sqlite_retry import Group
from .sqlite_rows import CHUNK, HORIZON_SQL, SESSION_SQL, STATE_SQL, rows_statements

__all__ = ["first_cursor", "flush_steps", "latest_records", "plan_steps"]

#: A state row that updates nothing (device numbers are never 0): the padding
#: of a multi-row statement (see ``_padded``).
NO_STATE_ROW = (0, 0, None, 0)


def latest_records(ops) -> dict:
    """Device number -> the latest session record among queued writes ``ops``."""
    latest = {}
    for op in ops:
        if type(op) is tuple:
            if op[0] == "session":
                latest[op[1]] = op[2]
            elif op[0] == "sessions":
                latest.update(zip(op[1], op[2]))
    return latest


def first_cursor(ops, cursors):
    """The cursor of the earliest change among queued writes ``ops`` (they are
    queued in cursor order), or None."""
    for i, op in enumerate(ops):
        kind = type(op)
        if kind is tuple:
            if op[0] == "state":
                return op[2]
            if op[0] == "add":
                return op[5]
            if op[0] == "remove":
                return op[4]
        elif kind is Group:
            if op.cursors:
                return op.cursors[0]
        elif cursors[i]:
            return cursors[i]
    return None


def _as_now(states, written) -> None:
    """Add to ``written`` the devices of ``states`` written as they are now
    (a Device; a "state" operation carries its own state)."""
    written.update(number for number, (op, _) in states.items() if type(op) is not tuple)


def plan_steps(ops, cursors, later_records=None):
    """``(steps, top)``: the steps writing ``ops`` in one transaction, and the
    highest cursor they write.

    ``later_records``: the latest session record of each device among
    the writes ``max_batch`` left for the next commit. A Device is
    written as it is now, maybe with states (and events) whose record
    is among those; that record then goes in this commit too, last, so
    that no commit holds a state newer than its device's record (after
    a crash the device would send those events again, and they would be
    stored twice).
    """
    steps = []
    states = {}           # device number -> (Device or "state" op, queued cursor)
    sessions = {}         # device number -> its latest SessionRecord
    written = set()       # devices this commit writes as they are now
    top = 0
    for i, op in enumerate(ops):
        if type(op) is not tuple:
            if type(op) is Group:
                for dev, cursor in zip(op.devs, op.cursors):
                    states[dev.number] = (dev, cursor)
            else:                          # write_state: a Device
                states[op.number] = (op, cursors[i])
            continue
        kind = op[0]
        if kind == "state":
            states[op[4]] = (op, 0)
            continue
        if kind == "session":
            sessions[op[1]] = op[2]
            continue
        if kind == "sessions":            # write_sessions
            sessions.update(zip(op[1], op[2]))
            continue
        if states or sessions:
            _as_now(states, written)
            top = max(top, flush_steps(steps, states, sessions))
        if kind == "add":
            _, number, name, secret, version, cursor, state = op
            steps.append(("add", "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?)",
                          (number, name, secret, version, cursor, encode_state(state)),
                          i, name))
            top = max(top, cursor)
        elif kind == "remove":
            _, number, name, version, cursor = op
            steps.append(("sql", "DELETE FROM devices WHERE number = ?", (number,)))
            steps.append(("sql", "DELETE FROM sessions WHERE number = ?", (number,)))
            # broker-admin's tombstone of this removal, if it made it (restart.py):
            # the removal is this one, at this registry's cursor.
            steps.append(("sql", "DELETE FROM tombstones WHERE number = ? AND cursor = ?",
                          (number, PENDING_CURSOR)))
            steps.append(("sql", "INSERT INTO tombstones (cursor, name, number, version)"
                          " VALUES (?, ?, ?, ?)", (cursor, name, number, version)))
            top = max(top, cursor)
        elif kind == "drop_pending":
            # A device added and removed by broker-admin that this registry
            # never loaded (admin_reload.py): its tombstone has no reader.
            steps.append(("sql", "DELETE FROM tombstones WHERE number = ? AND cursor = ?",
                          (op[1], PENDING_CURSOR)))
        elif kind == "secret":
            steps.append(("sql", "UPDATE devices SET secret = ? WHERE number = ?",
                          (op[2], op[1])))
        elif kind == "token_add":
            steps.append(("sql", "INSERT INTO tokens VALUES (?, ?, ?, ?)", op[1:]))
        elif kind == "token_del":
            steps.append(("sql", "DELETE FROM tokens WHERE token_id = ?", (op[1],)))
        elif kind == "prune":
            steps.append(("sql", "DELETE FROM tombstones WHERE cursor <= ? AND cursor > ?",
                          (op[1], PENDING_CURSOR)))
            steps.append(("sql", HORIZON_SQL, (op[1],)))
        elif kind == "read":
            steps.append(("read", op[1], i))
        elif kind != "barrier":
            raise ValueError(f"unknown store operation {kind!r}")
    if states or sessions:
        _as_now(states, written)
        top = max(top, flush_steps(steps, states, sessions))
    if later_records and written:
        flush_steps(steps, {}, {number: later_records[number]
                                for number in written.intersection(later_records)})
    return steps, top


def flush_steps(steps, states, sessions, encode=None):
    """Steps writing the latest state of each device changed since the last
    flush, and the latest session record of each device given one.

    A Device is written as it is now (its version, cursor and state
    agree); that is its last queued change, or a later one if
    ``max_batch`` cut the queue, which only makes it durable early
    (with the session record that names it: ``plan_steps``).
    A removed device (cursor 0) keeps the cursor of its queued change.
    Session records (one per device: last wins, as INSERT OR REPLACE
    would) go in multi-row statements too, not one statement each.
    ``encode``: a Device's row (default: ``database.encode_row``).
    Returns the highest cursor written.
    """
    if encode is None:
        encode = database.encode_row
    if sessions:
        params = session_params(sessions.items())
        sessions.clear()
        steps += rows_statements(SESSION_SQL, params)
    params = []
    top = 0
    for op, queued_cursor in states.values():
        if type(op) is tuple:
            _, version, cursor, state, number = op
            params += (version, cursor, encode_state(state), number)
        else:
            cursor = op.cursor or queued_cursor
            params += (op.version, cursor, encode(op), op.number)
        if cursor > top:
            top = cursor
    states.clear()
    if _padded(len(params) // 4) > len(params) // 4:
        # rows_statements pads its last statement by repeating the final
        # row: let that be a row matching no device rather than a device's
        # state (a few KiB with its history) written again.
        params += NO_STATE_ROW
    steps += rows_statements(STATE_SQL, params)
    return top


def _padded(rows):
    """How many rows ``rows_statements`` writes for ``rows`` (it pads its
    last statement to a power of two)."""
    start, size = 0, CHUNK
    while start < rows:
        left = rows - start
        if start and left < size:
            size = 1 << (left - 1).bit_length()
        else:
            size = min(CHUNK, 1 << (left.bit_length() - 1))
        start += size
    return start

