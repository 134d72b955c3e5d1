"""Multi-row SQL statements for the SQLite store's group commit.

``executemany`` binds each row holding the GIL and releases it around each
step, two GIL hand-overs per row, each of which may wait a switch interval
while the reactor thread is busy; one statement of many rows is one step.
Row counts are powers of two, so only a few distinct statements are ever
prepared (sqlite_store.py uses them).
"""

from .database import SESSION_COLUMNS

__all__ = ["CHUNK", "STATE_SQL", "MOVE_SQL", "SESSION_SQL", "SEQUENCE_SQL", "HORIZON_SQL",
           "DURABLE_SQL", "CLEAN_STOP_SQL", "rows_statements"]

#: most rows in one multi-row statement (SQLite allows 250000 parameters here;
#: 4096 rows of 7 parameters stay far below the historic 32766 as well).
CHUNK = 4096

STATE_SQL = ("UPDATE devices SET version = v.column1, cursor = v.column2, state = v.column3"
             " FROM (VALUES ", ") AS v WHERE devices.number = v.column4", 4)
#: a loaded device moved to a new cursor and version (restart.move_out).
MOVE_SQL = ("UPDATE devices SET cursor = v.column1, version = v.column2 FROM (VALUES ",
            ") AS v WHERE devices.number = v.column3 AND devices.cursor = v.column4", 4)
SESSION_SQL = (f"INSERT OR REPLACE INTO sessions ({SESSION_COLUMNS}) VALUES ", "", 8)
SEQUENCE_SQL = ("INSERT INTO meta (key, value) VALUES ('sequence', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)")
HORIZON_SQL = SEQUENCE_SQL.replace("'sequence'", "'horizon'")
#: every change at or below this cursor is durable (restart.py).
DURABLE_SQL = SEQUENCE_SQL.replace("'sequence'", "'durable'")
#: the clean-stop mark: the sequence as it was at the clean stop (a broker
#: that does not know the mark, an older one, moves the sequence past it).
CLEAN_STOP_SQL = ("INSERT OR REPLACE INTO meta (key, value) SELECT 'clean_stop',"
                  " coalesce((SELECT value FROM meta WHERE key = 'sequence'), 0)")
_statements = {}


def rows_statements(statement, params):
    """``(sql, params)`` steps writing rows given as one flat parameter list.

    ``params`` holds ``width`` values per row. Each statement holds a power
    of two of rows, so only a few distinct statements are ever prepared:
    the most rows that fit (at most CHUNK), then the rest in one statement
    padded by repeating its final row (the statements are idempotent).
    Padding all rows up to one statement would write up to twice as many
    rows; this way the padding stays below a third of them.
    """
    width = statement[2]
    steps = []
    rows = len(params) // width
    start = 0
    size = CHUNK
    while start < rows:
        left = rows - start
        if start and left < size:
            size = 1 << (left - 1).bit_length()                # the rest, padded
        else:
            size = min(CHUNK, 1 << (left.bit_length() - 1))    # the most that fit
        chunk = params[start * width:(start + min(size, left)) * width]
        if size > left:
            chunk += chunk[-width:] * (size - left)
        steps.append(("sql", _rows_sql(statement, size), chunk))
        start += size
    return steps


def _rows_sql(statement, size):
    """The statement writing ``size`` rows (prepared once per size)."""
    sql = _statements.get((statement, size))
    if sql is None:
        head, tail, width = statement
        row = "(" + ", ".join(["?"] * width) + ")"
        sql = _statements[(statement, size)] = head + ", ".join([row] * size) + tail
    return sql
