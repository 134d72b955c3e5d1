"""Backup and restore of the SQLite registry database (broker-admin backup / restore).

Why not a file copy: a running broker writes the database through its WAL
file; copying ``registry.sqlite3`` (with or without ``-wal``) while it
commits can catch pages of different transactions, a torn database. The
backup goes through SQLite's online backup API in one step: one read
transaction, so one committed state, while the broker keeps committing.

Why every copy loses the clean-stop mark: a broker started on a restored
copy must take the start as unclean (restart.py). Dashboards hold cursors
issued after the copy was taken; a clean start would issue those numbers
again for other changes, and the dashboards would resume past changes
they never saw. Without the mark the start skips CURSOR_GAP cursors and
records the range above the copy's durable mark as dead, so those
dashboards are reset to a snapshot. A plain file copy of a stopped
broker's database is a backup too: restore removes the mark in every case.
The brokers on the replaced database may have run far past the backup
(more than CURSOR_GAP changes, or unclean starts of their own): the
restored change sequence starts at the replaced database's highest cursor
at least, so the skip clears every cursor they issued.

Why this order in a restore (a crash at any point leaves either the old
database or the new one, never a mix):

1. the new database is written to a temporary file (0600) in the data
   directory, checked and fsynced;
2. the old database is checkpointed: its ``-wal`` holds committed changes
   (and after an interrupted checkpoint the database file alone is not
   even consistent), so it cannot simply be deleted; the kept copy
   ``.before-restore`` is taken from it through the backup API;
3. only then are its ``-wal``, ``-shm`` (and ``-journal``) removed: a WAL
   left beside the new file would be replayed INTO it when the broker
   opens it, mixing the two databases;
4. the temporary file is renamed over the database and the directory is
   fsynced.

Each copy is written in rollback-journal mode: one self-contained file
(the broker switches a restored database back to WAL when it opens it).
"""

import fcntl
import os
import sqlite3
import tempfile
from contextlib import contextmanager
from typing import NamedTuple
from urllib.parse import quote

from .database import (APPLICATION_ID, BUSY_TIMEOUT_MS, MIGRATIONS, SCHEMA_VERSION,
                       database_path, next_cursor, prepare_directory, store_error, to_i64)
from .model import RETIRED_NUM
from .errors import StoreError
from .sqlite_rows import SEQUENCE_SQL

#: the lock file a running broker holds (flock) in its data directory (broker/service.py).
LOCK_NAME = "broker.lock"
#: how far above its own top a copy's change sequence starts when the
#: database it replaces cannot tell how far its brokers went (missing or
#: damaged): room for 255 unclean starts (restart.CURSOR_GAP each) after the
#: copy was taken, and cursors stay exact in a JavaScript number for 8,000
#: such restores.
RESTORE_GAP = 1 << 40
#: the suffix of the copy of the database a restore replaced.
KEPT_SUFFIX = ".before-restore"
#: files SQLite keeps beside a database, which belong to that file only.
SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_RESTORE_PREFIX = ".restore-"


class Copied(NamedTuple):
    """What one backup or restore wrote."""

    path: str           # the file written (absolute)
    devices: int
    tokens: int
    size: int           # bytes
    schema: int         # the registry schema version of the copy
    kept: str | None = None    # restore: the replaced database's copy, if kept


def backup(data_dir, dest, *, force=False):
    """Write a consistent copy of ``data_dir``'s database to ``dest`` (0600),
    without its clean-stop mark. Works beside a running broker. StoreError
    if ``dest`` exists (unless ``force``) or the database is not ours."""
    source = database_path(data_dir)
    dest = os.path.abspath(dest)
    if not force and os.path.lexists(dest):
        raise StoreError(f"{dest} exists; give another name, or --force to replace it")
    if os.path.exists(dest) and os.path.exists(source) and os.path.samefile(source, dest):
        raise StoreError(f"{dest} is the registry database itself")
    if os.path.exists(dest + "-wal"):
        # Replaced, it would get that log replayed into it: a mixed database.
        raise StoreError(f"{dest} is an SQLite database in use (it has a -wal file): "
                         "give another name")
    conn, schema = open_database(source, "the registry database")
    try:
        return _copy(conn, dest, replace=force,
                     prefix=f".{os.path.basename(dest)}.partial-")._replace(schema=schema)
    finally:
        conn.close()


