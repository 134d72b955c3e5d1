"""Idle sessions parked in a few bytes, rebuilt when their device speaks.

A live ``SSPSession`` with its states, sender, receiver, link, RTT
estimator and address costs a few kilobytes; a million idle devices would
not fit.  A session that is idle (everything acknowledged and durable both
ways) is reduced to one packed ``bytes`` value holding what cannot be
recomputed: its 16-byte key, session id, sequence numbers (the next one we
send, the next one we expect: replay protection), our sequence
reservation, the state numbers of both sides, the smoothed RTT, when the
device was last heard and its port.  The device's own state needs no copy:
its content is the durable state in the session record.  Our outgoing
state is the device's desired values, usually the shared empty state.

``unpark`` rebuilds an equivalent ``SSPSession``.  Until the core offers
``SSPSession.park()`` / ``unpark()`` (requested in the SSP plan), the
rebuild sets three attributes the constructor does not take (the sender
with its acknowledged front, the expected sequence number, the time last
heard);
this module is the only place that does.
"""

from __future__ import annotations

import struct
import sys

from broker.ssp.framing import BrokerFraming
from broker.ssp.sender import Sender
from broker.ssp.session import Resumption, SSPSession

from broker.udp.sessions import EMPTY, LiveSession

# key, session id, next seq, expected seq, reserved seq, remote num, local num,
# last heard, srtt, port.
_PACK = struct.Struct(">16sQQQQQQdfH")
_pack = _PACK.pack
_unpack = _PACK.unpack


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

    def remote_address(self):
        return None if self.host is None else (self.host, _unpack(self.data)[9])

    def __repr__(self) -> str:
        return f"<Parked name={self.name!r} session={self.session_id}>"


def can_park(live: LiveSession) -> bool:
    """Everything the device sent is durable and acknowledged, no command is on its
    way, nothing is due, and the session has a peer.

    Desired values not yet acknowledged may stay behind: they are the
    registry's, and unparking sends them again (see SessionTable.wake).
    """
    session = live.session
    return (live.writes == 0 and session.ack_num == session.latest_remote_num
            and session.local_state.event_end == session.acknowledged_state.event_end
            and session.remote_address is not None and session.last_heard is not None
            and session.seq_reservation is not None
            and session.next_wakeup() is None)


def park(live: LiveSession) -> Parked:
    """The packed form of an idle live session (see can_park)."""
    session = live.session
    link = session._link  # shim: SSPSession.park() will give these
    host, port = session.remote_address[0], session.remote_address[1]
    rtt = session.rtt
    data = _pack(session.key, live.session_id, session.next_seq, link.expected_seq,
                 session.seq_reservation, session.latest_remote_num,
                 session.acknowledged_num, session.last_heard,
                 rtt.srtt if rtt.hit else -1.0, port)
    local = session.acknowledged_state
    return Parked(data, sys.intern(host) if type(host) is str else host, live.name,
                  EMPTY if local == EMPTY else local, live.online, live.wheel_slot)


def unpark(parked: Parked, number: int, *, secret: bytes, remote_state, ciphers, profile,
           random_bytes, now: float) -> LiveSession:
    """A live session equivalent to the one that was parked.

    ``remote_state``: the device's durable state (its content equals the
    newest state the parked session held).
    """
    (key, session_id, next_seq, expected_seq, reserved, remote_num, local_num, last_heard,
     srtt, port) = _unpack(parked.data)
    address = (parked.host, port)
    session = SSPSession(key=secret, cipher_provider=ciphers, is_server=True,
                         local_state=EMPTY, remote_state=EMPTY, random_bytes=random_bytes,
                         now=now, profile=profile, framing=BrokerFraming(number, session_id),
                         remote_address=address, ack_requires_confirm=True,
                         resume=Resumption(remote_num, remote_state, next_seq),
                         seq_reserved=reserved)
    # Shim until SSPSession.unpark(): the acknowledged front, replay
    # protection and silence clock of the parked session.
    sender = Sender(parked.local, now, profile, heartbeats=profile.broker_heartbeats,
                    num=local_num, first_num=next_seq + 1)
    sender.ack_num = remote_num
    sender.remote_heard(last_heard)
    session._sender = sender
    link = session._link
    link.expected_seq = expected_seq
    link.last_heard = last_heard
    if srtt >= 0:
        link.rtt.add_sample(srtt)
    live = LiveSession(number, parked.name, session_id, session, remote_state, reserved)
    live.online = parked.online
    live.wheel_slot = parked.wheel_slot
    return live
