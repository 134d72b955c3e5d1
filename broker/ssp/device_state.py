"""The device state: values plus an event queue, synchronized by SSP.

wire.md section 5. Values follow "latest state wins" (a diff carries each
changed key once, however often it changed); events are delivered exactly
once and in order, so every event has an absolute index that survives
``subtract``. A diff is one CBOR item, laid out in docs/protocol.md:

    {0: {key: value or null, ...},   changed values; null deletes (optional)
     1: first_event_index,           absolute index of the first event
     2: [event, ...]}                events appended since the old state

Both ``1`` and ``2`` are present or both absent; ``b""`` is the diff of equal
states. Senders emit the deterministic (canonical) encoding, receivers accept
any well-formed encoding of the same layout.

Values and events are text, byte strings, integers (-2**64 .. 2**64-1),
floats (not NaN: a state must equal itself), booleans, and arrays or maps of
these (maps with text keys, null allowed inside), nested at most
``MAX_DEPTH`` deep. They are frozen on entry (arrays become tuples, maps
read-only mappings) so states can share them.
"""

from collections.abc import Mapping
from math import copysign
from types import MappingProxyType

import cbor2

from broker.ssp.cbor import OneItemDecoder
from broker.ssp.state import EMPTY_DIFF, EventQueue, bad_diff

#: How deep arrays and maps may nest inside one value or event.
MAX_DEPTH = 16

#: Keys of the diff map (small integers: one byte each on the wire).
VALUES_KEY = 0
FIRST_EVENT_KEY = 1
EVENTS_KEY = 2
_DIFF_KEYS = frozenset((VALUES_KEY, FIRST_EVENT_KEY, EVENTS_KEY))

_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1
_NO_VALUES: dict = {}
_EMPTY_MAP = MappingProxyType({})
_MISSING = object()


def freeze(value, depth=0):
    """``value`` checked and made immutable (TypeError/ValueError if not
    allowed)."""
    kind = type(value)
    if kind is str or kind is bytes or kind is bool:
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"integer out of CBOR range: {value}")
        return value
    if kind is float:
        if value != value:
            raise ValueError("NaN is not allowed (a state must equal itself)")
        return value
    if value is None:
        if depth == 0:
            raise TypeError("null is only allowed inside arrays and maps")
        return None
    if depth >= MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    if kind is tuple or kind is list:
        return tuple([freeze(item, depth + 1) for item in value])
    if isinstance(value, Mapping):
        if not value:
            return _EMPTY_MAP  # shared: a diff of many {} costs nothing
        frozen = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"map keys must be text, not {type(key).__name__}")
            frozen[key] = freeze(item, depth + 1)
        return MappingProxyType(frozen)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return freeze(int(value), depth)
    if isinstance(value, float):
        return freeze(float(value), depth)
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"not a device-state value: {kind.__name__}")


def thaw(value):
    """A frozen value as plain lists and dicts (for JSON and callers that
    want mutable copies)."""
    kind = type(value)
    if kind is tuple:
        return [thaw(item) for item in value]
    if kind is MappingProxyType or kind is dict:
        return {key: thaw(item) for key, item in value.items()}
    return value


def encode(item) -> bytes:
    """The deterministic (canonical) CBOR encoding of a frozen value."""
    return cbor2.dumps(item, canonical=True)