def restore(data_dir, source, *, keep=True):
    """Replace ``data_dir``'s database by a copy of ``source`` (module
    docstring), without its clean-stop mark; the replaced one is kept as
    ``<name>.before-restore`` if ``keep``. StoreError if a broker holds the
    data directory, or ``source`` is not a registry database this broker reads."""
    target = os.path.abspath(database_path(data_dir))
    kept = target + KEPT_SUFFIX if keep else None
    conn, schema = open_database(source, "the backup")
    try:
        if os.path.exists(target) and os.path.samefile(source, target):
            raise StoreError(f"{target} is the data directory's database itself")
        prepare_directory(data_dir)
        with _no_broker(data_dir):
            if kept and os.path.lexists(kept):
                raise StoreError(f"{kept} exists (the database an earlier restore replaced): "
                                 "move it away, or --no-keep to keep no copy this time")
            _remove_stale_temporaries(data_dir)
            new = _copy(conn, None, prefix=_RESTORE_PREFIX, directory=data_dir,
                        floor=_top_cursor(target))._replace(schema=schema)
            try:
                _retire(target, kept)
                os.replace(new.path, target)
                _fsync_directory(data_dir)
            except BaseException:
                _unlink(new.path)
                raise
    finally:
        conn.close()
    return new._replace(path=target, kept=kept if kept and os.path.exists(kept) else None)


# -- checks -------------------------------------------------------------------

