"""SQLite store: WAL file in the data directory, one writer thread, group commit.

Division of work, chosen for the GIL: every Python step happens on the
reactor thread, the writer thread runs (almost) only SQLite's C code.

* ``write`` (reactor thread) queues an operation and returns a Deferred;
  ``write_state`` (the hot path) queues the Device itself, and
  ``write_states`` several devices behind one Deferred (``write_sessions``
  likewise their session records). A queued write keeps no object but its
  Deferred (and a session record) alive until its commit: objects that
  live that long reach the GC's oldest generation and make full
  collections frequent and slow.
* At the end of the reactor turn (``callLater(0)``) in which the first
  write arrived at an idle writer, or when the writer finishes a commit,
  the reactor thread turns everything queued into a *plan*
  (sqlite_plan.py): each changed device's current state encoded once and
  its latest session record (coalescing: latest wins), packed into a few
  multi-row statements; other operations in order. Writes queued in one
  reactor turn therefore always share a commit (unless ``max_batch`` cuts).
* The writer thread runs the plan in ONE transaction and commits (fsync
  with ``synchronous`` FULL); writes arriving meanwhile wait for the next
  plan: group commit.
* Back on the reactor thread (``callFromThread``) the Deferreds of the
  whole commit fire in one pass over one list: a fired Deferred means the
  change is durable -- it survives ``kill -9`` and, with FULL, power loss.
* A commit that fails fails its Deferreds; its devices are written again
  later as they are then (sqlite_retry.py), so none stays behind on disk.
  Its device-state writes (``write_state``: changes the registry applied)
  fail with NotDurable, made once for the commit (once per writer token),
  the rest (barriers, batches, other operations) with the StoreError.
* Restarts (restart.py): ``begin`` commits, on the reactor thread before
  the writer starts, the dead cursor ranges, the loaded entries moved out
  of them (new cursors) and that a registry runs; each
  commit advances the ``durable`` mark (every change at or below it is
  stored) unless ``max_batch`` cut an earlier change off, or a commit of
  this run failed; ``close`` writes the clean-stop mark last.
* Closing is bounded: another process holding the write lock (an sqlite3
  shell left in a transaction) is waited for CLOSE_LOCK_WAIT seconds in
  all, not BUSY_TIMEOUT_MS per commit, and ``close`` reports what could not
  be stored (a CloseReport: the broker's last line names those devices).

Why multi-row statements: ``executemany`` binds each row holding the GIL
and releases it around each step, two GIL hand-overs per row; while the
reactor thread is busy each hand-over may wait a switch interval (the
"convoy effect"). One statement of up to CHUNK rows is one step (sqlite_rows.py).
"""

import queue
import sqlite3
import threading
import time
from array import array
from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .database import (BUSY_TIMEOUT_MS, SESSION_COLUMNS, connect, database_path,
                       decode_state, prepare_directory, session_from_row)
from .errors import DeviceExists, StoreError
from .model import UpdateResult
from .settings import RegistrySettings
from .sqlite_plan import first_cursor, latest_records, plan_steps
from .sqlite_rows import CLEAN_STOP_SQL, DURABLE_SQL, MOVE_SQL, SEQUENCE_SQL, rows_statements
from .sqlite_retry import CloseReport, UnsavedDevices
from .sqlite_retry import Group as _Group
from .store import DeviceRow, Loaded, Store, not_durable

#: seconds a closing store waits in all (every commit of the close together)
#: for another process's write lock: the stop must end well within systemd's
#: TimeoutStopSec=30s after the clients' stop_timeout.
CLOSE_LOCK_WAIT = 2.0
#: pauses (seconds; the last repeats) between tries for that lock, as SQLite's
#: own busy handler makes them.
LOCK_PAUSES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class _Exit:
    """The writer thread's last job: close the database, after the clean-stop mark if ``clean``."""

    __slots__ = ("clean",)

    def __init__(self, clean):
        self.clean = clean


def _fail(batch, failure):
    """Fail the Deferreds of a failed commit: the device-state writes (Devices,
    changes the registry applied) with NotDurable, one Failure shared by those
    without a token; the others with ``failure`` (a barrier applied nothing)."""
    ops, deferreds, tokens = batch[:3]
    applied = None
    store_error = failure.check(StoreError) is not None
    for d, op, token in zip(deferreds, ops, tokens):
        if type(op) is tuple or type(op) is _Group or not store_error:
            d.errback(failure)
        elif token is None:
            if applied is None:
                applied = Failure(not_durable(failure.value))
            d.errback(applied)
        else:
            d.errback(Failure(not_durable(failure.value, token)))


