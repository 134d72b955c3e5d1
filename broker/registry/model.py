"""The per-device record, its immutable view, and the small result types.

A million devices live in memory, so the record is compact: ``__slots__``,
each map kept as parallel tuples (keys, values, update times) whose key
tuple is shared between devices with the same keys, and no per-device JSON.
Views (``DeviceView``) are built on demand for readers and observers.
"""

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from .history import EMPTY_HISTORY
from .values import INT_MAX, INT_MIN, FrozenMap, json_equal, merge_value, to_json_value

EMPTY = ()
_FLOAT = frozenset((float,))
_NUMBER = frozenset((float, int))     # (not bool: map(type) gives bool for True)


_EMPTY_MAP = MappingProxyType({})
_NO_TIMES = MappingProxyType({"reported": _EMPTY_MAP, "desired": _EMPTY_MAP})


class KeyShapes:
    """Shares key tuples between devices and maps each to its key positions.

    Bounded, and never holding a shape for good: when full it starts over
    (the shapes devices still use come back as they are met; the others,
    such as a removed device's or those of a device whose key names keep
    changing, go). A device keeps the tuple it holds either way.
    """

    __slots__ = ("_shapes", "limit")

    def __init__(self, limit=10_000):
        self._shapes = {EMPTY: (EMPTY, MappingProxyType({}))}
        self.limit = limit

    def positions(self, keys):
        """``{key: index}`` for a key tuple (shared when the shape is known)."""
        shape = self._shapes.get(keys)
        if shape is None:
            return {k: i for i, k in enumerate(keys)}
        return shape[1]

    def intern(self, keys):
        """The shared instance of a key tuple (registered; see the class docstring)."""
        shapes = self._shapes
        shape = shapes.get(keys)
        if shape is not None:
            return shape[0]
        if len(shapes) >= self.limit:
            self._shapes = shapes = {EMPTY: shapes[EMPTY]}
        shapes[keys] = (keys, {k: i for i, k in enumerate(keys)})
        return keys

    def __len__(self):
        return len(self._shapes)


def replace_numbers(shapes, keys, values, times, patch, now):
    """The common update, checked and applied in one pass: or None.

    ``patch`` is an unvalidated dict. If every key of it already exists
    with a number and every value is a finite float or a 64-bit int, this
    returns the new ``(values, times)`` (the key tuple, hence the encoded
    size, stays as it is). Otherwise it returns None and the caller takes
    the full path (Validator.patch, then merge_map), which also produces
    the precise error. Existing keys were validated when they were added.
    """
    n = len(patch)
    if n == 1 and len(keys) == 1:
        # One reading (the usual device): the checks below, on its one item.
        (key, value), = patch.items()
        if key != keys[0]:
            return None
        tv = type(value)
        if tv is float:
            if value - value != 0.0:
                return None
        elif tv is not int or not INT_MIN <= value <= INT_MAX:
            return None
        tv = type(values[0])
        if tv is not float and tv is not int:
            return None
        return (value,), (now,)
    if n == len(keys) and tuple(patch) == keys:
        # Every reading at once, in the stored order, all floats: C loops only.
        vals = tuple(patch.values())
        if _FLOAT.issuperset(map(type, vals)):
            if _FLOAT.issuperset(map(type, values)):
                total = sum(vals)
                if total - total == 0.0:    # no NaN or infinity among them (an overflow
                    return vals, (now,) * n  # to infinity just takes the loop below)
        elif _NUMBER.issuperset(map(type, vals)) and _NUMBER.issuperset(map(type, values)):
            # Ints among them (a counter): each checked, no lists built.
            for v in vals:
                if type(v) is float:
                    if v - v != 0.0:
                        return None
                elif not INT_MIN <= v <= INT_MAX:
                    return None
            return vals, (now,) * n
    elif n > len(keys):
        return None
    pos = shapes.positions(keys)
    vals = list(values)
    tims = list(times)
    for k, v in patch.items():
        i = pos.get(k)
        if i is None:
            return None
        tv = type(v)
        if tv is float:
            if v - v != 0.0:            # NaN or infinity: cheaper than math.isfinite
                return None
        elif tv is not int or not INT_MIN <= v <= INT_MAX:
            return None
        tv = type(vals[i])
        if tv is not float and tv is not int:
            return None
        vals[i] = v
        tims[i] = now
    return tuple(vals), tuple(tims)


