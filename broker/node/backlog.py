"""Events a node holds beyond its SSP state, moved into it as the broker acknowledges.

Why a backlog: SSP sends a state as one diff from the state the broker
acknowledged, and the broker refuses a diff it cannot take (a larger one is
dropped at every resend, and every later report waits behind it: the node
is blocked for good).  What the broker takes, at its defaults:

* a fragment assembly of at most 64 KiB of compressed instruction
  (``MAX_ASSEMBLY_BYTES`` in broker/udp/endpoint.py; more only when the
  registry's ``max_state_bytes`` is above 32 KiB), a larger one is dropped
  as ``too_large``;
* 50 datagrams a second from one device (``[ssp]
  max_device_datagrams_per_second`` in etc/broker.toml, counted in
  one-second windows by broker/udp/limits.py), each carrying at most 1161
  bytes of it (broker framing over IPv6, broker/ssp/instruction.py).

So a diff is kept within ``DIFF_BUDGET`` (32 KiB): ``MAX_VALUES_BYTES`` of
values (the whole map, which a new session's first diff carries) plus at
most ``EVENTS_IN_FLIGHT_BYTES`` of events, or one event of at most
``MAX_EVENT_BYTES`` when none is in flight (so the queue always moves).
zlib adds a few bytes at worst, so a state leaves in at most 29 fragments:
half the assembly cap, and within one window of the rate limit with room
left for heartbeats and acks.  (Deleting many keys in one state adds their
names on top; even then the diff stays under the cap.)

Why so few events in flight: a state is one instruction, and losing any
one of its fragments loses all of it; its resend is a new instruction
(fragments do not add up across tries).  A state of n fragments gets
through a link that loses a share p of datagrams with chance (1 - p)^n:
at 20% loss, 0.8 for one fragment, 0.04 for fifteen.  So events go out in
states of a few datagrams (``EVENTS_IN_FLIGHT_BYTES``, 4 KiB: four
fragments at most, fewer as events compress), the next ones joining as the
broker acknowledges.  The price is on a clean link: one window per
acknowledgement (the broker's ACK_DELAY, 100 ms), about 40 KB of events a
second (docs/ssp-endpoint.md, "The node side").

The backlog continues the state's event queue: its first event's index is
the state's ``event_end``, and events only join at its end and leave from
its front into the state's end.  Each event's absolute index is therefore
fixed when it is emitted, carried across a rekey with the state
(docs/protocol.md section 5), and every event is delivered once, in order.

Memory: at most ``max_events`` events (default ``MAX_BACKLOG``) and
``MAX_BACKLOG_BYTES`` encoded are held; beyond that ``BacklogFull`` (a
ValueError) refuses the new events, and the caller hears it: nothing is
dropped silently.
"""

from __future__ import annotations

from collections import deque

#: Encoded bytes of one diff a node sends, at most (see the module docstring).
DIFF_BUDGET = 32 * 1024
#: Encoded bytes of all reported values together, at most.
MAX_VALUES_BYTES = DIFF_BUDGET // 2
#: Encoded bytes of one event, at most (it leaves alone when that large).
MAX_EVENT_BYTES = DIFF_BUDGET - MAX_VALUES_BYTES
#: Encoded bytes of the events in the SSP state (unacknowledged), at most,
#: unless one larger event is alone: a state of a few datagrams, so that a
#: lossy link still gets it through (see the module docstring).
EVENTS_IN_FLIGHT_BYTES = 4 * 1024
#: Events held beyond the state, at most (by default): hours of one event a
#: second through an outage.
MAX_BACKLOG = 100_000
#: Encoded bytes of the events held beyond the state, at most.
MAX_BACKLOG_BYTES = 16 * 1024 * 1024


class BacklogFull(ValueError):
    """The backlog cannot take the new events (they were not appended)."""


class Backlog:
    """Events not yet in the SSP state, with the encoded sizes of those that are."""

    __slots__ = ("max_events", "_held", "_held_bytes", "_flight", "_flight_base",
                 "_flight_bytes")

    def __init__(self, max_events: int = MAX_BACKLOG) -> None:
        if max_events < 1:
            raise ValueError(f"max_backlog {max_events!r}: at least 1 event")
        self.max_events = max_events
        self._held: deque = deque()       # (frozen event, encoded size), oldest first
        self._held_bytes = 0
        self._flight: deque = deque()     # encoded sizes of the state's events
        self._flight_base = 0             # the absolute index of _flight[0]
        self._flight_bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, events, sizes) -> None:
        """Hold frozen events (their encoded sizes beside them), all or none."""
        count = len(self._held) + len(events)
        held_bytes = self._held_bytes + sum(sizes)
        if count > self.max_events or held_bytes > MAX_BACKLOG_BYTES:
            raise BacklogFull(
                f"backlog full: {len(self._held)} events wait for the broker "
                f"(at most {self.max_events} events, {MAX_BACKLOG_BYTES} bytes); "
                "events refused")
        self._held.extend(zip(events, sizes))
        self._held_bytes = held_bytes

    def take(self, state) -> list:
        """The events to append to ``state`` now: as many as the budget leaves room for."""
        flight = self._flight
        while self._flight_base < state.event_base and flight:
            # Acknowledged: the state no longer holds them.
            self._flight_bytes -= flight.popleft()
            self._flight_base += 1
        self._flight_base = max(self._flight_base, state.event_base)
        held = self._held
        moved = []
        moved_bytes = 0
        room = EVENTS_IN_FLIGHT_BYTES - self._flight_bytes
        while held:
            event, size = held[0]
            if flight and size > room - moved_bytes:
                break
            held.popleft()
            moved.append(event)
            flight.append(size)
            moved_bytes += size
        self._flight_bytes += moved_bytes
        self._held_bytes -= moved_bytes
        return moved
