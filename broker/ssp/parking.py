"""A session as plain values: resumed after a restart, or parked while idle.

Both let the owner keep far less than a live ``SSPSession``:
:class:`Resumption` is what a broker persisted before it restarted
(wire.md section 7), :class:`ParkedSession` what ``SSPSession.park``
keeps of an idle session so that ``SSPSession.unpark`` can rebuild the
same session.  Plain frozen values, so the owner may pack them as it likes.
"""

import dataclasses
from typing import Any

from broker.ssp.crypto import TO_CLIENT, TO_SERVER
from broker.ssp.datagram import DatagramLayer
from broker.ssp.profile import MOSH
from broker.ssp.receiver import Receiver
from broker.ssp.sender import Sender

__all__ = ["Resumption", "ParkedSession", "Parking"]


@dataclasses.dataclass(frozen=True, slots=True)
class Resumption:
    """What a restarted broker persisted about a live session (wire.md 7).

    ``remote_num``/``remote_state``: the newest peer state made durable (and
    maybe acknowledged); ``seq_floor``: the sequence reservation persisted
    before the restart: every number below it may have been used. Our own
    state numbers resume above it too (a state number never exceeds the
    sequence number that first carried it plus one). ``expected_seq``: the
    peer's next datagram sequence number as last persisted; an older datagram
    (a replay) is authentic but may not place the session at its address.
    """

    remote_num: int
    remote_state: Any
    seq_floor: int
    expected_seq: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ParkedSession:
    """An idle session reduced to plain values (``SSPSession.park``).

    Everything else is either shared (profile, ciphers), recomputed, or the
    owner's durable copy of the peer's newest state (``remote_num``), which
    ``SSPSession.unpark`` takes back. ``local_state`` is our state the peer
    acknowledged as ``local_num``; ``remote_heard`` is when its last new
    state arrived, ``last_heard`` its last in-order datagram; ``srtt`` is
    None before any RTT sample. ``rttvar`` (optional, seconds) restores the
    RTO exactly; without it the unparked session takes ``srtt`` as mosh
    takes a first sample (RTTVAR = SRTT/2, so a larger RTO).
    """

    key: bytes = dataclasses.field(repr=False)  # a secret: never logged
    header: bytes | None
    is_server: bool
    next_seq: int
    expected_seq: int
    seq_reserved: int | None
    remote_num: int
    local_num: int
    local_state: Any
    remote_address: Any
    last_heard: float | None
    remote_heard: float
    srtt: float | None
    rttvar: float | None = None


class Parking:
    """``SSPSession.park()`` and ``SSPSession.unpark()``: a mixin of the
    session (its own slots), kept here with the value they produce."""

    __slots__ = ()

    def park(self) -> ParkedSession | None:
        """This session as plain values if it is idle, else None.

        Idle: our current state is the one the peer acknowledged (later
        unacknowledged empty acks are forgotten: new numbers restart above
        ``next_seq``), every peer state is acknowledged, no timer is set,
        nothing is being assembled and no event waits. The owner keeps the
        peer's newest state (``remote_num``) durable and passes it back to
        ``unpark``.
        """
        sender = self._sender
        link = self._link
        if (self._parking_blocked()
                or sender.shutdown_in_progress
                or sender.current is not sender.front_state
                or sender.ack_num != self._receiver.newest_num
                or sender.next_wakeup() is not None
                or self._assembly is not None or self._events is not None
                or self._ack_waiting is not None
                or link.remote_address is None):
            return None
        rtt = link.rtt
        return ParkedSession(
            key=self._key, header=self._header,
            is_server=self.is_server, next_seq=link.next_seq,
            expected_seq=link.expected_seq, seq_reserved=self._seq_reserved,
            remote_num=self._receiver.newest_num, local_num=sender.front_num,
            local_state=sender.front_state,
            remote_address=link.remote_address, last_heard=link.last_heard,
            remote_heard=sender.last_heard,
            srtt=rtt.srtt if rtt.hit else None,
            rttvar=rtt.rttvar if rtt.hit else None)

    @classmethod
    def unpark(cls, parked: ParkedSession, *, remote_state, cipher_provider,
               random_bytes, now: float, profile=MOSH,
               ack_requires_confirm: bool = False) -> "Parking":
        """The session ``park`` returned, rebuilt: same keys, numbering,
        replay protection and acknowledged states, no ack scheduled.

        ``remote_state`` is the peer's state number ``parked.remote_num``.
        """
        session = object.__new__(cls)
        is_server = parked.is_server
        session._key = parked.key
        session._header = parked.header
        session._ciphers = cipher_provider
        session._random_bytes = random_bytes
        session._link = link = DatagramLayer(
            TO_CLIENT if is_server else TO_SERVER)
        link.reserve_seq(parked.next_seq)
        link.expected_seq = parked.expected_seq
        link.remote_address = parked.remote_address
        link.last_heard = parked.last_heard
        if parked.srtt is not None:
            link.rtt.restore(parked.srtt, parked.rttvar)
        session._assembly = None
        session._events = None
        session._flags = cls._initial_flags(is_server, ack_requires_confirm)
        session._ack_waiting = None
        session._seq_reserved = parked.seq_reserved
        session._sender = sender = Sender(
            parked.local_state, now, profile,
            heartbeats=profile.broker_heartbeats or not is_server,
            num=parked.local_num, first_num=parked.next_seq + 1, due=False)
        sender.ack_num = parked.remote_num
        sender.remote_heard(parked.remote_heard)
        zero = type(remote_state).empty() if parked.header is not None else None
        session._receiver = Receiver(remote_state, parked.remote_num,
                                     zero=zero)
        session._emitted_num = parked.remote_num
        return session
