"""The storage interface of the registry, and the in-memory store.

A store is small on purpose: load everything once at start, then take
writes (small tuples, below) and say when each is durable. The registry
keeps the live state in memory; the store only makes it survive restarts.

Write operations (the first item names the kind):

* ``("add", number, name, secret, version, cursor, state)``: new device row
* ``("state", version, cursor, state, number)``: a device's state changed;
  consecutive state writes of one device may be coalesced (last wins)
* ``("remove", number, name, version, cursor)``: delete the device and its
  session, remember a tombstone at ``cursor``
* ``("secret", number, secret)``: key rotation
* ``("session", number, SessionRecord)``
* ``("token_add", token_id, digest, role, created_at)``, ``("token_del", token_id)``
* ``("prune", horizon)``: forget tombstones at or below ``horizon`` and
  remember it (cursors below it get a reset answer, also after a restart)
* ``("drop_pending", number)``: forget broker-admin's tombstone of a device
  this registry never loaded, still without a cursor (SQLite only: the one
  store broker-admin writes beside a running broker; admin_reload.py)

Before the first write the registry calls ``begin`` (restart.py): the store
durably records where the cursors continue, the dead cursor ranges, the
entries moved to new cursors (and versions), and that a registry runs (so
that a stop without ``close`` reads as unclean).

``state`` is ``Device.state()``: a tuple of plain values the store encodes.

A failed state write (``write_state``) fails with NotDurable, not a plain
StoreError: the registry applied the change before writing it, and the
store keeps it to write again, so its writer must not send it again. The
store makes that error itself, once per failed commit (not an errback per
write: ``update_reported`` is the hot path).
"""

from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.python.failure import Failure

from .errors import NotDurable, StoreError
from .model import UpdateResult


def not_durable(error, token=None):
    """The NotDurable answering a change the registry applied whose store
    write failed with the StoreError ``error``; ``token``: its writer's."""
    return NotDurable(f"the change is applied but not stored yet ({error.message}); "
                      "it is stored once the store recovers: do not send it again",
                      token=token)


def as_not_durable(failure, token=None):
    """Errback: a state write's StoreError as NotDurable (other failures pass)."""
    failure.trap(StoreError)
    if failure.check(NotDurable):
        return failure
    return Failure(not_durable(failure.value, token))


def gathered(writes, result):
    """One Deferred for several writes: ``result`` once all are durable, else the first failure."""
    return defer.gatherResults(writes, consumeErrors=True).addCallbacks(
        lambda _: result, lambda f: f.value.subFailure if f.check(defer.FirstError) else f)


@dataclass
class DeviceRow:
    """One stored device as loaded (``state`` already decoded and frozen, or None)."""

    number: int
    name: str
    secret: bytes
    version: int
    cursor: int
    state: tuple | None


@dataclass
class Loaded:
    """Everything a store holds, read once at start."""

    devices: list = field(default_factory=list)       # DeviceRow
    tombstones: list = field(default_factory=list)    # (cursor, name, number, version)
    tokens: list = field(default_factory=list)        # (token_id, digest, role, created_at)
    sessions: list = field(default_factory=list)      # (number, SessionRecord)
    sequence: int = 0                                 # highest cursor ever stored
    admin_seq: int = 0                                # last admin-log entry seen
    horizon: int = 0                                  # tombstones pruned up to here
    #: the last registry stopped cleanly (everything it announced is stored).
    clean: bool = True
    #: every change at or below this cursor was durable (None: all loaded ones).
    durable: int | None = None
    dead: list = field(default_factory=list)          # (low, high): restart.py


class Store:
    """What DeviceRegistry needs from a storage backend (documentation base class)."""

    def load(self):
        """Read everything: returns ``Loaded`` (synchronously, at start)."""
        raise NotImplementedError

    def begin(self, cursor, dead, moves=()):
        """A registry starts at ``cursor`` with the dead cursor ranges ``dead``:
        record both, the ``moves`` of loaded entries to new cursors (and
        devices to new versions: ``restart.move_out``), and that a registry
        runs (a stop without ``close`` is unclean), durably before returning.
        Called once, after ``load``, before any write. This default records
        nothing (every start is clean)."""

    def write(self, op, result=None):
        """Queue one write; the Deferred fires with ``result`` once it is durable."""
        raise NotImplementedError

    def barrier(self, result=None):
        """A Deferred firing with ``result`` once every earlier write is durable."""
        raise NotImplementedError

    def barrier_for(self, devs, result=None):
        """A ``barrier`` for a write that changed nothing of the Devices ``devs``:
        it also waits until their current states are durable (the result claims
        their versions). A store that may hold a state unsaved (a failed commit,
        sqlite_retry.py) writes it again first; this default is ``barrier``."""
        return self.barrier(result)

    def write_state(self, dev, token=None):
        """Queue a changed Device's state: Deferred[UpdateResult] once durable.

        The registry's hot path. This default queues a ``("state", ...)``
        write; a store may override it to keep less per write (the SQLite
        store reads the device's latest state when it plans the commit).
        A failure is NotDurable carrying ``token`` (module docstring): a
        write durable at once (the memory store's) gets no errback.
        """
        d = self.write(("state", dev.version, dev.cursor, dev.state(), dev.number),
                       UpdateResult(dev.name, dev.version, dev.cursor, token))
        if d.called and not isinstance(d.result, Failure):
            return d
        return d.addErrback(as_not_durable, token)

    def write_states(self, devs, result=None):
        """Queue the states of several changed Devices: ONE Deferred, firing
        with ``result`` once all are durable (``update_reported_many``)."""
        writes = [self.write(("state", dev.version, dev.cursor, dev.state(), dev.number))
                  for dev in devs]
        return gathered(writes, result)

    def write_sessions(self, numbers, records, result=None):
        """Queue the SessionRecords of several devices (parallel lists): ONE
        Deferred, firing with ``result`` once all are durable
        (``DeviceRegistry.save_sessions``)."""
        return gathered([self.write(("session", number, record))
                         for number, record in zip(numbers, records)], result)

    def admin_changes(self, after):
        """Deferred list of ``(seq, op, name, number)`` written by other processes after ``after``."""
        return defer.succeed([])

    def fetch_device(self, number):
        """Deferred DeviceRow (or None) read from storage, for admin reloads."""
        return defer.succeed(None)

    def fetch_tokens(self):
        """Deferred list of stored tokens, for admin reloads."""
        return defer.succeed([])

    def close(self):
        """Commit what is pending and release resources: a Deferred."""
        return defer.succeed(None)