def merge_map(shapes, keys, values, times, patch, now, max_items=None):
    """Merge a validated patch into one map held as parallel tuples.

    Returns ``(keys, values, times, may_grow)``. Fast path: every patched
    key already exists and a number replaces a number, so only values and
    times change and the encoded size cannot grow (``may_grow`` False).
    ``max_items`` bounds the nested maps merged (values.merge_value).
    """
    fast = replace_numbers(shapes, keys, values, times, patch, now)
    if fast is not None:
        return keys, fast[0], fast[1], False
    merged = dict(zip(keys, values))
    stamps = dict(zip(keys, times))
    for k, v in patch.items():
        if v is None:
            if merged.pop(k, None) is not None:
                del stamps[k]
        else:
            merged[k] = merge_value(merged.get(k), v, max_items) if isinstance(v, dict) else v
            stamps[k] = now
    new_keys = tuple(merged)
    if new_keys != keys:
        new_keys = shapes.intern(new_keys)
    return new_keys, tuple(merged.values()), tuple(stamps[k] for k in new_keys), True


class Device:
    """The registry's mutable record of one device (never handed out)."""

    __slots__ = ("name", "number", "secret", "version", "cursor",
                 "rkeys", "rvals", "rtimes", "dkeys", "dvals", "dtimes",
                 "online", "last_heard", "address", "rtt", "session_id",
                 "history", "session")

    def __init__(self, name, number, secret, version=0, cursor=0):
        self.name = name
        self.number = number
        self.secret = secret
        self.version = version
        self.cursor = cursor
        self.rkeys = self.rvals = self.rtimes = EMPTY
        self.dkeys = self.dvals = self.dtimes = EMPTY
        self.online = False
        self.last_heard = self.address = self.rtt = self.session_id = None
        self.history = EMPTY_HISTORY
        self.session = None

    def state(self):
        """Everything storage keeps beside name/number/secret/version/cursor."""
        return (self.rkeys, self.rvals, self.rtimes, self.dkeys, self.dvals,
                self.dtimes, self.online, self.last_heard,
                list(self.address) if self.address is not None else None,
                self.rtt, self.session_id, self.history)

    def restore_state(self, state):
        """Inverse of ``state()`` for data decoded from storage (already thawed)."""
        (self.rkeys, self.rvals, self.rtimes, self.dkeys, self.dvals,
         self.dtimes, self.online, self.last_heard, address, self.rtt,
         self.session_id, self.history) = state
        self.address = tuple(address) if address is not None else None


@dataclass(frozen=True, slots=True)
class DeviceView:
    """Immutable snapshot of one device: what readers, observers and the feed get.

    ``updated_at`` maps ``"reported"`` and ``"desired"`` to ``{key: time}``
    (epoch seconds from the registry's clock). ``events`` holds the events of
    the change that produced this view (observers only; empty elsewhere).
    ``removed`` is true for a feed entry saying the device was removed.
    """

    name: str
    device_number: int
    version: int
    cursor: int
    reported: MappingProxyType
    desired: MappingProxyType
    delta: MappingProxyType
    updated_at: MappingProxyType
    online: bool = False
    last_heard: float | None = None
    address: tuple | None = None
    rtt: float | None = None
    session_id: int | None = None
    history: tuple = ()
    events: tuple = ()
    removed: bool = False

    @classmethod
    def of(cls, dev, events=EMPTY):
        """Snapshot a Device record."""
        reported = dict(zip(dev.rkeys, dev.rvals))
        desired = dict(zip(dev.dkeys, dev.dvals))
        delta = {k: v for k, v in desired.items()
                 if k not in reported or not json_equal(reported[k], v)}
        return cls(dev.name, dev.number, dev.version, dev.cursor,
                   MappingProxyType(reported), MappingProxyType(desired),
                   MappingProxyType(delta),
                   MappingProxyType({"reported": MappingProxyType(dict(zip(dev.rkeys, dev.rtimes))),
                                     "desired": MappingProxyType(dict(zip(dev.dkeys, dev.dtimes)))}),
                   dev.online, dev.last_heard, dev.address, dev.rtt, dev.session_id,
                   dev.history, tuple(events))

    @classmethod
    def tombstone(cls, name, number, version, cursor):
        """The feed entry of a removed device (its empty parts shared by all:
        a registry keeps up to ``feed_retention`` of these)."""
        return cls(name, number, version, cursor, _EMPTY_MAP, _EMPTY_MAP, _EMPTY_MAP,
                   _NO_TIMES, removed=True)

    def to_json(self):
        """JSON-ready dict: the one shape every endpoint sends.

        Device numbers and session ids are decimal strings (they are u64,
        beyond what JavaScript numbers hold exactly); bytes values become
        ``{"$bytes": base64}``.
        """
        body = {
            "name": self.name,
            "device_number": str(self.device_number),
            "version": self.version,
            "cursor": self.cursor,
            "reported": to_json_value(FrozenMap(self.reported)),
            "desired": to_json_value(FrozenMap(self.desired)),
            "delta": to_json_value(FrozenMap(self.delta)),
            "updated_at": {"reported": dict(self.updated_at["reported"]),
                           "desired": dict(self.updated_at["desired"])},
            "connection": {
                "online": self.online,
                "last_heard": self.last_heard,
                "address": _address_text(self.address),
                "rtt": self.rtt,
                "session_id": None if self.session_id is None else str(self.session_id),
            },
            "history": [history_json(entry) for entry in self.history],
        }
        if self.events:
            body["events"] = [to_json_value(e) for e in self.events]
        if self.removed:
            body["removed"] = True
        return body


