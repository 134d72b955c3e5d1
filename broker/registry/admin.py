"""Synchronous administration of a registry database (used by broker-admin).

Works whether or not a broker runs on the same data directory: each change
is one short ``BEGIN IMMEDIATE`` transaction (SQLite WAL lets the broker
keep reading and waits for our write lock), and it appends an entry to
``admin_log``, which a running broker polls (``DeviceRegistry.reload``) to
pick up added, removed or re-keyed devices and changed tokens.

An added device and a removal's tombstone are stored at
``restart.PENDING_CURSOR``, never at a cursor of their own: a running broker
issues cursors this process cannot see (those not yet stored), so any it
took could name two changes. The broker gives them cursors, when it reloads
the change or at its next start (restart.py).
"""

import os
import sqlite3
import stat
import time

from . import errors
from .database import (connect, database_path, decode_state, encode_state, prepare_directory,
                       store_error)
from .model import Device, DeviceView, TokenInfo
from .provisioning import check_name
from .restart import PENDING_CURSOR
from .secrets import ROLES, hash_token, new_device_number, new_secret, new_token

#: admin_log entries kept (a running broker reads them within seconds).
ADMIN_LOG_KEEP = 1000


def _check_directory(data_dir):
    """StoreError unless data_dir is a directory; os.path.isdir would call one behind a
    directory this user may not search missing."""
    try:
        is_directory = stat.S_ISDIR(os.stat(data_dir).st_mode)
    except FileNotFoundError:
        raise errors.StoreError(f"no data directory {data_dir}") from None
    except OSError as e:
        raise errors.StoreError(f"cannot read {data_dir}: {e.strerror or e} (run as the "
                                "broker's user)") from None
    if not is_directory:
        raise errors.StoreError(f"{data_dir} is not a directory (--data-dir names the data "
                                "directory, not the database)")


class AdminDatabase:
    """One registry database opened for administration."""

    def __init__(self, data_dir, *, create=False, random_bytes=os.urandom, now=time.time):
        if create:
            prepare_directory(data_dir)
        else:
            _check_directory(data_dir)
        # A broker of the older version may be running on an older file: only
        # a starting broker migrates it. list and show work on a file this user may
        # only read (in a directory where SQLite can create its -shm, or has one).
        self.path = database_path(data_dir)
        self._conn = connect(self.path, create=create, migrate=False, must_write=False)
        self._random_bytes = random_bytes
        self._now = now

    def close(self):
        self._conn.close()

    def _log(self, op, name=None, number=None):
        conn = self._conn
        seq = conn.execute("INSERT INTO admin_log (op, name, number) VALUES (?, ?, ?)",
                           (op, name, number)).lastrowid
        conn.execute("DELETE FROM admin_log WHERE seq <= ?", (seq - ADMIN_LOG_KEEP,))

    def _write(self, fn):
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            # Locked past the busy timeout, or read-only: say which file and why.
            problem = store_error(self.path, e)
            if problem is None:
                raise
            raise problem from None
        return result

    def _row(self, conn, name):
        row = conn.execute("SELECT number, name, secret, version, cursor, state FROM devices"
                           " WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise errors.UnknownDevice(name)
        return row

    # -- devices ---------------------------------------------------------------

    def add_device(self, name):
        """Provision ``name``: returns ``(device_number, secret)``."""
        check_name(name)

        def add(conn):
            if conn.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise errors.DeviceExists(name)
            number = new_device_number(self._random_bytes)
            while conn.execute("SELECT 1 FROM devices WHERE number = ?", (number,)).fetchone():
                number = new_device_number(self._random_bytes)
            secret = new_secret(self._random_bytes)
            dev = Device(name, number, secret, 1, PENDING_CURSOR)
            conn.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?)",
                         (number, name, secret, 1, PENDING_CURSOR, encode_state(dev.state())))
            self._log("device_add", name, number)
            return number, secret
        return self._write(add)

    def remove_device(self, name):
        def remove(conn):
            number, _, _, version, _, _ = self._row(conn, name)
            conn.execute("DELETE FROM devices WHERE number = ?", (number,))
            conn.execute("DELETE FROM sessions WHERE number = ?", (number,))
            conn.execute("INSERT INTO tombstones (cursor, name, number, version) VALUES (?, ?, ?, ?)",
                         (PENDING_CURSOR, name, number, version + 1))
            self._log("device_remove", name, number)
            return number
        return self._write(remove)

    def rotate_key(self, name):
        """A new secret for ``name``: returns ``(device_number, secret)``."""
        def rotate(conn):
            number = self._row(conn, name)[0]
            secret = new_secret(self._random_bytes)
            conn.execute("UPDATE devices SET secret = ? WHERE number = ?", (secret, number))
            self._log("device_key", name, number)
            return number, secret
        return self._write(rotate)

    def devices(self):
        """Views of every device, in name order."""
        return [self._view(row) for row in self._conn.execute(
            "SELECT number, name, secret, version, cursor, state FROM devices ORDER BY name")]

    def device(self, name):
        return self._view(self._row(self._conn, name))

    def _view(self, row):
        number, name, secret, version, cursor, state = row
        dev = Device(name, number, bytes(secret), version, cursor)
        if state is not None:
            dev.restore_state(decode_state(state))
        return DeviceView.of(dev)

    # -- tokens ----------------------------------------------------------------

    def add_token(self, role):
        """A new token: returns ``(token_id, token_text)``; only its hash is stored."""
        if role not in ROLES:
            raise errors.InvalidValue(f"token role must be one of {', '.join(ROLES)}")

        def add(conn):
            token_id, text = new_token(self._random_bytes)
            conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)",
                         (token_id, hash_token(text), role, self._now()))
            self._log("token")
            return token_id, text
        return self._write(add)

    def tokens(self):
        return [TokenInfo(tid, role, created) for tid, role, created in self._conn.execute(
            "SELECT token_id, role, created_at FROM tokens ORDER BY created_at, token_id")]

    def revoke_token(self, token_id):
        def revoke(conn):
            if conn.execute("DELETE FROM tokens WHERE token_id = ?", (token_id,)).rowcount == 0:
                raise errors.UnknownToken(f"unknown token {token_id!r}")
            self._log("token")
        return self._write(revoke)