class MemoryStore(Store):
    """Storage in dictionaries: for tests, and as the reference behaviour.

    Writes are durable at once, unless ``hold()`` was called: then they wait
    until ``release()``, which lets tests check that nothing is acknowledged
    before it is durable. A new registry over the same MemoryStore sees the
    previous one's data, like a restart: a clean one (every write was
    durable at once), unless writes were held then, or ``crash()`` dropped
    them (restart.py).
    """

    def __init__(self):
        self.devices = {}       # number -> DeviceRow
        self.tombstones = []
        self.tokens = {}
        self.sessions = {}
        self.sequence = 0
        self.horizon = 0
        self.writes = 0
        self.dead = []          # dead cursor ranges (restart.py)
        self._held = None
        self._crashed = False

    def load(self):
        return Loaded(
            devices=[DeviceRow(r.number, r.name, r.secret, r.version, r.cursor, r.state)
                     for r in self.devices.values()],
            tombstones=list(self.tombstones),
            tokens=[(tid,) + rest for tid, rest in self.tokens.items()],
            sessions=list(self.sessions.items()),
            sequence=self.sequence, horizon=self.horizon, dead=list(self.dead),
            clean=not (self._crashed or self._held))

    def begin(self, cursor, dead, moves=()):
        self.dead = list(dead)
        self._crashed = False
        for kind, number, old, new, version in moves:
            if kind == "device":
                row = self.devices.get(number)
                if row is not None and row.cursor == old:
                    row.cursor, row.version = new, version
            else:
                self.tombstones = [(new,) + t[1:] if t[0] == old and t[2] == number else t
                                   for t in self.tombstones]
        self.sequence = max(self.sequence, cursor)

    def crash(self):
        """Lose the held writes as ``kill -9`` would (their Deferreds never fire):
        the next registry over this store starts unclean."""
        self._held = None
        self._crashed = True

    def hold(self):
        """Keep further writes pending (not durable) until ``release()``."""
        if self._held is None:
            self._held = []

    def release(self):
        """Make every held write durable, in order, and fire their Deferreds."""
        held, self._held = self._held or [], None
        for op, d, result in held:
            if op is not None:
                self._apply(op)
            d.callback(result)

    def write(self, op, result=None):
        if self._held is not None:
            d = defer.Deferred()
            self._held.append((op, d, result))
            return d
        self._apply(op)
        return defer.succeed(result)

    def barrier(self, result=None):
        if self._held is not None:
            d = defer.Deferred()
            self._held.append((None, d, result))
            return d
        return defer.succeed(result)

    def _apply(self, op):
        self.writes += 1
        kind = op[0]
        if kind == "state":
            _, version, cursor, state, number = op
            row = self.devices.get(number)
            if row is not None:
                row.version, row.cursor, row.state = version, cursor, state
                self.sequence = max(self.sequence, cursor)
        elif kind == "add":
            _, number, name, secret, version, cursor, state = op
            self.devices[number] = DeviceRow(number, name, secret, version, cursor, state)
            self.sequence = max(self.sequence, cursor)
        elif kind == "remove":
            _, number, name, version, cursor = op
            self.devices.pop(number, None)
            self.sessions.pop(number, None)
            self.tombstones.append((cursor, name, number, version))
            self.sequence = max(self.sequence, cursor)
        elif kind == "secret":
            _, number, secret = op
            if number in self.devices:
                self.devices[number].secret = secret
        elif kind == "session":
            _, number, record = op
            self.sessions[number] = record
        elif kind == "token_add":
            _, token_id, digest, role, created_at = op
            self.tokens[token_id] = (digest, role, created_at)
        elif kind == "token_del":
            self.tokens.pop(op[1], None)
        elif kind == "prune":
            self.horizon = max(self.horizon, op[1])
            self.tombstones = [t for t in self.tombstones if t[0] > self.horizon]
        else:
            raise ValueError(f"unknown store operation {kind!r}")