def same(a, b) -> bool:
    """Whether two frozen values are the same on the wire (1 is not True,
    0.0 is not -0.0), without encoding them."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is float:
        return a == b and (a != 0.0 or copysign(1.0, a) == copysign(1.0, b))
    if kind is tuple:
        return len(a) == len(b) and all(map(same, a, b))
    if kind is MappingProxyType:
        return len(a) == len(b) and all(
            same(value, b.get(key, _MISSING)) for key, value in a.items())
    return a == b


# One diff, exactly (the diff map and the values map add two levels).
_decode_one = OneItemDecoder(max_depth=MAX_DEPTH + 3).decode


class DeviceState(EventQueue):
    """Immutable device state: ``values`` and events from ``event_base`` on."""

    __slots__ = ("_values", "_events", "_event_base")
    __hash__ = None  # equal states may hold unhashable maps

    #: An empty map: a diff that changes nothing yet is not empty, so the
    #: peer acknowledges it at once (state.py, docs/protocol.md 5.1).
    ACK_REQUEST_DIFF = b"\xa0"

    def __init__(self, values=None, events=(), event_base=0):
        """Build from plain Python data (frozen and checked here)."""
        if type(event_base) is not int or not 0 <= event_base <= _INT_MAX:
            raise ValueError(f"bad event_base: {event_base!r}")
        frozen = {}
        for key, value in (values or {}).items():
            if type(key) is not str:
                raise TypeError(f"keys must be text, not {type(key).__name__}")
            frozen[key] = freeze(value)
        self._values = frozen or _NO_VALUES
        self._events = tuple([freeze(event) for event in events])
        self._event_base = event_base

    @classmethod
    def _make(cls, values, events, event_base):
        """Build from already frozen parts, sharing them."""
        state = object.__new__(cls)
        state._values = values
        state._events = events
        state._event_base = event_base
        return state

    @classmethod
    def empty(cls):
        """State 0: no values, no events (a shared singleton)."""
        return _EMPTY

    @property
    def values(self) -> Mapping:
        """The values, read-only."""
        return MappingProxyType(self._values)

    @property
    def value_count(self) -> int:
        """How many values the state holds (without building a view)."""
        return len(self._values)

    def events_since(self, index: int) -> tuple:
        """The held events whose absolute index is ``index`` or more."""
        return self._events[max(0, index - self._event_base):]

    def _is_blank(self) -> bool:
        return not self._values and self._event_base == 0 and not self._events

    def with_values(self, patch: Mapping) -> "DeviceState":
        """This state with ``patch`` merged in (None deletes a key)."""
        values = None
        for key, value in patch.items():
            if type(key) is not str:
                raise TypeError(f"keys must be text, not {type(key).__name__}")
            current = (self._values if values is None else values).get(
                key, _MISSING)
            if value is None:
                if current is _MISSING:
                    continue
                if values is None:
                    values = dict(self._values)
                del values[key]
                continue
            if type(value) is int and _INT_MIN <= value <= _INT_MAX:
                # (A reading: freeze() keeps it, same() compares ints.)
                if type(current) is int and current == value:
                    continue
            else:
                value = freeze(value)
                if current is not _MISSING and same(current, value):
                    continue
            if values is None:
                values = dict(self._values)
            values[key] = value
        if values is None:
            return self
        return DeviceState._make(values or _NO_VALUES, self._events,
                                 self._event_base)

    def with_numbers(self, patch: Mapping):
        """``with_values(patch)`` when every value of ``patch`` is a number
        (an integer in range, a finite float) for a key that holds one: a
        sensor's usual reading, which changes neither the keys nor the kinds
        of values the state holds. None for any other patch (ask
        ``with_values``); the compiled twin may say None for more (a
        subclass, a patch that is not a dict)."""
        compiled = _compiled_with_numbers
        if compiled is not None:
            return compiled(self, patch)
        return self._numbers_merged(patch)

    def _numbers_merged(self, patch: Mapping):
        """with_numbers in Python: the reference."""
        mine = self._values
        values = None
        for key, value in patch.items():
            if type(key) is not str:
                return None
            kind = type(value)
            if kind is int:
                if not _INT_MIN <= value <= _INT_MAX:
                    return None
            elif kind is not float or value - value != 0.0:   # (NaN, infinity)
                return None
            current = mine.get(key)
            held = type(current)
            if held is not int and held is not float:
                return None
            if held is kind and current == value and (
                    kind is int or copysign(1.0, current) == copysign(1.0, value)):
                continue   # the same on the wire (same(), for two numbers)
            if values is None:
                values = dict(mine)
            values[key] = value
        if values is None:
            return self
        return DeviceState._make(values, self._events, self._event_base)

    def with_events(self, *events) -> "DeviceState":
        """This state with ``events`` appended to the queue."""
        if not events:
            return self
        added = tuple([freeze(event) for event in events])
        if self.event_end + len(added) > _INT_MAX:
            raise ValueError("event index would exceed 2**64 - 1")
        return DeviceState._make(self._values, self._events + added,
                                 self._event_base)

    def subtract(self, prefix: "DeviceState") -> "DeviceState":
        """This state without the events ``prefix`` (acknowledged) holds."""
        base = self._event_base
        cut = prefix._event_base + len(prefix._events)
        if cut <= base:
            return self
        events = self._events
        if cut >= base + len(events):
            if not events:
                return self
            cut = base + len(events)
        return DeviceState._make(self._values, events[cut - base:], cut)

    def diff_from(self, existing: "DeviceState") -> bytes:
        """The diff that turns ``existing`` (an ancestor) into this state."""
        if existing is self:
            return EMPTY_DIFF
        # (event_end from the slots: no property calls, this runs per send.)
        base, events = self._event_base, self._events
        start = existing._event_base + len(existing._events)
        if start > base + len(events):
            raise ValueError(f"not an ancestor: it ends at event {start}, "
                             f"this state at {self.event_end}")
        skipped = start < base
        if skipped:
            if not existing._is_blank():
                raise ValueError(f"events {start}..{base - 1} "
                                 "were dropped; only state 0 may skip them")
            start = base
        changed = self._changed_since(existing._values)
        if start != base:
            events = events[start - base:]
        # The diff map's head and its one-byte keys 0, 1, 2 are written
        # here, in canonical order: cbor2's canonical form costs about a
        # microsecond per map (it sorts), as much again as the values map.
        if events or skipped:
            # From state 0 past acknowledged events, the first index goes
            # even with no event: the receiver's copy must end where ours
            # does, or the next event's index would look like a gap.
            tail = b"".join((b"\x01", encode(start), b"\x02", encode(events)))
            if changed:
                return b"".join((b"\xa3\x00", encode(changed), tail))
            return b"\xa2" + tail
        if changed:
            if len(changed) == 1:
                # One value that is no float nor array or map (the usual
                # report): its canonical encoding is the plain one (the
                # canonical form only sorts map keys and shortens floats),
                # which cbor2 makes at a quarter of the cost.
                for value in changed.values():
                    kind = type(value)
                    if (kind is int or kind is str or value is None
                            or kind is bool or kind is bytes):
                        return b"\xa1\x00" + cbor2.dumps(changed)
            return b"\xa1\x00" + encode(changed)
        return EMPTY_DIFF

    def _changed_since(self, old: dict) -> dict:
        """Merge patch from ``old`` values to ours."""
        mine = self._values
        if old is mine:
            return {}
        changed = {}
        fresh = 0   # our keys that ``old`` lacks
        for key, value in mine.items():
            previous = old.get(key, _MISSING)
            # (Unchanged values are mostly the very same object: states
            # share them.)
            if previous is not value:
                if type(value) is int and type(previous) is int:
                    if previous != value:   # (a reading: same() compares ints)
                        changed[key] = value
                elif previous is _MISSING:
                    changed[key] = value
                    fresh += 1
                elif not same(previous, value):
                    changed[key] = value
        # Every other key of ``old`` is one of ours: only more means deletions.
        if len(old) > len(mine) - fresh:
            for key in old:
                if key not in mine:
                    changed[key] = None
        return changed

    def apply(self, diff: bytes) -> "DeviceState":
        """The state ``diff`` leads to, else DatagramDropped(BAD_DIFF)."""
        if not diff:
            return self
        body = _decode_one(diff if type(diff) is bytes else bytes(diff))
        if type(body) is not dict:
            raise bad_diff(f"diff is a {type(body).__name__}, not a map")
        patch = body.get(VALUES_KEY, _MISSING)
        if patch is not _MISSING and len(body) == 1:
            # The usual diff, changed values only: no other key to check,
            # but get() also finds 0 under 0.0 and false (equal in Python).
            [key] = body
            if type(key) is not int:
                raise bad_diff(f"diff key {key!r} is not an integer")
            values = self._apply_patch(patch)
            if values is self._values:
                return self
            return _make(values, self._events, self._event_base)
        for key in body:
            if type(key) is not int or key not in _DIFF_KEYS:
                raise bad_diff(f"unknown diff key {key!r}")
        values = (self._values if patch is _MISSING
                  else self._apply_patch(patch))
        if FIRST_EVENT_KEY in body or EVENTS_KEY in body:
            base, events = self._apply_events(body)
        else:
            base, events = self._event_base, self._events
        if (values is self._values and events is self._events
                and base == self._event_base):
            return self
        return _make(values, events, base)

    def _apply_patch(self, patch) -> dict:
        if type(patch) is not dict:
            raise bad_diff("values (key 0) is not a map")
        values = self._values.copy()
        for key, value in patch.items():
            if type(key) is not str:
                raise bad_diff(
                    f"value key is a {type(key).__name__}, not text")
            kind = type(value)
            if (kind is str or kind is bytes or kind is bool
                    or (kind is int and _INT_MIN <= value <= _INT_MAX)
                    or (kind is float and value == value)):
                values[key] = value  # a scalar: freeze() keeps it as is
            elif value is None:
                values.pop(key, None)
            else:
                try:
                    values[key] = freeze(value)
                except (TypeError, ValueError) as error:
                    raise bad_diff(f"value of {key!r}: {error}") from None
        return values or _NO_VALUES

    def _apply_events(self, body) -> tuple:
        if not (FIRST_EVENT_KEY in body and EVENTS_KEY in body):
            raise bad_diff("keys 1 (first event) and 2 (events) go together")
        first, raw = body[FIRST_EVENT_KEY], body[EVENTS_KEY]
        if type(first) is not int or not 0 <= first <= _INT_MAX:
            raise bad_diff(f"first event index is not a uint64: {first!r}")
        if type(raw) is not list:
            raise bad_diff("events (key 2) is not an array")
        if first + len(raw) > _INT_MAX:
            raise bad_diff("event index would exceed 2**64 - 1")
        try:
            added = tuple([freeze(event) for event in raw])
        except (TypeError, ValueError) as error:
            raise bad_diff(f"event: {error}") from None
        end = self._event_base + len(self._events)
        if first == end:
            return self._event_base, self._events + added
        if first > end and self._is_blank():
            # State 0: events below `first` were acknowledged earlier
            # (wire.md section 4, a sender resending everything it holds).
            return first, added
        kind = "gap" if first > end else "overlap"
        raise bad_diff(f"event {kind}: diff starts at {first}, "
                       f"state ends at {end}")

    def __eq__(self, other):
        if self is other:
            return True
        if type(other) is not DeviceState and not isinstance(other, DeviceState):
            return NotImplemented
        mine, theirs = self._values, other._values
        # The values first: a new report's state differs there (the sender
        # compares it with up to three states).
        if (mine != theirs or self._event_base != other._event_base
                or len(self._events) != len(other._events)
                or self._events != other._events):
            # Python's == first (fast): wire-equal values are also ==.
            return False
        if mine is not theirs and not all(
                same(value, theirs.get(key, _MISSING))
                for key, value in mine.items()):
            return False
        return (self._events is other._events
                or all(map(same, self._events, other._events)))

    def __repr__(self):
        return (f"DeviceState(values={thaw(self._values)!r}, "
                f"events={thaw(self._events)!r}, "
                f"event_base={self._event_base})")


_make = DeviceState._make
_EMPTY = _make(_NO_VALUES, (), 0)

#: DeviceState.with_numbers's compiled twin (broker.ssp.speedups installs it).
_compiled_with_numbers = None


def install_compiled_with_numbers(compiled) -> None:
    """Use ``compiled(state, patch)`` for DeviceState.with_numbers; None goes
    back to the Python code."""
    global _compiled_with_numbers
    _compiled_with_numbers = compiled
