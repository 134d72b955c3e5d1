"""The SQLite database file: creation, identity checks, schema, encoding.

Shared by the writer-thread store (sqlite_store.py) and broker-admin
(admin.py). A database is ours only if its ``application_id`` and
``user_version`` say so; anything else (another program's file, a damaged
file, a newer schema) stops with StoreError and is never written to.
"""

import os
import sqlite3
import struct
import sys

import cbor2

from broker.files import make_private_dirs

from .errors import StoreError
from .history import History
# (the hand-written CBOR shared with history entries)
from .history_entry import _BYTE, _FLOAT64, _H16, _U64, cbor_head as _head
from .model import SessionRecord
from .values import thaw

# Python's sqlite3 module takes an int, float or str parameter as it is, but
# looks for an adapter of every bytes one the long way (two attribute
# lookups, one raising AttributeError inside) unless one is registered: the
# store binds three blobs per report. bytes(blob) is the blob itself.
sqlite3.register_adapter(bytes, bytes)

APPLICATION_ID = 0x53535042      # "SSPB"
SCHEMA_VERSION = 2
#: Schema changes a broker applies to an older file of ours: version -> SQL
#: that takes it to the next version.
MIGRATIONS = {
    # 2: the session record keeps the device's datagram sequence mark.
    1: "ALTER TABLE sessions ADD COLUMN remote_seq INTEGER NOT NULL DEFAULT 0",
}
DB_NAME = "registry.sqlite3"
_SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 10_000         # broker and broker-admin may wait on each other
#: Bytes the write-ahead log keeps on disk after a checkpoint. SQLite leaves
#: the file at its largest size otherwise: after one large transaction (an
#: unclean start rewrites every device row, restart.py) that is the size of
#: the whole database, for as long as the broker runs.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

SCHEMA = """
CREATE TABLE devices (
    number  INTEGER PRIMARY KEY,          -- device number (u64 < 2**63)
    name    TEXT NOT NULL UNIQUE,
    secret  BLOB NOT NULL,
    version INTEGER NOT NULL,
    cursor  INTEGER NOT NULL,
    state   BLOB                          -- CBOR of Device.state()
);
CREATE TABLE tombstones (
    id      INTEGER PRIMARY KEY,
    cursor  INTEGER NOT NULL,
    name    TEXT NOT NULL,
    number  INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX tombstones_cursor ON tombstones (cursor);
CREATE TABLE sessions (
    number INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL,          -- u64 stored as signed i64
    acked_remote_num INTEGER NOT NULL,
    acked_remote_state BLOB NOT NULL,
    local_num INTEGER NOT NULL,
    local_state BLOB NOT NULL,
    seq_reservation INTEGER NOT NULL,
    remote_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
    token_id   TEXT PRIMARY KEY,
    digest     BLOB NOT NULL,             -- SHA-256 of the token text
    role       TEXT NOT NULL CHECK (role IN ('read', 'write')),
    created_at REAL NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE admin_log (                  -- changes broker-admin made, for a running broker
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    op     TEXT NOT NULL,
    name   TEXT,
    number INTEGER
);
"""


def to_i64(n):
    """A u64 as SQLite's signed 64-bit integer."""
    return n - (1 << 64) if n >= 1 << 63 else n


def from_i64(n):
    """Inverse of to_i64."""
    return n + (1 << 64) if n < 0 else n


def database_path(data_dir):
    return os.path.join(data_dir, DB_NAME)


def _make_private(path, mode):
    """Take group and other permission bits off an existing file or directory."""
    current = os.stat(path).st_mode & 0o777
    if current & 0o077:
        os.chmod(path, current & mode)


def prepare_directory(data_dir):
    """Create the data directory private (0700) if missing; make an existing one private."""
    if not os.path.isdir(data_dir):
        try:
            make_private_dirs(data_dir)
        except OSError as e:
            raise StoreError(f"cannot create data directory {data_dir}: {e.strerror}") from None
        return
    try:
        _make_private(data_dir, 0o700)
    except OSError as e:
        raise StoreError(f"cannot make data directory {data_dir} private (mode 0700): "
                         f"{e.strerror}; it must belong to the broker's user (run as "
                         "that user)") from None