def _address_text(address):
    if address is None:
        return None
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


#: History entry: (version, cursor, at, kind, data); kind is one of
#: "reported", "desired" (data: the patch), "events" (data: the events),
#: "connection" (data: {"online": bool}).
def history_json(entry):
    version, cursor, at, kind, data = entry
    return {"version": version, "cursor": cursor, "at": at, "kind": kind,
            "data": to_json_value(data)}


class UpdateResult(NamedTuple):
    """What a durable write reports: the device's new version and cursor, and the echoed token.

    A NamedTuple: one is made per write, so it must be cheap.
    """

    name: str
    version: int
    cursor: int
    token: object = None


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Answer of ``changes_since``: latest views in change order and where to resume.

    ``reset`` means the cursor could not be served (too old, or from the
    future after a restart): the client drops what it holds; ``devices`` is
    then a (first page of a) full snapshot.
    """

    devices: list
    cursor: int
    more: bool
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Provisioned:
    """A newly provisioned device (or a rotated key): the secret is shown once."""

    name: str
    device_number: int
    secret: bytes = field(repr=False)  # shown once, never in a log line

    @property
    def key(self):
        """The secret in mosh's 22-character base64 form."""
        from .secrets import format_key
        return format_key(self.secret)


class SessionRecord(NamedTuple):
    """What the UDP endpoint persists per device to resume a session after a restart.

    ``remote_seq`` is the device's next expected datagram sequence number
    when the record was written: an older datagram of the session (a replay)
    can then neither resume it nor move it to the sender's address.
    ``local_num`` is the UDP endpoint's flag for that mark: 1 when it was
    written as the session left memory (evicted, or a clean stop), so every
    later datagram is the device's own; 0 when the mark may lag (a crash),
    and a session resumed from it starts on probation (broker/udp/probation.py).
    A named tuple, not a frozen dataclass: one is built for every report,
    and a frozen dataclass's ``__init__`` costs about four times as much.
    """

    session_id: int
    acked_remote_num: int = 0
    acked_remote_state: bytes = b""
    local_num: int = 0
    local_state: bytes = b""
    seq_reservation: int = 0
    remote_seq: int = 0

    @classmethod
    def retired(cls, session_id: int) -> "SessionRecord":
        """The record of a session that must never resume: a restored backup's.

        Its device may have gone on past the backup (states acknowledged
        since, which the backup lacks), so resuming would mix the two
        states; the id stays, so older sessions stay refused, and only a
        newer session (the device starts one after ``rekey_after``) is taken.
        """
        return cls(session_id, RETIRED_NUM)

    @property
    def resumable(self) -> bool:
        """False for a retired record (SessionRecord.retired)."""
        return self.acked_remote_num != RETIRED_NUM


#: acked_remote_num of a retired session record: no device state has it.
RETIRED_NUM = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A dashboard access token as listed (never its text)."""

    token_id: str
    role: str
    created_at: float
