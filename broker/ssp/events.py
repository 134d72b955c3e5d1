"""What an SSP session tells its owner, as small immutable values.

``SSPSession.pop_events()`` returns these in the order they happened. Names
are in the past tense: each reports a fact, the owner decides what to do.
"""

import dataclasses
from typing import Any

__all__ = [
    "StateReceived",
    "StateAcknowledged",
    "PeerRoamed",
    "PeerDetached",
    "ShutdownRequested",
    "ShutdownAcknowledged",
    "ShutdownTimedOut",
    "PeerShutdownAcknowledged",
    "SequenceReservationRequested",
    "DatagramRejected",
]

_event = dataclasses.dataclass(frozen=True, slots=True)


@_event
class StateReceived:
    """The peer's newest state changed to ``state``, numbered ``num``.

    Only changes are reported: a new number for the same state (an empty
    ack, a heartbeat) is not. With ``ack_requires_confirm`` the session
    acknowledges ``num`` only after the owner calls ``confirm_durable(num)``.
    """

    state: Any
    num: int


@_event
class StateAcknowledged:
    """The peer acknowledged our state ``num`` (and every one before it)."""

    num: int


@_event
class PeerRoamed:
    """An authentic, newer datagram came from a new ``address``; replies go
    there.  A session's first address (new, resumed or attached again after
    detaching) is not a roam: only a move from one address to another."""

    address: Any


@_event
class PeerDetached:
    """The server heard nothing in order for the association timeout and
    stopped sending until the client is heard again (mosh's "detached")."""


@_event
class ShutdownRequested:
    """The peer started its shutdown (it sent state number UINT64_MAX)."""


@_event
class ShutdownAcknowledged:
    """The peer acknowledged our shutdown; the session is over."""


@_event
class ShutdownTimedOut:
    """Our shutdown got no acknowledgement within the retries or the time."""


@_event
class PeerShutdownAcknowledged:
    """We acknowledged the peer's shutdown; the session is over (mosh's
    ``counterparty_shutdown_ack_sent``)."""


@_event
class SequenceReservationRequested:
    """Persist ``limit``, then call ``confirm_seq_reservation(limit)``.

    Sequence numbers below the confirmed reservation may be used; a
    restarted broker resumes at the persisted one, so no nonce is ever used
    twice under one session key (wire.md section 7).
    """

    limit: int


@_event
class DatagramRejected:
    """A datagram was dropped and counted; ``reason`` is a ``DropReason``."""

    reason: Any


def _fast(cls):
    """A constructor for ``cls`` that fills its slots directly, skipping
    the frozen dataclass ``__init__`` (a few hundred ns, per datagram)."""
    setters = tuple(getattr(cls, field.name).__set__
                    for field in dataclasses.fields(cls))
    new = object.__new__
    if len(setters) == 1:
        (set_one,) = setters

        def make_one(value):
            event = new(cls)
            set_one(event, value)
            return event
        return make_one
    (set_first, set_second) = setters

    def make_two(first, second):
        event = new(cls)
        set_first(event, first)
        set_second(event, second)
        return event
    return make_two


# The events built for most datagrams (positional arguments only).
state_received = _fast(StateReceived)
state_acknowledged = _fast(StateAcknowledged)
datagram_rejected = _fast(DatagramRejected)
