"""The contract every synchronized state type keeps (mosh ``statesync``).

The transport only ever holds states, diffs them and applies diffs; it never
looks inside. States are immutable values, so the sender's list of sent
states, the receiver's list of received states and the application can share
one object instead of copying it (mosh copies, we must not: a million idle
sessions each hold a few states).

A state type provides (ssp-mosh.md section 9.1):

* ``diff_from(existing)``: bytes that turn ``existing`` into ``self``;
  ``b""`` when there is nothing to say. ``existing`` is a state this one
  descends from (the one the peer is assumed to hold).
* ``apply(diff)``: the state ``diff`` leads to. Peer input: a malformed or
  inapplicable diff raises :class:`DatagramDropped` with ``BAD_DIFF`` and
  nothing else, so a hostile peer cannot crash the core.
* ``subtract(prefix)``: the same state with what ``prefix`` (an acknowledged
  ancestor) already delivered forgotten; may return ``self``.
* ``==``: same state (decides "is there something new to send").
* ``empty()``: state 0, identical at both ends; every diff chain starts there.

Optionally, ``ACK_REQUEST_DIFF``: non-empty bytes that change nothing. A
peer following mosh acknowledges a state within ACK_DELAY only when its
diff is non-empty (mosh's ``set_data_ack``); a sender that needs an answer
now sends these instead of ``b""`` (``SSPSession.ask_acks``).
"""

from typing import Protocol, TypeVar, runtime_checkable

from broker.ssp.errors import DatagramDropped, DropReason

S = TypeVar("S", bound="State")

#: The diff between equal states, and the diff of a heartbeat.
EMPTY_DIFF = b""


@runtime_checkable
class State(Protocol):
    """An immutable synchronized state (see the module docstring)."""

    def diff_from(self: S, existing: S) -> bytes:
        """Bytes that turn ``existing`` into this state (``b""``: equal)."""

    def apply(self: S, diff: bytes) -> S:
        """The state ``diff`` leads to; raises DatagramDropped(BAD_DIFF)."""

    def subtract(self: S, prefix: S) -> S:
        """This state without what the acknowledged ``prefix`` delivered."""

    def __eq__(self, other: object) -> bool:
        """Whether both are the same state."""

    @classmethod
    def empty(cls: type[S]) -> S:
        """State 0, the same object on every call."""


def bad_diff(detail: str) -> DatagramDropped:
    """The exception a state raises for a diff it cannot apply."""
    return DatagramDropped(DropReason.BAD_DIFF, detail)


def is_state_type(cls: type) -> bool:
    """Whether ``cls`` offers the whole contract (checked by sessions)."""
    return all(
        callable(getattr(cls, name, None))
        for name in ("diff_from", "apply", "subtract", "empty", "__eq__")
    )


def replay_diffs(state: S, diffs) -> S:
    """Apply ``diffs`` in order from ``state`` (tests and resumption)."""
    for diff in diffs:
        state = state.apply(diff)
    return state


class EventQueue:
    """The read side of an append-only event queue with absolute indexes.

    Mixed into the state types that carry events (DeviceState, UserStream):
    they keep ``_events`` (the events still held) and ``_event_base`` (the
    absolute index of the first), so acknowledged events can be dropped by
    ``subtract`` while every index stays what the peer saw.
    """

    __slots__ = ()

    @property
    def events(self) -> tuple:
        """The events still held, the first one at index ``event_base``."""
        return self._events

    @property
    def event_base(self) -> int:
        """Absolute index of the first event held."""
        return self._event_base

    @property
    def event_end(self) -> int:
        """Absolute index the next event appended will get."""
        return self._event_base + len(self._events)