class SQLiteStore(Store):
    """The embedded default store (see module docstring)."""

    log = Logger()
    #: CLOSE_LOCK_WAIT, and how the writer pauses between tries for the lock (tests).
    close_lock_wait = CLOSE_LOCK_WAIT
    lock_sleep = staticmethod(time.sleep)

    def __init__(self, path, *, reactor, settings=None, clock=None):
        settings = settings or RegistrySettings()
        self.path = path
        self._reactor = reactor
        self._max_batch = settings.max_batch
        self._conn = connect(path, synchronous=settings.synchronous)
        # Queued writes, reactor thread only, as parallel lists (no object
        # per write beyond its Deferred: the garbage collector's work grows
        # with objects that live until the commit). ``_ops`` holds an
        # operation tuple, or a Device whose state is written (``write_state``);
        # then ``_results`` holds its token and version/cursor say which change.
        self._ops = []
        self._deferreds = []
        self._results = []
        self._versions = array("q")
        self._cursors = array("q")
        self._busy = False            # a plan is with the writer thread
        self._soon = None             # the end-of-turn hand-over (IDelayedCall)
        # Plans handed to the writer (at most one at a time), then _Exit. A
        # SimpleQueue wakes the writer in C: an Event's Python-level
        # Condition cost about 1 us of the reactor thread per plan.
        self._jobs = queue.SimpleQueue()
        self._closing = False
        self._closed = None
        self._close_wait_left = 0.0   # of close_lock_wait, once closing (writer thread)
        self._own_lock_waits = False  # busy_timeout 0: _begin_write pauses itself
        self._marked = False          # the clean-stop mark is written
        self._thread = None
        self._begun = False           # begin() recorded that a registry runs
        self._durable = 0             # the durable mark planned last (restart.py)
        #: events the registry exports with its own (broker_registry_events_total).
        self.counters = Counter()
        #: the devices of failed commits, written again (``clock``: its timer).
        self.unsaved = UnsavedDevices(reactor if clock is None else clock, self._rewrite,
                                      self.counters)
        #: commits done and operations written (for the benchmark and metrics).
        self.commits = 0
        self.operations = 0

    @classmethod
    def in_directory(cls, data_dir, **kwargs):
        """The store of a data directory (created 0700, database 0600)."""
        prepare_directory(data_dir)
        return cls(database_path(data_dir), **kwargs)

    # -- reactor-thread side ------------------------------------------------

    def load(self):
        if self._thread is not None:
            raise RuntimeError("load() runs before the first write")
        conn = self._conn
        try:
            # One read transaction: one committed state, whatever broker-admin
            # commits meanwhile (its later changes are in the admin log).
            conn.execute("BEGIN")
            loaded = Loaded()
            loaded.devices = [DeviceRow(n, name, bytes(secret), version, cursor, decode_state(state))
                              for n, name, secret, version, cursor, state in conn.execute(
                                  "SELECT number, name, secret, version, cursor, state FROM devices")]
            loaded.tombstones = conn.execute(
                "SELECT cursor, name, number, version FROM tombstones ORDER BY id").fetchall()
            loaded.tokens = [(tid, bytes(digest), role, created) for tid, digest, role, created in
                             conn.execute("SELECT token_id, digest, role, created_at FROM tokens")]
            loaded.sessions = [session_from_row(row) for row in conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions")]
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            loaded.sequence = meta.get("sequence", 0)
            loaded.horizon = meta.get("horizon", 0)
            # No mark: a broker of this version was running (or an older one
            # ran last, whose stop is unknown): unclean (restart.py).
            loaded.clean = meta.get("clean_stop") == loaded.sequence
            loaded.durable = meta.get("durable", 0)
            loaded.dead = sorted((int(key[5:]), high) for key, high in meta.items()
                                 if key.startswith("dead:"))
            loaded.admin_seq = conn.execute(
                "SELECT coalesce(max(seq), 0) FROM admin_log").fetchone()[0]
        except (sqlite3.DatabaseError, ValueError) as e:
            raise StoreError(f"{self.path} is damaged: {e}") from None
        except StoreError as e:
            raise StoreError(f"{self.path}: {e.message}") from None
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")      # (it only read)
        return loaded

    def begin(self, cursor, dead, moves=()):
        """Record the start (see Store.begin) in one transaction, on this thread:
        the writer has not started yet."""
        if self._thread is not None:
            raise RuntimeError("begin() runs before the first write")
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM meta WHERE key = 'clean_stop' OR key LIKE 'dead:%'")
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [(f"dead:{low}", high) for low, high in dead])
            # After an unclean stop every device moves (restart.move_out):
            # multi-row statements, as for the states of a commit.
            params = []
            for kind, number, old, new, version in moves:
                if kind == "device":
                    params += (new, version, number, old)
            for _, sql, chunk in rows_statements(MOVE_SQL, params):
                conn.execute(sql, chunk)
            conn.executemany("UPDATE tombstones SET cursor = ? WHERE number = ? AND cursor = ?",
                             [(new, number, old) for kind, number, old, new, _ in moves
                              if kind == "tombstone"])
            # Where cursors continue (sqlite_backup.py reads it).
            conn.execute(SEQUENCE_SQL, (cursor,))
            conn.execute(DURABLE_SQL, (cursor,))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._roll_back()
            raise StoreError(f"{self.path}: cannot record the start: {e}") from None
        self._begun = True
        self._durable = cursor

    def write(self, op, result=None):
        if self._closing:
            return defer.fail(StoreError("the registry store is closed"))
        return self._queue(op, result)

    def _queue(self, op, result=None):
        """Queue one operation (also while closing: the last try of unsaved devices)."""
        d = defer.Deferred()
        self._ops.append(op)
        self._deferreds.append(d)
        self._results.append(result)
        self._versions.append(0)
        self._cursors.append(0)
        if not self._busy and self._soon is None:
            self._soon = self._reactor.callLater(0, self._hand_over)
        return d

    def write_state(self, dev, token=None):
        """Queue the device itself: its latest state is read and encoded at plan time."""
        if self._closing:
            return defer.fail(not_durable(StoreError("the registry store is closed"), token))
        d = defer.Deferred()
        self._ops.append(dev)
        self._deferreds.append(d)
        self._results.append(token)
        self._versions.append(dev.version)
        self._cursors.append(dev.cursor)
        if not self._busy and self._soon is None:
            self._soon = self._reactor.callLater(0, self._hand_over)
        return d

    def write_states(self, devs, result=None):
        """Queue several devices as ONE write: one Deferred, one transaction."""
        return self.write(_Group(list(devs)), result)

    def write_sessions(self, numbers, records, result=None):
        """Queue the session records of several devices as ONE write."""
        return self.write(("sessions", numbers, records), result)

    def barrier(self, result=None):
        return self.write(("barrier",), result)

    def barrier_for(self, devs, result=None):
        """A barrier naming the Devices ``devs`` (see Store.barrier_for): after a
        failed commit of this run it writes their states (``_settle``)."""
        return self.write(("barrier", tuple(devs)) if devs else ("barrier",), result)

    def _read(self, fn):
        return self.write(("read", fn))

    def admin_changes(self, after):
        return self._read(lambda conn: conn.execute(
            "SELECT seq, op, name, number FROM admin_log WHERE seq > ? ORDER BY seq",
            (after,)).fetchall())

    def fetch_device(self, number):
        def fetch(conn):
            row = conn.execute("SELECT number, name, secret, version, cursor, state FROM devices"
                               " WHERE number = ?", (number,)).fetchone()
            if row is None:
                return None
            n, name, secret, version, cursor, state = row
            return DeviceRow(n, name, bytes(secret), version, cursor, decode_state(state))
        return self._read(fetch)

    def fetch_tokens(self):
        return self._read(lambda conn: [
            (tid, bytes(digest), role, created) for tid, digest, role, created in
            conn.execute("SELECT token_id, digest, role, created_at FROM tokens")])

    def close(self):
        """Commit everything queued, stop the writer thread, close the database:
        a Deferred firing with a CloseReport (what could not be stored)."""
        if self._closed is None:
            self._close_wait_left = self.close_lock_wait
            self._closing = True
            self._closed = defer.Deferred()
            # One last try for the devices of failed commits (also of one that
            # fails while closing: UnsavedDevices.failed).
            self.unsaved.close()
            if not self._busy:
                self._next()              # commit what is queued, then exit
        done = defer.Deferred()
        self._closed.addBoth(lambda r: (done.callback(self._close_report()), r)[1])
        return done

    def _close_report(self):
        return CloseReport(self._marked, self.unsaved.unstored(), self.unsaved.last_error)

    def _hand_over(self):
        """Turn what is queued into a plan and give it to the writer thread."""
        if self._soon is not None:
            if self._soon.active():
                self._soon.cancel()
            self._soon = None
        if self._busy or not self._ops:
            return
        if self.unsaved.failed_commits:
            self._settle()
        if self.unsaved:
            self._with_unsaved_states()
        n = self._max_batch
        batch = (self._ops[:n], self._deferreds[:n], self._results[:n],
                 self._versions[:n], self._cursors[:n])
        del self._ops[:n], self._deferreds[:n], self._results[:n], self._versions[:n], \
            self._cursors[:n]
        try:
            plan = self._plan(*batch, later_records=latest_records(self._ops),
                              later_cursor=first_cursor(self._ops, self._cursors))
        except (ValueError, TypeError) as e:     # a value CBOR cannot encode
            self.log.failure("registry writes could not be encoded")
            self._fire(batch, Failure(StoreError(f"storage failed: {e}")))
            self._next()
            return
        self._busy = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="registry-writer", daemon=True)
            self._thread.start()
        self._jobs.put(plan)

    def _settle(self):
        """Turn the queued barriers naming devices into writes of their states.

        After a failed commit a device's state may be unsaved (or queued again
        behind this barrier, or in the commit failing now): a write that
        changed nothing must not be acknowledged with a version the disk does
        not hold. Writing the state again is harmless if it was saved."""
        ops = self._ops
        for i, op in enumerate(ops):
            if type(op) is tuple and op[0] == "barrier" and len(op) > 1:
                devs = [dev for dev in op[1] if dev.cursor]      # (cursor 0: removed)
                ops[i] = _Group(devs) if devs else ("barrier",)

    def _with_unsaved_states(self):
        """Put first in the queue the states of unsaved devices whose session
        records are queued, so that each commits with (or before) its record."""
        devs = self.unsaved.recorded(self._ops)
        if devs:
            d = defer.Deferred()
            d.addErrback(lambda failure: failure.trap(StoreError))
            self._ops.insert(0, _Group(devs))
            self._deferreds.insert(0, d)
            self._results.insert(0, None)
            self._versions.insert(0, 0)
            self._cursors.insert(0, 0)

    def _plan(self, ops, deferreds, results, versions, cursors, later_records=None,
              later_cursor=None):
        """``(steps, batch)`` for one transaction of the writes in ``batch``
        (sqlite_plan.py), with the sequence and the durable mark.

        ``later_cursor``: the earliest change among the writes ``max_batch``
        left for the next commit; the durable mark stays below it (a Device
        written as it is now may carry a later cursor than a change still
        waiting).
        """
        steps, top = plan_steps(ops, cursors, later_records)
        if top:
            steps.append(("sql", SEQUENCE_SQL, (top,)))
            if later_cursor is not None:
                top = min(top, later_cursor - 1)
            # A failed commit's changes may be lost in a crash: the mark stays.
            if top > self._durable and not self.unsaved.failed_commits:
                self._durable = top
                steps.append(("sql", DURABLE_SQL, (top,)))
        return steps, (ops, deferreds, results, versions, cursors)

    def _done(self, batch, results, failures):
        """Fire every Deferred of one commit, in write order, in one pass.

        ``failures`` is None, or a dict (index -> Failure), or one Failure
        for all (the commit failed).
        """
        self._busy = False
        self.commits += 1
        self.operations += len(batch[1])
        if isinstance(failures, Failure):
            self.unsaved.failed(batch[0], failures.value)
        else:
            self.unsaved.saved(batch[0])
        self._fire(batch, failures, results)
        self._next()

    def _rewrite(self, devs):
        """Queue ``devs`` again with their session records; nobody waits on it
        (a failure is logged by the commit and retried)."""
        self._queue(_Group(list(devs))).addErrback(lambda failure: failure.trap(StoreError))
        records = [(dev.number, dev.session) for dev in devs if dev.session is not None]
        if records:
            numbers, kept = map(list, zip(*records))
            self._queue(("sessions", numbers, kept)).addErrback(
                lambda failure: failure.trap(StoreError))

    @staticmethod
    def _fire(batch, failures, results=None, new=tuple.__new__):
        """Fire the Deferreds of ``batch``: with their results, or with failures."""
        ops, deferreds, tokens, versions, cursors = batch
        if results is None:
            results = tokens
        if isinstance(failures, Failure):
            _fail(batch, failures)
            return
        if failures:
            for i, (d, op, result, version, cursor) in enumerate(
                    zip(deferreds, ops, results, versions, cursors)):
                if i in failures:
                    d.errback(failures[i])
                elif type(op) is tuple or type(op) is _Group:
                    d.callback(result)
                else:
                    d.callback(new(UpdateResult, (op.name, version, cursor, result)))
            return
        for d, op, result, version, cursor in zip(deferreds, ops, results, versions, cursors):
            if type(op) is tuple or type(op) is _Group:
                d.callback(result)
            else:
                d.callback(new(UpdateResult, (op.name, version, cursor, result)))

    def _next(self):
        """The writer is idle: hand over what waits, or let it exit if closing.

        Not if a plan is with the writer again: ``_done`` calls this after
        firing Deferreds whose callbacks may have closed the store, which
        hands over at once."""
        if self._busy:
            return
        if self._ops:
            self._hand_over()
        elif not self._closing:
            pass
        elif self._thread is not None:
            self._jobs.put(_Exit(self._stopped_clean()))
        elif not self._closed.called:
            if self._stopped_clean():
                self._mark_clean_stop()
            self._conn.close()
            self._closed.callback(None)

    def _stopped_clean(self):
        """Everything this run announced is stored: it began, and no commit of
        it failed (a failed one's changes may have been lost before the retry)."""
        return self._begun and not self.unsaved and not self.unsaved.failed_commits

    def _mark_clean_stop(self):
        """The last commit: the clean-stop mark (either thread; the other is idle)."""
        conn = self._conn
        try:
            self._begin_write(conn)
            conn.execute(CLEAN_STOP_SQL)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._roll_back()
            # The next start is unclean: it skips a gap, harmless.
            self.log.error("registry clean-stop mark not written: {error}", error=e)
        else:
            self._marked = True

    def _begin_write(self, conn):
        """BEGIN IMMEDIATE, waiting for another process's write lock up to
        BUSY_TIMEOUT_MS; once the store closes, only what is left of
        ``close_lock_wait`` for the whole close (either thread; the other is idle).

        The pauses are ours, not SQLite's busy handler's: nothing cuts that
        one short, so a stop would wait BUSY_TIMEOUT_MS for the commit under
        way and again for each one after it."""
        if not self._own_lock_waits:
            conn.execute("PRAGMA busy_timeout = 0")
            self._own_lock_waits = True
        waited = 0.0
        pauses = iter(LOCK_PAUSES)
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                closing = self._closing
                left = self._close_wait_left if closing else BUSY_TIMEOUT_MS / 1000 - waited
                if left <= 0:
                    raise
                pause = min(next(pauses, LOCK_PAUSES[-1]), left)
                self.lock_sleep(pause)
                waited += pause
                if closing:
                    self._close_wait_left -= pause

    # -- writer thread ------------------------------------------------------

    def _run(self):
        take = self._jobs.get
        while True:
            job = take()
            if type(job) is _Exit:
                if job.clean:
                    self._mark_clean_stop()
                self._conn.close()
                self._reactor.callFromThread(self._closed.callback, None)
                return
            steps, batch = job
            try:
                results, failures = self._execute(steps, batch[2])
            except Exception as e:
                # Last resort, on purpose broad: if this thread died, every
                # later write would wait forever. Fail this plan loudly instead.
                self.log.failure("registry writer failed on {count} writes",
                                 count=len(batch[1]))
                self._roll_back()
                results, failures = None, Failure(StoreError(f"storage failed: {e!r}"))
            self._reactor.callFromThread(self._done, batch, results, failures)

    def _execute(self, steps, results):
        """Run one plan in one transaction: ``(results, failures)`` as ``_done`` takes them.

        ``results`` (the plan's own list) gets the values of reads.
        """
        conn = self._conn
        failures = None
        try:
            if conn.in_transaction:          # left open by a failed ROLLBACK
                conn.execute("ROLLBACK")
            self._begin_write(conn)
            for step in steps:
                kind = step[0]
                if kind == "sql":
                    conn.execute(step[1], step[2])
                    continue
                if kind == "add":
                    try:
                        conn.execute(step[1], step[2])
                    except sqlite3.IntegrityError:
                        failures = failures or {}
                        failures[step[3]] = Failure(DeviceExists(step[4]))
                else:   # read
                    try:
                        results[step[2]] = step[1](conn)
                    except StoreError:
                        failures = failures or {}
                        failures[step[2]] = Failure()
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._roll_back()
            self.log.error("registry commit of {count} writes failed: {error}",
                           count=len(results), error=e)
            return None, Failure(StoreError(f"storage failed: {e}"))
        return results, failures

    def _roll_back(self):
        """End a failed transaction. A ROLLBACK that fails too (the disk that
        failed the commit) must not end the writer thread: every later write
        would wait forever. The next plan rolls back first (``_execute``)."""
        conn = self._conn
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            self.log.error("registry rollback failed: {error}", error=e)