def connect(path, *, create=True, synchronous="FULL", migrate=True, must_write=True):
    """Open (or create, private 0600) the registry database at ``path``, checked.

    An older schema of ours is brought up to date only with ``migrate``: the
    broker does it as it starts; broker-admin refuses instead, as a broker
    of the older version may still be running on the file. With
    ``must_write`` (the broker) a file this user may only read is refused
    now rather than at the first write.
    """
    try:
        fresh = os.stat(path).st_size == 0
    except FileNotFoundError:
        fresh = True
    except OSError as e:
        # os.path.exists would say "no such file" for a directory this user may not search.
        raise StoreError(f"cannot read {path}: {e.strerror or e} (run as the broker's "
                         "user)") from None
    if fresh and not create:
        raise StoreError(f"no registry database at {path}")
    if not fresh:
        try:
            with open(path, "rb") as f:
                magic = f.read(len(_SQLITE_MAGIC))
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from None
        if magic != _SQLITE_MAGIC:
            raise StoreError(f"{path} is not an SQLite database (damaged or foreign); "
                             "refusing to touch it")
        # SQLite gives new -wal and -shm files the database's mode; older ones keep theirs.
        for file in (path, path + "-wal", path + "-shm"):
            try:
                _make_private(file, 0o600)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StoreError(f"cannot make {file} private (mode 0600): {e.strerror}; "
                                 "it must belong to the broker's user") from None
    else:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        except OSError as e:
            raise StoreError(f"cannot create {path}: {e.strerror}") from None
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        user_version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id == 0 and user_version == 0:
            conn.execute("BEGIN IMMEDIATE")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and tables:
                conn.execute("ROLLBACK")
                raise StoreError(f"{path} is an SQLite database of another program; "
                                 "refusing to touch it")
            if app_id == 0:      # still empty: another process did not just create it
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                # Nothing was ever announced from a new file: a clean stop
                # (restart.py; the mark is the sequence, none yet).
                conn.execute("INSERT INTO meta (key, value) VALUES ('clean_stop', 0)")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            user_version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise StoreError(f"{path} belongs to another program (application_id {app_id:#x}); "
                             "refusing to touch it")
        if user_version in MIGRATIONS:
            if not migrate:
                raise StoreError(f"{path} has registry schema {user_version}, older than this "
                                 f"version's {SCHEMA_VERSION}: start the broker (this version) "
                                 "once to upgrade it, then run this again")
            user_version = _migrate(conn)
        if user_version != SCHEMA_VERSION:
            raise StoreError(f"{path} has registry schema {user_version}; this broker "
                             f"understands {SCHEMA_VERSION}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{path}: cannot switch to WAL journal mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        # The store's multi-row statements (sqlite_rows.py) materialize their
        # VALUES in a temporary table: in memory that costs about 15% less
        # CPU than in a temporary file's pager. Durability is the WAL's only.
        conn.execute("PRAGMA temp_store = MEMORY")
        if must_write:
            # SQLite opens a file it may not write read-only, without a word,
            # and only the first write would fail: try one now, changing nothing.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("ROLLBACK")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise (store_error(path, e) or StoreError(
            f"{path} is damaged or not a registry database: {e}")) from None
    except StoreError:
        conn.close()
        raise
    return conn