def open_database(path, what):
    """A read-only connection to the registry database at ``path`` and its schema
    version; StoreError naming the problem (missing, not SQLite, not ours, newer)."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        raise StoreError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise StoreError(f"cannot read {what} {path}: {e.strerror or e} (run as the broker's "
                         "user)") from None
    if magic != _SQLITE_MAGIC:
        raise StoreError(f"{what} {path} is not an SQLite database")
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {what} {path}: {e}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        schema = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as e:
        conn.close()
        # Side files it cannot create (a read-only directory) are no damage.
        raise (store_error(path, e) or StoreError(
            f"{what} {path} is damaged or not a database: {e}")) from None
    problem = None
    if app_id != APPLICATION_ID:
        problem = (f"is an SQLite database of another program (application_id {app_id:#x}), "
                   "not an ssp-broker registry")
    elif schema > SCHEMA_VERSION:
        problem = (f"has registry schema {schema}, newer than this broker's {SCHEMA_VERSION}: "
                   "use the broker version that wrote it")
    elif schema != SCHEMA_VERSION and schema not in MIGRATIONS:
        problem = f"has registry schema {schema}, which this broker cannot read"
    if problem:
        conn.close()
        raise StoreError(f"{what} {path} {problem}")
    return conn, schema


@contextmanager
def _no_broker(data_dir):
    """Hold the data directory's broker lock: none runs now, and none starts meanwhile."""
    path = os.path.join(data_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            who = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise StoreError(f"a broker is running on {os.path.abspath(data_dir)} ({who}, holding "
                             f"{LOCK_NAME}): stop it first, then restore, then start it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        os.close(fd)      # releases the lock


# -- copying -----------------------------------------------------------------

def _copy(conn, dest, *, prefix, replace=False, directory=None, floor=0):
    """Copy ``conn``'s database into a new 0600 file through the backup API, drop
    its clean-stop mark, check and fsync it, then publish it at ``dest`` (never
    over an existing file unless ``replace``). With ``dest`` None the temporary
    file in ``directory`` is the result, for the caller to rename. The
    temporary file's name starts with ``prefix``; ``floor``: see ``_write_copy``."""
    directory = directory or os.path.dirname(dest)
    try:
        fd, temporary = tempfile.mkstemp(prefix=prefix, dir=directory)   # mode 0600
    except OSError as e:
        raise StoreError(f"cannot write in {directory}: {e.strerror or e}") from None
    os.close(fd)
    try:
        devices, tokens = _write_copy(conn, temporary, floor)
        size = os.path.getsize(temporary)
        if dest is None:
            return Copied(temporary, devices, tokens, size, 0)
        _publish(temporary, dest, replace)
        _fsync_directory(directory)
    except BaseException:
        _unlink(temporary)
        raise
    return Copied(dest, devices, tokens, size, 0)


def _write_copy(conn, temporary, floor=0):
    """The copy itself; returns its (devices, tokens) counts. Its change
    sequence is raised to ``floor`` at least (``_top_cursor``; None: the
    replaced database cannot tell, RESTORE_GAP above its own); its session
    records are retired."""
    try:
        copy = sqlite3.connect(temporary, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot create {temporary}: {e}") from None
    try:
        conn.backup(copy)       # all pages in one step: one read transaction, one state
        copy.execute("PRAGMA journal_mode = DELETE")      # one file, no -wal beside it
        tables = {row[0] for row in copy.execute("SELECT name FROM sqlite_master")}
        if "meta" in tables:
            copy.execute("DELETE FROM meta WHERE key = 'clean_stop'")
            if floor is None:
                floor = next_cursor(copy) - 1 + RESTORE_GAP
            if floor:
                copy.execute(SEQUENCE_SQL, (floor,))
        if "sessions" in tables:
            # Never resumed (SessionRecord.retired): the devices went on past the copy.
            columns = {row[1] for row in copy.execute("PRAGMA table_info(sessions)")}
            retired = {"acked_remote_num": to_i64(RETIRED_NUM), "acked_remote_state": b"",
                       "local_num": 0, "local_state": b"", "seq_reservation": 0,
                       "remote_seq": 0}
            names = [name for name in retired if name in columns]   # older schemas
            copy.execute(f"UPDATE sessions SET {', '.join(f'{n} = ?' for n in names)}",
                         [retired[name] for name in names])
        check = copy.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise StoreError(f"the copy failed its check, the database is damaged: "
                             f"{'; '.join(str(row[0]) for row in check[:3])}")
        counts = tuple(copy.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                       if table in tables else 0 for table in ("devices", "tokens"))
    except sqlite3.Error as e:
        raise StoreError(f"cannot copy the database: {e}") from None
    finally:
        copy.close()
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return counts


def _publish(temporary, dest, replace):
    """Give the finished file its name: atomically, and never over an existing file
    unless ``replace`` (a hard link fails if the name exists)."""
    try:
        if replace:
            os.replace(temporary, dest)
            return
        try:
            os.link(temporary, dest)
        except FileExistsError:
            raise StoreError(f"{dest} exists; give another name, or --force to replace it") \
                from None
        except PermissionError:       # a file system without hard links (EPERM)
            if os.path.lexists(dest):
                raise StoreError(f"{dest} exists; give another name, or --force to replace it") \
                    from None
            os.rename(temporary, dest)
            return
        os.unlink(temporary)
    except OSError as e:
        raise StoreError(f"cannot write {dest}: {e.strerror or e}") from None


# -- replacing ---------------------------------------------------------------

def _retire(target, kept):
    """Make the old database at ``target`` safe to replace (module docstring,
    steps 2 and 3): checkpointed, copied to ``kept`` if given, its side files gone."""
    if not os.path.exists(target):
        wal = target + "-wal"
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            raise StoreError(f"{wal} holds changes of a database that is not there: move it "
                             "out of the data directory (with any -shm), then restore again")
        _remove_side_files(target)
        return
    try:
        conn = sqlite3.connect(f"file:{quote(target)}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the current database {target}: {e}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            raise StoreError(f"another process has {target} open (a broker-admin command?): "
                             "restore again when it is done")
        if kept:
            try:
                _copy(conn, kept, prefix=_RESTORE_PREFIX)
            except StoreError as e:
                raise StoreError(f"cannot keep a copy of the current database {target} "
                                 f"({e.message}): move it and its -wal and -shm files out of "
                                 "the data directory, or restore with --no-keep") from None
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            raise StoreError(f"another process is writing {target} (a broker-admin command?): "
                             "restore again when it is done") from None
        raise StoreError(f"the current database {target} cannot be read ({e}): move it and "
                         "its -wal and -shm files out of the data directory, then restore "
                         "again") from None
    finally:
        conn.close()           # the last connection: SQLite removes the -wal and -shm
    _remove_side_files(target)
    _fsync_directory(os.path.dirname(target))


def _top_cursor(target):
    """The highest change cursor the database being replaced stored, or None
    if it cannot tell: missing (moved away, or a new host, whose clients
    hold cursors of the old one) or damaged. The restored copy's sequence starts there at least: its
    unclean start then skips CURSOR_GAP above every cursor the replaced
    database's brokers issued, even if they ran far past the backup (more
    than CURSOR_GAP changes, or unclean restarts of their own since)."""
    if not os.path.exists(target):
        return None
    try:
        conn, _ = open_database(target, "the current database")
    except StoreError:
        return None            # _retire says what is wrong with it
    top = None
    try:
        # Each read alone: damage elsewhere in the file loses only its own.
        for query in ("SELECT coalesce(max(value), 0) FROM meta WHERE key LIKE 'dead:%'",
                      "SELECT coalesce(max(value), 0) FROM meta WHERE key = 'sequence'"):
            try:
                found = conn.execute(query).fetchone()[0]
            except sqlite3.Error:
                continue
            top = max(top or 0, found)
        try:
            top = max(top or 0, next_cursor(conn) - 1)
        except sqlite3.Error:
            pass
        return top
    finally:
        conn.close()


def _remove_side_files(target):
    for suffix in SIDE_FILES:
        _unlink(target + suffix)


def _remove_stale_temporaries(data_dir):
    """Temporary files of a restore that crashed (we hold the lock: none is in use)."""
    for name in os.listdir(data_dir):
        if name.startswith(_RESTORE_PREFIX):
            _unlink(os.path.join(data_dir, name))


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(directory):
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
