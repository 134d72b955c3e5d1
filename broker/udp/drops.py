"""Why the endpoint drops a datagram: its reasons and the "did not authenticate" test.

Shared vocabulary of the endpoint's drop counter (``SSPEndpoint.drops``,
keyed by reason value) and the failure budget, which only datagrams that
did not authenticate are charged to.
"""

from __future__ import annotations

import enum

from broker.ssp import events as ssp_events
from broker.ssp.errors import DropReason

__all__ = ["EndpointDrop", "not_authentic"]

# Rejections that mean "did not authenticate" (no reply, charged to the
# device's failure budget) rather than "authentic but unusable".
_NOT_AUTHENTIC = frozenset((DropReason.AUTH_FAILED, DropReason.SHORT,
                            DropReason.WRONG_DIRECTION, DropReason.BAD_HEADER,
                            DropReason.UNKNOWN_FRAMING))


class EndpointDrop(str, enum.Enum):
    """Reasons the endpoint drops a datagram before a session sees it."""

    UNKNOWN_DEVICE = "unknown_device"
    OLD_SESSION = "old_session"
    GLOBAL_RATE_LIMITED = "global_rate_limited"
    RATE_LIMITED = "rate_limited"
    DEVICE_RATE_LIMITED = "device_rate_limited"
    NEW_SESSION_RATE_LIMITED = "new_session_rate_limited"
    SESSION_CAP = "session_cap"
    BAD_RECORD = "bad_record"
    INTERNAL_ERROR = "internal_error"

    def __str__(self) -> str:
        return self.value


def not_authentic(found) -> bool:
    """Whether a session's events say a datagram did not authenticate."""
    for event in found:
        if type(event) is ssp_events.DatagramRejected and event.reason in _NOT_AUTHENTIC:
            return True
    return False
