"""Why a datagram was dropped: the one exception every decoder raises.

Peer input never crashes the core: each decoder either returns a value or
raises :class:`DatagramDropped` with a :class:`DropReason`, which the session
counts and logs.
"""

import enum


class DropReason(str, enum.Enum):
    """Why an incoming datagram was dropped (append new members only)."""

    SHORT = "short"
    UNKNOWN_FRAMING = "unknown_framing"
    BAD_HEADER = "bad_header"
    AUTH_FAILED = "auth_failed"
    WRONG_DIRECTION = "wrong_direction"
    BAD_FRAGMENT = "bad_fragment"
    FRAGMENT_MISMATCH = "fragment_mismatch"
    BAD_ZLIB = "bad_zlib"
    TOO_LARGE = "too_large"
    BAD_INSTRUCTION = "bad_instruction"
    BAD_VERSION = "bad_version"
    UNKNOWN_REFERENCE = "unknown_reference"
    BAD_THROWAWAY = "bad_throwaway"
    BAD_DIFF = "bad_diff"
    QUEUE_FULL = "queue_full"
    REPLAY = "replay"
    EVENTS_OVER_LIMIT = "events_over_limit"
    VALUES_OVER_LIMIT = "values_over_limit"

    def __str__(self) -> str:
        return self.value


class DatagramDropped(Exception):
    """A datagram (or the instruction it carried) was refused.

    ``reason`` is a :class:`DropReason`; the message gives detail for logs.
    """

    def __init__(self, reason: DropReason, message: str = "") -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        if self.message:
            return f"{self.reason.value}: {self.message}"
        return self.reason.value
