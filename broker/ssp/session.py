"""One SSP session: datagrams in, datagrams and events out, time as argument.

The driver of the sans-IO core (the shape of aioquic's connection): the
owner feeds ``receive_datagram(data, address, now)``, sends what
``datagrams_to_send(now)`` returns, calls again at ``next_wakeup()`` and
reads ``pop_events()``. Inside, the layers are mosh's: datagram (nonce,
OCB3, timestamps, roaming), fragments, the zlib'd instruction, and the
sender and receiver of states. The receive path is in
:mod:`broker.ssp.incoming`, the send path and the sequence reservation in
:mod:`broker.ssp.outgoing`, park/unpark in :mod:`broker.ssp.parking`
(mixins: no extra call per datagram).

Two framings: plain mosh (no header, the key is the session key) and the
broker's (wire.md: a 17-byte header both ways, the key is the device secret
and the session key is derived from it and the header).

Peer input never raises: every refusal is a :class:`DatagramDropped`, caught
in ``receive_datagram`` and reported as
:class:`~broker.ssp.events.DatagramRejected` (``drops`` counts them by
reason until the next ``pop_events``).

Memory: a million idle sessions must fit, so a session keeps its 16-byte
key (the cipher comes from the shared ``cipher_provider`` per call) and its
17-byte header, slots only, and builds what only an active session needs
(fragment assembly, the event list) on demand, dropping it again when done.
Sent and received states beyond the acknowledged ones are pruned by acks.
"""

import collections

from broker.ssp import events, speedups
from broker.ssp.crypto import TO_CLIENT, TO_SERVER
from broker.ssp.datagram import DatagramLayer
from broker.ssp.flags import (ACKS_OVERFLOWED, ASKS_ACKS, CLOSED, HOLD_ACKS,
                              PEER_SHUTDOWN, SEQ_REQUESTED, SERVER)
from broker.ssp.fragment import DEFAULT_MAX_ASSEMBLY
from broker.ssp.framing import BrokerFraming, parse_header
from broker.ssp.incoming import Incoming
from broker.ssp.instruction import UINT64_MAX
from broker.ssp.keys import derive_session_key
from broker.ssp.outgoing import SEQ_RESERVATION_BLOCK, Outgoing
from broker.ssp.parking import ParkedSession, Parking, Resumption
from broker.ssp.profile import MOSH
from broker.ssp.receiver import Receiver, ResumedReceiver
from broker.ssp.sender import Sender

__all__ = ["SSPSession", "Resumption", "ParkedSession",
           "SEQ_RESERVATION_BLOCK"]

#: The compiled send path (None: this module's code for every call; tests
#: set it to None to force it): the usual empty ack or new state, or None
#: to hand over.
_fast_send = speedups.fast_send
#: The sender's timers in C (None: Sender.calculate_timers; tests set it to
#: None with _fast_send).
_fast_timers = speedups.fast_timers
#: Sender.set_current_state with its state comparisons in C (None: the
#: method; tests set it to None with _fast_send).
_fast_set_state = speedups.fast_set_state
#: SSPSession.next_wakeup in C (the method's own code where it cannot say;
#: tests set it to None with _fast_send).
_fast_wakeup = speedups.fast_next_wakeup


def _assembly_cap(max_bytes: int | None) -> int:
    if max_bytes is None:
        return DEFAULT_MAX_ASSEMBLY
    if max_bytes < 1:
        raise ValueError(f"max_assembly_bytes must be positive, got "
                         f"{max_bytes}")
    return max_bytes