def store_error(path, error):
    """The StoreError for an SQLite error on the database at ``path`` that is no damage
    (locked, read-only, side files it cannot create), or None."""
    name = getattr(error, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreError(f"{path} is locked: another broker-admin (a backup or restore "
                          "among them) or an sqlite3 shell holds it; a broker holds it only "
                          "for a moment: try again once that is done")
    if not name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return None
    directory = os.path.dirname(os.path.abspath(path))
    shm = path + "-shm"
    read_only_fs = _read_only_file_system(directory)
    if name.startswith("SQLITE_CANTOPEN") or not os.path.exists(shm):
        if read_only_fs:
            return StoreError(f"cannot open {path}: {directory} is on a read-only file system, "
                              f"and SQLite must create {os.path.basename(shm)} there to read "
                              "a database in WAL mode (to read it, copy the data directory "
                              "to a writable place)")
        if not os.access(directory, os.W_OK | os.X_OK):
            return StoreError(f"cannot open {path}: this user may not write in {directory}, "
                              f"and SQLite must create {os.path.basename(shm)} there to read "
                              "a database in WAL mode: run as the broker's user")
    if name.startswith("SQLITE_READONLY"):
        if read_only_fs:
            return StoreError(f"cannot write {path}: {directory} is on a read-only file system")
        return StoreError(f"cannot write {path}: read-only for this user; check the owner "
                          "and mode of the file and of its directory")
    return StoreError(f"cannot open {path}: {error}")


def _read_only_file_system(directory):
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# -- encoding -------------------------------------------------------------

#: RFC 8746 tag of a big-endian float64 typed array: sensor readings and
#: update times are mostly floats, and packing them is much faster.
TAG_FLOAT64 = 86
_FLOAT = frozenset((float,))
_PAIRS = {}
_ARRAYS = {}
#: the connection facts in their common form: a float, then (after the
#: address) a float and an unsigned integer of 8 bytes (session ids are).
_AFTER_ADDRESS = struct.Struct(">BdBQ").pack


def _f64_head(n):
    size = 8 * n
    if size < 24:
        return bytes((0xd8, TAG_FLOAT64, 0x40 | size))
    if size < 256:
        return bytes((0xd8, TAG_FLOAT64, 0x58, size))
    return bytes((0xd8, TAG_FLOAT64, 0x59)) + size.to_bytes(2, "big")


def _pair_packer(n):
    """A precompiled packer of two float64 typed arrays of ``n`` items (values, times)."""
    packer = _PAIRS.get(n)
    if packer is None:
        head = _f64_head(n)
        fmt = struct.Struct(f">{len(head)}s{n}d{len(head)}s{n}d")

        def packer(values, times, pack=fmt.pack, head=head):
            return pack(head, *values, head, *times)
        if n <= 256:
            _PAIRS[n] = packer
    return packer


def _array_packer(n):
    """A precompiled packer of one float64 typed array of ``n`` items."""
    packer = _ARRAYS.get(n)
    if packer is None:
        head = _f64_head(n)
        fmt = struct.Struct(f">{len(head)}s{n}d")

        def packer(items, pack=fmt.pack, head=head):
            return pack(head, *items)
        if n <= 256:
            _ARRAYS[n] = packer
    return packer


def _array(items, dumps):
    """CBOR of a tuple: a float64 typed array if it holds only floats; an
    array of numbers written here if it mixes in ints (a counter beside
    readings); cbor2 for anything else."""
    if _FLOAT.issuperset(map(type, items)):
        return _array_packer(len(items))(items)
    return _numbers(items, dumps)


def _numbers(items, dumps):
    """``_array`` of a tuple known not to hold only floats."""
    n = len(items)
    parts = [_BYTE[0x80 | n] if n < 24 else _head(0x80, n)]
    append = parts.append
    for v in items:
        tv = type(v)
        if tv is float:
            append(_FLOAT64(0xfb, v))
        elif tv is not int or not -_U64 <= v < _U64:
            return dumps(items)
        elif 0 <= v < 24:
            append(_BYTE[v])              # (a small counter: its one byte)
        else:
            append(_head(0, v) if v >= 0 else _head(0x20, -1 - v))
    return b"".join(parts)


def _scalar(v, dumps=cbor2.dumps):
    """CBOR of one connection fact (float, int, text, None, bool); others via cbor2."""
    tv = type(v)
    if tv is float:
        return _FLOAT64(0xfb, v)
    if v is None:
        return b"\xf6"
    if tv is bool:
        return b"\xf5" if v else b"\xf4"
    if tv is int and -_U64 <= v < _U64:
        return _head(0, v) if v >= 0 else _head(0x20, -1 - v)
    if tv is str:
        data = v.encode("utf-8")
        return _head(0x60, len(data)) + data
    return dumps(v)


#: one float64 typed array of one item (its head), then one float or two
_F64_ONE = _f64_head(1)
_ONE_TIME = struct.Struct(">3sd").pack
_ONE_PAIR = struct.Struct(">3sd3sd").pack
_EMPTY_ARRAY = b"\x80"
_EMPTY_MAP = b"\x80\x80\x80"
_KEYS_CACHE = {}
_KEYS_CACHE_SIZE = 10_000


def _keys_cbor(keys, dumps=cbor2.dumps):
    """CBOR of a key tuple; cached, as key tuples are shared by many devices."""
    encoded = _KEYS_CACHE.get(keys)
    if encoded is None:
        encoded = dumps(keys)
        if len(_KEYS_CACHE) < _KEYS_CACHE_SIZE:
            _KEYS_CACHE[keys] = encoded
    return encoded


def _map_cbor(keys, values, times, dumps=cbor2.dumps):
    """CBOR of one map kept as parallel tuples: three array items."""
    if len(keys) == 1 and type(times[0]) is float:
        # One reading (the usual device): the bytes of the loops below, without them.
        value = values[0]
        tv = type(value)
        if tv is float:
            return ((_KEYS_CACHE.get(keys) or _keys_cbor(keys))
                    + _ONE_PAIR(_F64_ONE, value, _F64_ONE, times[0]))
        if tv is int and 0 <= value < _U64:
            return b"".join((_KEYS_CACHE.get(keys) or _keys_cbor(keys), b"\x81",
                             _BYTE[value] if value < 24 else _head(0, value),
                             _ONE_TIME(_F64_ONE, times[0])))
    if not keys:
        return _EMPTY_MAP
    if _FLOAT.issuperset(map(type, times)):
        if _FLOAT.issuperset(map(type, values)):
            return _keys_cbor(keys) + _pair_packer(len(keys))(values, times)
        return _keys_cbor(keys) + _numbers(values, dumps) + _array_packer(len(keys))(times)
    return _keys_cbor(keys) + _array(values, dumps) + _array(times, dumps)


def encode_state(state):
    """CBOR array of a Device.state() tuple (12 items); see ``_encode``."""
    return _encode(*state)


def encode_device(dev):
    """``encode_state(dev.state())`` without building the tuple (the store's hot path)."""
    return _encode(dev.rkeys, dev.rvals, dev.rtimes, dev.dkeys, dev.dvals, dev.dtimes,
                   dev.online, dev.last_heard, dev.address, dev.rtt, dev.session_id,
                   dev.history)


#: The SQLite store's row encoder: ``encode_device``, or the compiled one
#: broker/registry/speedups.py installs (the usual device in C, the
#: others handed to ``encode_device``).
encode_row = encode_device


def install_compiled_encode(compiled) -> None:
    """Use ``compiled`` as ``encode_row``; None goes back to ``encode_device``."""
    global encode_row
    encode_row = compiled or encode_device


def _encode(rkeys, rvals, rtimes, dkeys, dvals, dtimes, online, last_heard, address,
            rtt, session_id, history, dumps=cbor2.dumps):
    """CBOR array of the 12 items of a device state.

    Hand-written for the common shapes, because it runs once per stored
    write: key tuples come from a cache, an all-float map becomes two
    float64 typed arrays packed by one precompiled struct, connection facts
    are encoded directly (in their usual types by one struct); anything
    unusual (nested values) goes through cbor2. ``decode_state`` (plain
    cbor2) reads either form.
    """
    if address is None:
        where = b"\xf6"
    elif len(address) == 2:
        host, port = address
        if type(host) is str and type(port) is int and 0 <= port < 0x10000 and host.isascii():
            n = len(host)
            where = b"".join((b"\x82", _BYTE[0x60 | n] if n < 24 else _head(0x60, n),
                              host.encode("ascii"),
                              _H16(0x19, port) if port >= 0x100 else _head(0, port)))
        else:
            where = b"\x82" + _scalar(host) + _scalar(port)
    else:
        where = dumps(list(address))
    if type(last_heard) is float and type(rtt) is float and type(session_id) is int \
            and 0x100000000 <= session_id < _U64:
        # The common connection facts (a session id is 64 random bits: 8 bytes).
        return b"".join((
            b"\x8c", _map_cbor(rkeys, rvals, rtimes), _map_cbor(dkeys, dvals, dtimes),
            b"\xf5" if online is True else _scalar(online), _FLOAT64(0xfb, last_heard), where,
            _AFTER_ADDRESS(0xfb, rtt, 0x1b, session_id),
            history.stored if type(history) is History else _history_cbor(history)))
    return b"".join((
        b"\x8c", _map_cbor(rkeys, rvals, rtimes), _map_cbor(dkeys, dvals, dtimes),
        b"\xf5" if online is True else _scalar(online), _scalar(last_heard), where,
        _scalar(rtt), _scalar(session_id), _history_cbor(history)))


def _history_cbor(history):
    """The stored form of a history (a History, or entry tuples)."""
    if not history:
        return _EMPTY_ARRAY
    if type(history) is not History:
        history = History.of(history)
    return history.cbor()


def _tag_hook(*args):
    # cbor2 5 calls hook(decoder, tag), cbor2 6 hook(tag, immutable)
    tag = args[1] if len(args) > 1 and isinstance(args[1], cbor2.CBORTag) else args[0]
    if tag.tag == TAG_FLOAT64 and type(tag.value) is bytes and len(tag.value) % 8 == 0:
        return struct.unpack(f">{len(tag.value) // 8}d", tag.value)
    return tag


def decode_state(blob):
    """Device.state() tuple from its CBOR (frozen values, interned keys).

    Raises StoreError if the blob is damaged.
    """
    if blob is None:
        return None
    try:
        (rkeys, rvals, rtimes, dkeys, dvals, dtimes, online, last_heard, address,
         rtt, session_id, history) = cbor2.loads(blob, tag_hook=_tag_hook)
        intern = sys.intern
        return (tuple(map(intern, rkeys)), tuple(map(thaw, rvals)), tuple(rtimes),
                tuple(map(intern, dkeys)), tuple(map(thaw, dvals)), tuple(dtimes),
                online, last_heard, address, rtt, session_id, History.from_stored(history))
    except (cbor2.CBORError, ValueError, TypeError, struct.error) as e:
        raise StoreError(f"damaged device state in the registry database: {e}") from None


def _migrate(conn):
    """Bring an older schema of ours up to SCHEMA_VERSION, one version per
    transaction (another process may be doing the same); returns the version."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in MIGRATIONS:
            conn.execute("COMMIT")
            return version
        conn.execute(MIGRATIONS[version])
        conn.execute(f"PRAGMA user_version = {version + 1}")
        conn.execute("COMMIT")


#: The session columns in row order (the table's own order, migrated or not).
SESSION_COLUMNS = ("number, session_id, acked_remote_num, acked_remote_state, local_num,"
                   " local_state, seq_reservation, remote_seq")


def session_params(records, top=1 << 63, wrap=1 << 64):
    """The rows of ``(number, SessionRecord)`` pairs, one after the other in
    one list (a multi-row statement's parameters), u64 fields as i64
    (``to_i64`` inline: the store writes one row per report)."""
    params = []
    for number, (sid, arn, ars, ln, ls, res, rseq) in records:
        params += (number, sid - wrap if sid >= top else sid,
                   arn - wrap if arn >= top else arn, ars, ln - wrap if ln >= top else ln, ls,
                   res - wrap if res >= top else res, rseq - wrap if rseq >= top else rseq)
    return params


def session_from_row(row):
    number, sid, arn, ars, ln, ls, res, rseq = row
    return number, SessionRecord(from_i64(sid), from_i64(arn), bytes(ars), from_i64(ln),
                                 bytes(ls), from_i64(res), from_i64(rseq))


def next_cursor(conn):
    """One above every cursor stored (broker-admin's own changes take none:
    restart.PENDING_CURSOR)."""
    row = conn.execute(
        "SELECT max(coalesce((SELECT max(cursor) FROM devices), 0),"
        " coalesce((SELECT max(cursor) FROM tombstones), 0),"
        " coalesce((SELECT max(value) FROM meta WHERE key IN ('sequence', 'horizon')), 0))"
    ).fetchone()
    return row[0] + 1
