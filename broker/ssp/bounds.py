"""What one received device state may hold: the broker's memory bound.

A receiver keeps every state above the peer's throwaway number, each with
its own copy of the values map (when a diff changed it) and of the events
not yet acknowledged, so an authentic peer that never acknowledges could
make a session hold memory quadratic in its states: 40 datagrams of ~100
compressed bytes each (20,000 one-byte events apiece) made a session hold
16 million event references. A received state is therefore bounded, and a
diff that would pass a bound is dropped with a counted reason, changing
nothing (the peer's next diff from its acknowledged state repairs it):

* the diff, inflated: ``max_diff_bytes`` (TOO_LARGE, checked before it is
  decoded);
* the events a state holds beyond the oldest state kept (those the peer has
  not seen acknowledged): ``max_events`` and ``max_event_bytes`` encoded
  (EVENTS_OVER_LIMIT);
* the keys of its values map: ``max_values`` (VALUES_OVER_LIMIT).

A session keeps at most ``BROKER_RECEIVED_STATES`` + 1 = 17 states, so
at most 17 x (``max_events`` references, 256 KiB, + a values map of
``max_values`` entries, about 200 KiB) plus the objects decoded from their
diffs, each at most ``max_diff_bytes`` (64 KiB) of CBOR. Measured
(tracemalloc): about 4 MiB with 32,768 one-byte events in every state, 10
MiB with 8,192 keys in every state, 75 MiB for the most wasteful content
CBOR allows (every diff 21,000 one-key maps: CPython spends about 220
bytes on each 3-byte map). docs/ssp-endpoint.md ("Limits") states it.
A legitimate node stays far below: it keeps at most 16 KiB of events
unacknowledged and 16 KiB of values (broker/node/backlog.py), so at most
16,384 events of one byte each.

Only the broker's sessions are bounded (``Profile.state_bounds``): a node
takes whatever commands its broker sends (up to ``max_pending_commands``).
"""

import dataclasses

from broker.ssp.device_state import encode
from broker.ssp.errors import DatagramDropped, DropReason

__all__ = ["StateBounds", "BROKER_RECEIVED_STATES", "MAX_HELD_EVENTS",
           "MAX_HELD_EVENT_BYTES", "MAX_VALUES", "MAX_DIFF_BYTES"]

#: Received states a broker session keeps above the throwaway one (mosh
#: keeps 1,024). The broker acknowledges a state once it is durable, so the
#: peer builds on the newest few or on the throwaway state. Past the cap
#: mosh takes one more state, refuses others for its quench time (15 s) and
#: takes one more again: its states grow by one per 15 s for as long as the
#: peer's throwaway number stands still. A bounded receiver instead makes
#: room for a new newest state by forgetting the oldest one above the
#: throwaway state (and refuses older ones), so it holds at most 17 states,
#: and still takes the newest (the peer's sender keeps only its newest 32,
#: so an ack of an old state would not reach it).
BROKER_RECEIVED_STATES = 16
#: Unacknowledged events one received state may hold: twice the most a
#: node sends (16 KiB in flight of one-byte events).
MAX_HELD_EVENTS = 32_768
#: Their encoded bytes: four times a node's 16 KiB in flight.
MAX_HELD_EVENT_BYTES = 64 * 1024
#: Keys of one received state's values: a node's 16 KiB of values has at
#: most about 5,500; the registry stores 256 (``max_keys``).
MAX_VALUES = 8192
#: How much longer an array's head can get when items are added (1 to 9 bytes).
_ARRAY_HEAD_GROWTH = 8
#: Inflated bytes of one diff, by default (the endpoint passes its fragment
#: assembly cap: a node's diff is at most 32 KiB plus deleted key names).
MAX_DIFF_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class StateBounds:
    """The bounds of one received device state (see the module docstring);
    a frozen value shared by every session of a profile."""

    max_diff_bytes: int = MAX_DIFF_BYTES
    max_events: int = MAX_HELD_EVENTS
    max_event_bytes: int = MAX_HELD_EVENT_BYTES
    max_values: int = MAX_VALUES

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(
                    f"{field.name} must be a positive integer, got {value!r}")

    def check_diff(self, diff) -> None:
        """Refuse a diff too large to decode (before decoding it)."""
        if len(diff) > self.max_diff_bytes:
            raise DatagramDropped(
                DropReason.TOO_LARGE,
                f"diff of {len(diff)} bytes, at most {self.max_diff_bytes}")

    def check(self, state, reference, base, diff_size: int, known=None):
        """Refuse ``state`` (``reference`` plus a diff of ``diff_size``
        bytes) if it would hold more than the bounds, counting its events
        from where ``base`` (the oldest state kept beside it, None if
        none) ends.

        Returns what to pass as ``known`` when a state is next built on
        this one: ``(state, start, an upper bound of the bytes of its
        events from start)``, or None. A peer streaming states on states
        while earlier ones wait for their acknowledgement then costs a
        bound's addition per state, not an encoding of every held event:
        the events from a later start are a part of those from an earlier
        one, and a diff's bytes are at least those of the events it adds
        (canonical CBOR is the shortest), plus at most 8 bytes of a longer
        array head. Only when that bound passes the limit are the events
        encoded, which makes the bound exact again."""
        if state.value_count > self.max_values:
            raise DatagramDropped(
                DropReason.VALUES_OVER_LIMIT,
                f"{state.value_count} values, at most {self.max_values}")
        end = state.event_end
        reference_end = reference.event_end
        if end == reference_end:
            # No event added: the reference's were counted already.
            if known is not None and known[0] is reference:
                return (state, known[1], known[2])
            return None
        start = state.event_base
        if base is not None and base.event_end > start:
            start = base.event_end
        if end - start > self.max_events:
            raise DatagramDropped(
                DropReason.EVENTS_OVER_LIMIT,
                f"{end - start} events unacknowledged, at most "
                f"{self.max_events}")
        limit = self.max_event_bytes
        if reference_end <= start:
            if diff_size <= limit:
                return (state, start, diff_size)  # every held event came in this diff
        elif known is not None and known[0] is reference and known[1] <= start:
            bound = known[2] + diff_size + _ARRAY_HEAD_GROWTH
            if bound <= limit:
                return (state, known[1], bound)
        size = len(encode(state.events_since(start)))
        if size > limit:
            raise DatagramDropped(
                DropReason.EVENTS_OVER_LIMIT,
                f"{size} bytes of events unacknowledged, at most {limit}")
        return (state, start, size)