class SSPSession(Incoming, Parking, Outgoing):
    """One SSP session with one peer (see the module docstring).

    ``local_state`` and ``remote_state`` are state 0 of each direction (both
    ends must agree; the empty device state for the broker framing); the
    application then calls ``set_local_state``. With
    ``ack_requires_confirm`` a received state is acknowledged only after
    ``confirm_durable(num)``. ``seq_reserved`` (broker) is the persisted
    sequence reservation: the session uses numbers below it only and asks
    for more with :class:`~broker.ssp.events.SequenceReservationRequested`.
    ``first_seq``: the first sequence number a new session seals with (its
    owner's floor: numbers below it may have been used under this key by a
    run whose records it lost, see broker/udp/sessions.py ``clock_floor``).
    ``max_assembly_bytes`` bounds the compressed bytes of a half-assembled
    instruction (a larger one is dropped as TOO_LARGE): an authentic peer
    can make us hold no more (pass a shared int: it costs a pointer).
    """

    __slots__ = ("_key", "_ciphers", "_random_bytes", "_header", "_link",
                 "_sender", "_receiver", "_assembly", "_events", "_flags",
                 "_ack_waiting", "_emitted_num", "_seq_reserved",
                 "_max_assembly")

    def __init__(self, *, key: bytes, cipher_provider, is_server: bool,
                 local_state, remote_state, random_bytes, now: float,
                 profile=MOSH, framing: BrokerFraming | None = None,
                 remote_address=None, ack_requires_confirm: bool = False,
                 resume: Resumption | None = None,
                 seq_reserved: int | None = None,
                 max_assembly_bytes: int | None = None,
                 first_seq: int = 0) -> None:
        if framing is not None:
            key = derive_session_key(key, framing.device_number,
                                     framing.session_id)
            self._header = framing.header
        else:
            self._header = None
        if len(key) != 16:
            raise ValueError(f"key must be 16 bytes, got {len(key)}")
        self._key = bytes(key)
        self._ciphers = cipher_provider
        self._random_bytes = random_bytes
        self._link = link = DatagramLayer(
            TO_CLIENT if is_server else TO_SERVER)
        if remote_address is not None:
            link.remote_address = remote_address
            link.last_heard = now
        self._assembly = None
        self._max_assembly = _assembly_cap(max_assembly_bytes)
        self._events = None
        self._flags = self._initial_flags(is_server, ack_requires_confirm)
        self._ack_waiting = None
        heartbeats = profile.broker_heartbeats or not is_server
        zero = remote_state if framing is not None else None
        if resume is None:
            link.reserve_seq(first_seq)
            # States numbered from there too (as a resumed session's): a peer
            # that still holds states of this key from a run the owner lost
            # ignores every state numbered at or below its newest.
            self._sender = Sender(local_state, now, profile,
                                  heartbeats=heartbeats, first_num=first_seq + 1)
            self._receiver = Receiver(remote_state, zero=zero)
            self._emitted_num = 0
        else:
            link.reserve_seq(resume.seq_floor)
            link.expected_seq = resume.expected_seq
            self._sender = sender = Sender(local_state, now, profile,
                                           heartbeats=heartbeats,
                                           first_num=resume.seq_floor + 1)
            # With acks held until durable, states acknowledged above the
            # persisted one equal it (see ResumedReceiver).
            kind = ResumedReceiver if ack_requires_confirm else Receiver
            self._receiver = kind(resume.remote_state, resume.remote_num,
                                  zero=zero)
            self._emitted_num = resume.remote_num
            # The peer may be stuck sending diffs from a state it has not
            # seen acknowledged: the first tick (due at once, the timers
            # start at now) tells it where we are.
            sender.ack_num = resume.remote_num
        if seq_reserved is not None and seq_reserved < link.next_seq:
            raise ValueError(f"seq_reserved {seq_reserved} is below the "
                             f"next sequence number {link.next_seq}")
        self._seq_reserved = seq_reserved

    @classmethod
    def unpark(cls, parked: ParkedSession, *, max_assembly_bytes=None,
               **options) -> "SSPSession":
        """``Parking.unpark`` (see there), with the assembly cap of __init__."""
        session = super().unpark(parked, **options)
        session._max_assembly = _assembly_cap(max_assembly_bytes)
        return session

    # -- facts for the owner ------------------------------------------------

    @property
    def key(self) -> bytes:
        """The session key (derived, for the broker framing)."""
        return self._key

    @property
    def framing(self) -> BrokerFraming | None:
        if self._header is None:
            return None
        device_number, session_id = parse_header(self._header)
        return BrokerFraming(device_number, session_id)

    @property
    def is_server(self) -> bool:
        return bool(self._flags & SERVER)

    @property
    def remote_address(self):
        """Where datagrams go (None: a server that has no client)."""
        return self._link.remote_address

    @property
    def last_heard(self) -> float | None:
        """When the last in-order authentic datagram arrived."""
        return self._link.last_heard

    @property
    def rtt(self):
        """The RTT estimator (srtt, rttvar, rto in seconds)."""
        return self._link.rtt

    @property
    def next_seq(self) -> int:
        """The sequence number the next datagram will carry."""
        return self._link.next_seq

    @property
    def expected_seq(self) -> int:
        """The peer's next datagram sequence number: anything older is a
        retransmission or a replay (persisted by owners, see Resumption)."""
        return self._link.expected_seq

    @property
    def latest_remote_state(self):
        """The newest state the peer sent us (in order)."""
        return self._receiver.newest_state

    @property
    def newest_sent_num(self) -> int:
        """The number of the newest state sent: unchanged by a send that
        repeats it (a retransmission), bumped by any other."""
        return self._sender.back_num

    @property
    def max_assembly_bytes(self) -> int:
        return self._max_assembly

    @property
    def latest_remote_num(self) -> int:
        return self._receiver.newest_num

    @property
    def local_state(self):
        """Our current state, less what the peer acknowledged."""
        return self._sender.current

    @property
    def acknowledged_num(self) -> int:
        """Our newest state the peer acknowledged."""
        return self._sender.front_num

    @property
    def acknowledged_state(self):
        return self._sender.front_state

    @property
    def ack_num(self) -> int:
        """The peer state number we acknowledge."""
        return self._sender.ack_num

    @property
    def closed(self) -> bool:
        """The shutdown handshake is over; the owner may forget us."""
        return bool(self._flags & CLOSED)

    @property
    def shutdown_in_progress(self) -> bool:
        return self._sender.shutdown_in_progress

    @property
    def drops(self) -> collections.Counter:
        """Datagrams dropped since the last ``pop_events``, by DropReason.

        Not kept longer: a flood of forged datagrams naming many sessions
        must not leave a counter in each; the DatagramRejected events are
        the record to count.
        """
        return collections.Counter(
            event.reason for event in self._events or ()
            if type(event) is events.DatagramRejected)

    @property
    def idle(self) -> bool:
        """Nothing in flight: all acknowledged, nothing held or assembled."""
        return (self._sender.idle and self._assembly is None
                and self._events is None and self._ack_waiting is None
                and self._sender.ack_num == self._receiver.newest_num)

    # -- for parking (see broker.ssp.parking) -------------------------------

    def _parking_blocked(self) -> bool:
        """Closed, or the peer began its shutdown: never park."""
        return bool(self._flags & (CLOSED | PEER_SHUTDOWN))

    @staticmethod
    def _initial_flags(is_server: bool, ack_requires_confirm: bool) -> int:
        return ((SERVER if is_server else 0)
                | (HOLD_ACKS if ack_requires_confirm else 0))

    # -- inputs -------------------------------------------------------------

    def pop_events(self) -> list:
        """The events since the last call, oldest first (and forget
        ``drops``)."""
        found = self._events
        self._events = None
        return found if found is not None else []

    def set_local_state(self, state, now: float | None = None) -> None:
        """The application's current outgoing state; pass ``now`` so the
        send timer starts at the change (then ``next_wakeup`` is exact)."""
        fast = _fast_set_state
        if fast is not None:
            fast(self._sender, state, now)
        else:
            self._sender.set_current_state(state, now)
        if now is not None:
            self._refresh(now)

    def count_peer_heard(self, now: float) -> None:
        """Count the peer as heard at ``now``: a client starting a session then
        resends its first states actively (every RTO, backed off) for the
        profile's active_retry_timeout, as mosh's client does from its start,
        rather than only with its heartbeat when the peer's first answer is lost."""
        self._sender.remote_heard(now)

    def ask_acks(self, asking: bool) -> None:
        """While ``asking``, send our empty diffs (acks, heartbeats) as the
        state's ``ACK_REQUEST_DIFF``, so that the peer acknowledges them within
        ACK_DELAY instead of with its next datagram: the owner wants proof
        that the peer holds a state we sent (a session resumed on probation).
        States without that attribute send ``b""`` as before."""
        if asking and getattr(self._sender.current, "ACK_REQUEST_DIFF", None):
            self._flags |= ASKS_ACKS
        else:
            self._flags &= ~ASKS_ACKS

    def probe(self, now: float, went_out: int = 0) -> list:
        """The datagrams of a path challenge (Sender.probe: ``went_out`` is the
        number of the newest state the owner let go out) to the peer's address;
        [] when none can go (no address or state to ask with, a shutdown, the
        sequence reservation used up)."""
        link = self._link
        address = link.remote_address
        ask = getattr(self._sender.current, "ACK_REQUEST_DIFF", None)
        if self._flags & CLOSED or address is None or not ask:
            return []
        if (self._seq_reserved is not None
                and link.next_seq >= self._seq_reserved):
            self._request_seqs()
            return []
        inst = self._sender.probe(now, ask, went_out)
        return [] if inst is None else self._send_instruction(inst, address, now)

    def start_shutdown(self, now: float) -> None:
        """Begin mosh's shutdown handshake (state number UINT64_MAX)."""
        self._sender.start_shutdown(now)
        self._refresh(now)

    def confirm_durable(self, num: int) -> None:
        """The owner made our received state ``num`` durable: ack it within
        ACK_DELAY of that state's arrival, as mosh acks a state with data
        (or by mosh's shutdown pacing, during a shutdown handshake)."""
        sender = self._sender
        newest = self._receiver.newest_num
        if num <= sender.ack_num or num > newest:
            return
        waiting = self._ack_waiting
        if num >= self._emitted_num:
            # The newest state equals the one reported as ``num``.
            acked = newest
            self._ack_waiting = None
            self._flags &= ~ACKS_OVERFLOWED
        else:
            acked = num
            if waiting is not None:
                self._ack_waiting = _still_waiting(
                    waiting, num, self._flags & ACKS_OVERFLOWED)
        if waiting is not None and waiting[0] <= num:
            sender.set_data_ack(waiting[1])
        # Last, as in mosh's calculate_timers: acknowledging the peer's
        # shutdown paces the ack by the send interval instead.
        sender.acknowledge(acked, self._link.rtt)

    # -- outputs ------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """When ``datagrams_to_send`` next has work (None: only on input)."""
        fast = _fast_wakeup
        if fast is not None:
            wakeup = fast(self)
            if wakeup is not NotImplemented:
                return wakeup
        flags = self._flags
        if flags & CLOSED or self._link.remote_address is None:
            return None
        if (flags & SEQ_REQUESTED
                and self._link.next_seq >= self._seq_reserved):
            return None  # waiting for confirm_seq_reservation
        return self._sender.next_wakeup()

    def datagrams_to_send(self, now: float) -> list:
        """The datagrams due at ``now``, as (bytes, address) pairs."""
        fast = _fast_send
        if fast is not None:
            out = fast(self, now)
            if out is not None:
                return out  # the usual empty ack or new state, timers included
        flags = self._flags
        if flags & CLOSED:
            return []
        sender = self._sender
        if sender.shutdown_timed_out(now):
            self._close(events.ShutdownTimedOut())
            return []
        link = self._link
        address = link.remote_address
        if address is None:
            return []
        if (self._seq_reserved is not None
                and link.next_seq >= self._seq_reserved):
            self._request_seqs()
            return []
        inst = sender.tick(now, link.rtt, self._random_bytes)
        if inst is None:
            return []
        if flags & ASKS_ACKS and not inst.diff and inst.new_num != UINT64_MAX:
            inst = inst._replace(diff=sender.current.ACK_REQUEST_DIFF)
        out = self._send_instruction(inst, address, now)
        if inst.ack_num == UINT64_MAX and not self._flags & CLOSED:
            self._close(events.PeerShutdownAcknowledged())
            return out
        if (flags & SERVER and out and link.last_heard is not None
                and now - link.last_heard
                > sender.profile.server_association_timeout):
            # network.cc Connection::send(), after sending: "Server now
            # detached from client" (SERVER_ASSOCIATION_TIMEOUT); the next
            # authentic in-order datagram attaches it again. (mosh stops
            # after the first fragment; we send the instruction whole.)
            link.remote_address = None
            self._emit(events.PeerDetached())
        sender.calculate_timers(now, link.rtt)
        return out

    # -- internals ----------------------------------------------------------

    def _emit(self, event) -> None:
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def _close(self, event) -> None:
        self._flags |= CLOSED
        self._assembly = None
        self._emit(event)

    def _refresh(self, now: float) -> None:
        """Recompute the sender's timers (mosh: before every wait)."""
        if self._flags & CLOSED:
            return
        timers = _fast_timers
        if timers is not None:
            timers(self._sender, now, self._link.rtt)
        else:
            self._sender.calculate_timers(now, self._link.rtt)


def _still_waiting(waiting: list, num: int, overflowed) -> list | None:
    """The arrival list ([num, time, ...]) left once states up to ``num``
    are acknowledged.

    Its entries are exact, one per held state that wants an ack (numbers
    may skip: states lost on the way, or that want none), unless it
    ``overflowed`` (MAX_ACKS_WAITING): then some states that want an ack
    were not recorded, and the states above ``num`` that came before the
    next entry kept are taken to have come with the last entry dropped
    (their ack may come early, never late). Without an overflow such a
    made-up entry would make a later confirmation ack at once instead of
    ACK_DELAY after the state's arrival.
    """
    index = 0
    while index < len(waiting) and waiting[index] <= num:
        index += 2
    if index == 0:
        return waiting
    rest = waiting[index:]
    if overflowed:
        if not rest or rest[0] > num + 1:
            rest[:0] = (num + 1, waiting[index - 1])
        return rest
    return rest or None
