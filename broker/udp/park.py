"""Idle sessions parked in a few bytes, rebuilt when their device speaks.

A live ``SSPSession`` with its states, sender, receiver, link, RTT
estimator and address costs a few kilobytes; a million idle devices would
not fit.  ``SSPSession.park()`` reduces an idle session (everything
acknowledged both ways, nothing due) to plain values; this module packs
those into one ``bytes`` value: the 16-byte key, session id, sequence
numbers (the next one we send, the next one we expect: replay protection),
our sequence reservation, the state numbers of both sides, the smoothed
RTT, when the device was last heard, its port, and when the session record's
receive mark was last written (whole seconds: table.py).  The device's own state
needs no copy: its content is the durable state in the session record.  Our
acknowledged outgoing state is the device's desired values, usually the
shared empty state.  ``unpark`` gives ``SSPSession.unpark`` its values back.
"""

from __future__ import annotations

import math
import struct
import sys

from broker.ssp.framing import build_header
from broker.ssp.session import ParkedSession, SSPSession

from broker.udp.sessions import EMPTY, NEVER_MARKED, LiveSession

# key, session id, next seq, expected seq, reserved seq, remote num, local num,
# last heard, remote heard (a new state), srtt (-1: none yet), rttvar, port,
# marked at (whole seconds + 1; 0: never).
# 94 bytes: a bytes object of up to 95 takes the same 128-byte block.
_PACK = struct.Struct(">16sQQQQQQddffHI")
_pack = _PACK.pack
_unpack = _PACK.unpack
_NO_RTT = -1.0
_MAX_MARKED = (1 << 32) - 1


class Parked:
    """An idle session: packed facts plus shared references (host, name, outgoing state)."""

    __slots__ = ("data", "host", "name", "local", "online", "wheel_slot")

    def __init__(self, data: bytes, host, name: str, local, online: bool,
                 wheel_slot: int) -> None:
        self.data = data
        self.host = host
        self.name = name
        self.local = local
        self.online = online
        self.wheel_slot = wheel_slot

    @property
    def session_id(self) -> int:
        return _unpack(self.data)[1]

    @property
    def session_key(self) -> bytes:
        return self.data[:16]

    def last_heard(self) -> float:
        return _unpack(self.data)[7]

    def expected_seq(self) -> int:
        """The device's next datagram sequence number (see SSPSession.expected_seq)."""
        return _unpack(self.data)[3]

    def marked_at(self) -> float:
        """When the record's receive mark was last written (LiveSession.marked_at,
        rounded down to the second)."""
        marked = _unpack(self.data)[12]
        return NEVER_MARKED if marked == 0 else float(marked - 1)

    def remote_address(self):
        return (self.host, _unpack(self.data)[11])

    def __repr__(self) -> str:
        return f"<Parked name={self.name!r} session={self.session_id}>"


def park(live: LiveSession, marked_at: float | None = None) -> Parked | None:
    """The packed form of an idle live session, or None if it is not idle.

    Idle for the endpoint too: every report durable (no write on its way,
    none failed and waiting to be written again, reservations included),
    and not on probation (probation.py: its proof must not be forgotten).
    ``marked_at``: when the record's mark was written, if not ``live.marked_at``.
    """
    if (live.writes or live.unsaved_num or live.unreserved or not live.started
            or live.probation is not None):
        return None
    parked = live.session.park()
    if parked is None or parked.seq_reserved is None or parked.last_heard is None:
        return None
    host, port = parked.remote_address[0], parked.remote_address[1]
    data = _pack(parked.key, live.session_id, parked.next_seq, parked.expected_seq,
                 parked.seq_reserved, parked.remote_num, parked.local_num,
                 parked.last_heard, parked.remote_heard,
                 _NO_RTT if parked.srtt is None else parked.srtt,
                 _NO_RTT if parked.rttvar is None else parked.rttvar, port,
                 _packed_time(live.marked_at if marked_at is None else marked_at))
    local = parked.local_state
    return Parked(data, sys.intern(host) if type(host) is str else host, live.name,
                  EMPTY if local == EMPTY else local, live.online, live.wheel_slot)


def unpark(parked: Parked, number: int, *, remote_state, ciphers, profile, random_bytes,
           now: float, max_assembly_bytes: int | None = None,
           reported=None) -> LiveSession:
    """The live session that was parked.

    ``remote_state``: the device's durable state (its content equals the
    newest state the parked session held).  ``reported``: what its next
    report is compared with, if not that state (sessions.record_states: a
    session parked before its first report starts from a SessionStart).
    """
    (key, session_id, next_seq, expected_seq, reserved, remote_num, local_num, last_heard,
     remote_heard, srtt, rttvar, port, marked) = _unpack(parked.data)
    values = ParkedSession(
        key=key, header=build_header(number, session_id), is_server=True,
        next_seq=next_seq, expected_seq=expected_seq, seq_reserved=reserved,
        remote_num=remote_num, local_num=local_num, local_state=parked.local,
        remote_address=(parked.host, port), last_heard=last_heard,
        remote_heard=remote_heard, srtt=_measured(srtt), rttvar=_measured(rttvar))
    session = SSPSession.unpark(values, remote_state=remote_state, cipher_provider=ciphers,
                                random_bytes=random_bytes, now=now, profile=profile,
                                ack_requires_confirm=True,
                                max_assembly_bytes=max_assembly_bytes)
    live = LiveSession(number, parked.name, session_id, session,
                       remote_state if reported is None else reported, reserved)
    live.online = parked.online
    live.wheel_slot = parked.wheel_slot
    live.marked_at = NEVER_MARKED if marked == 0 else float(marked - 1)
    return live


def _packed_time(seconds: float) -> int:
    """``seconds`` (monotonic) as the packed whole seconds + 1 (0: never)."""
    if seconds == NEVER_MARKED or seconds < 0:
        return 0
    return min(_MAX_MARKED, int(seconds) + 1)


def _measured(seconds: float) -> float | None:
    """A packed RTT figure, None if there was none (-1) or it is unusable."""
    return None if seconds < 0 or math.isnan(seconds) else seconds
