"""The sending half of SSP: which state to send, when, and relative to what.

mosh's ``TransportSender`` (``src/network/transportsender-impl.h``,
ssp-mosh.md section 7), pure and driven by ``now`` (float seconds). It keeps
the states it sent: the front is the newest one the peer acknowledged, the
back the last one sent, and the "assumed receiver state" the newest one sent
recently enough that it has probably arrived. Every instruction is a diff
from the assumed state (or from the front, when that is about as short), so
loss costs nothing but a retransmission of the current state.

States are immutable, so the list shares them with the application and the
receiver; it is one flat list (time, num, state, time, num, state, ...) so
that an idle session holds one small list and no tuples. Equal states are
kept as one object (``set_current_state`` swaps in the kept copy of an
equal state, ``_rationalize`` subtracts each object once and, when an ack
makes a state equal to the current one the front, swaps that in), so the
timers compare states by identity, not with a costly ``==`` several times
per datagram; a miss would only cost one empty ack.
"""

import dataclasses
import functools
import math

from broker.ssp.instruction import PROTOCOL_VERSION, UINT64_MAX, Instruction

__all__ = ["Sender", "NEVER", "make_chaff", "CHAFF_MAX"]

#: A timer that is not set.
NEVER = math.inf
_NOT_HEARD = -math.inf  # module constants: shared, not a float per session
CHAFF_MAX = 16  # transportsender-impl.h make_chaff: CHAFF_MAX = 16
# attempt_prospective_resend_optimization: resend from the acknowledged
# state if the diff is no longer, or under 1000 bytes and < 100 bytes longer.
PROSPECTIVE_RESEND_LIMIT = 1000
PROSPECTIVE_RESEND_SLACK = 100

_TIME, _NUM, _STATE, _STRIDE = 0, 1, 2, 3
# Doublings counted at most: past any ceiling (2**16 times the 50 ms least
# RTO is almost an hour), however long the peer stays silent.
_BACKOFF_STEPS = 16
_new_instruction = tuple.__new__


def make_chaff(random_bytes) -> bytes:
    """0..16 random bytes that hide the instruction's true length.

    One call for the length and the bytes (a call may be a system call).
    """
    data = random_bytes(CHAFF_MAX + 1)
    return data[1:1 + data[0] % (CHAFF_MAX + 1)]


@functools.cache
def _without_heartbeat(profile):
    """``profile`` with an infinite heartbeat, one shared copy per profile
    (so a sender needs no extra slot to know it only answers)."""
    return dataclasses.replace(profile, ack_interval=NEVER)


class Sender:
    """Sent states, acknowledgements and the two send timers of one session.

    ``heartbeats`` False makes the sender only answer: no empty ack every
    ``ack_interval`` (a fleet broker keeps no timer for an idle device).
    ``first_num`` is the lowest number a new state may get (resuming above
    numbers the peer may still hold from before a restart). ``num`` is the
    number of ``state``, the acknowledged front.
    """

    __slots__ = ("_profile", "_sent", "current", "ack_num",
                 "last_heard", "_next_ack_time", "_next_send_time",
                 "_mindelay_clock", "_first_num", "_shutdown", "_backoff")

    def __init__(self, state, now: float, profile, *, heartbeats: bool = True,
                 num: int = 0, first_num: int = 1, due: bool = True) -> None:
        self._profile = profile if heartbeats else _without_heartbeat(profile)
        self._sent = [now, num, state]
        self.current = state
        self.ack_num = 0  # newest remote state received in order
        self.last_heard = _NOT_HEARD  # when a new remote state last arrived
        # mosh: both timers start at "now", so the first tick sends at once
        # (not so for a session rebuilt from its parked form: due=False).
        self._next_ack_time = now if due else NEVER
        self._next_send_time = now if due else NEVER
        self._mindelay_clock = None  # first unsent change to current
        self._first_num = first_num
        self._shutdown = None  # [start time, instructions sent] once begun
        self._backoff = 0  # retransmissions since the front last moved

    # -- what the session reads ------------------------------------------

    @property
    def profile(self):
        """The timing profile (with an infinite heartbeat if answering)."""
        return self._profile

    @property
    def front_num(self) -> int:
        """Number of the newest state the peer acknowledged."""
        return self._sent[_NUM]

    @property
    def front_state(self):
        """The newest state the peer acknowledged."""
        return self._sent[_STATE]

    @property
    def front_time(self) -> float:
        """When the acknowledged state was (last) sent."""
        return self._sent[_TIME]

    @property
    def back_num(self) -> int:
        """Number of the last state sent."""
        return self._sent[-_STRIDE + _NUM]

    @property
    def sent_nums(self) -> list:
        """Numbers of the kept sent states, front first (tests and logs)."""
        return self._sent[_NUM::_STRIDE]

    @property
    def sent_count(self) -> int:
        """How many sent states are kept (1: everything is acknowledged)."""
        return len(self._sent) // _STRIDE

    @property
    def shutdown_in_progress(self) -> bool:
        return self._shutdown is not None

    @property
    def shutdown_acknowledged(self) -> bool:
        """The peer acknowledged our shutdown state (UINT64_MAX)."""
        return self._sent[_NUM] == UINT64_MAX

    def shutdown_timed_out(self, now: float) -> bool:
        """Our shutdown went unacknowledged for too many tries or too long."""
        shutdown = self._shutdown
        if shutdown is None:
            return False
        start, tries = shutdown
        return (tries >= self._profile.shutdown_retries
                or now - start >= self._profile.shutdown_timeout)

    @property
    def idle(self) -> bool:
        """Everything sent is acknowledged and nothing new is waiting."""
        sent = self._sent
        return len(sent) == _STRIDE and self.current is sent[_STATE]

    # -- inputs ------------------------------------------------------------

    def set_current_state(self, state, now: float | None = None) -> None:
        """The application's live state (sent at the next due tick)."""
        sent = self._sent
        state = state.subtract(sent[_STATE])
        current, back, front = self.current, sent[-1], sent[_STATE]
        # One object per value, so the timers compare by identity. (Often
        # two of the three are one object: compare each once.)
        if state is current or state == current:
            state = current
        elif back is not current and (state is back or state == back):
            state = back
        elif (front is not current and front is not back
              and (state is front or state == front)):
            state = front
        self.current = state
        if (now is not None and self._mindelay_clock is None
                and state is not sent[-1]):
            self._mindelay_clock = now

    def set_data_ack(self, now: float) -> None:
        """Send an ack within ACK_DELAY (a new state with data arrived)."""
        due = now + self._profile.ack_delay
        if due < self._next_ack_time:
            self._next_ack_time = due

    def remote_heard(self, now: float) -> None:
        """A new remote state arrived (enables fast retransmission)."""
        self.last_heard = now

    def start_shutdown(self, now: float) -> None:
        """From now on every instruction carries new_num UINT64_MAX."""
        if self._shutdown is None:
            self._shutdown = [now, 0]

    def process_acknowledgment_through(self, ack_num: int) -> bool:
        """Forget the states before ``ack_num``; True if the front moved.

        An ack for a state no longer kept (erased from the middle by the
        cap) is ignored, as in mosh.
        """
        sent = self._sent
        if ack_num == sent[_NUM]:
            return False  # the usual case: nothing new acknowledged
        for index in range(_STRIDE + _NUM, len(sent), _STRIDE):
            if sent[index] == ack_num:
                break
        else:
            return False
        # Numbers only grow along the list, so "every state below ack_num"
        # is the prefix before its first match. (Lists are rebuilt at their
        # exact size rather than resized: an idle session keeps them.)
        self._sent = sent[index - _NUM:]
        self._backoff = 0
        self._rationalize()
        return True

    def _rationalize(self) -> None:
        """Forget in every kept state what the acknowledged one holds."""
        sent = self._sent
        front = sent[_STATE]
        if len(sent) == _STRIDE:
            # Everything sent is acknowledged (the usual case).
            result = sent[_STATE] = front.subtract(front)
            current = self.current
            self.current = (result if current is front
                            else current.subtract(front))
            return
        done = {}  # id -> subtracted: equal states stay one object
        for index in range(_STATE, len(sent), _STRIDE):
            state = sent[index]
            result = done.get(id(state))
            if result is None:
                result = done[id(state)] = state.subtract(front)
            sent[index] = result
        current = self.current
        result = done.get(id(current))
        current = self.current = (result if result is not None
                                  else current.subtract(front))
        # The new front may equal the current state (or the last one sent)
        # as another object: the application went back to it after it was
        # sent. mosh compares by value and rests; with identity the timers
        # would resend an empty diff every RTO + ACK_DELAY until the next
        # ack. Only the front is compared: set_current_state keeps current
        # and the back one object when equal, and the back is sent current.
        front = sent[_STATE]
        if current is not front and current == front:
            if sent[-1] is current:
                sent[-1] = front
            self.current = front

    # -- timers ------------------------------------------------------------

    def send_interval(self, srtt: float) -> float:
        """Two frames per RTT: ceil(SRTT/2) ms, clamped to [20, 250] ms."""
        interval = math.ceil(srtt * 500) / 1000
        profile = self._profile
        # A clamp without min()/max() calls (this runs per datagram).
        if interval < profile.send_interval_min:
            return profile.send_interval_min
        if interval > profile.send_interval_max:
            return profile.send_interval_max
        return interval

    def retransmit_timeout(self, rtt) -> float:
        """The RTO, doubled for each retransmission since the peer last
        acknowledged a new state, up to the profile's ``backoff_max``."""
        rto = rtt.rto
        backoff = self._backoff
        if backoff:
            grown = rto * (1 << backoff)
            ceiling = self._profile.backoff_max
            if grown < ceiling:
                return grown
            return rto if rto > ceiling else ceiling
        return rto

    def _assumed_index(self, now: float, rto: float) -> int:
        """Index of the state the peer probably has (mosh's walk from the
        front, trusting states sent less than RTO + ACK_DELAY ago).

        Unlike mosh, an old unacknowledged empty ack (the same state as the
        one before it) does not end the walk: nothing sent later needs it,
        and a peer that acks only states with data (a device answered by a
        broker) never acks it, so mosh would resend every later state at
        the frame rate until acked. If it was lost after all, a diff from
        it is refused and resent from the front once its successor is old.

        With the backoff, a state is recent until ``sent + limit`` exactly,
        the time the retransmission timer is set to (``now - sent < limit``
        can still hold at that time, by rounding: the timer would find
        nothing to resend and send an empty ack from the lost state).
        """
        sent = self._sent
        profile = self._profile
        limit = rto + profile.ack_delay
        assumed = 0
        if profile.retransmit_backoff:
            for index in range(_STRIDE, len(sent), _STRIDE):
                if now < sent[index] + limit:
                    assumed = index
                elif sent[index + _STATE] is not sent[index - _STRIDE + _STATE]:
                    break
            return assumed
        for index in range(_STRIDE, len(sent), _STRIDE):
            if now - sent[index] < limit:
                assumed = index
            elif sent[index + _STATE] is not sent[index - _STRIDE + _STATE]:
                break
        return assumed

    def calculate_timers(self, now: float, rtt) -> None:
        """mosh's ``calculate_timers``: set the ack and send deadlines.

        ``rtt`` gives ``srtt`` and ``rto`` in seconds (an RTTEstimator);
        they are read only when a branch needs them (this runs for every
        datagram in and out).
        """
        profile = self._profile
        sent = self._sent
        current = self.current
        back_time = sent[-_STRIDE + _TIME]
        if current is not sent[-1]:
            clock = self._mindelay_clock
            if clock is None:
                clock = self._mindelay_clock = now
            # (max()'s choice without its call: the first of equal times.)
            earliest = clock + profile.send_mindelay
            paced = back_time + self.send_interval(rtt.srtt)
            self._next_send_time = paced if paced > earliest else earliest
        elif (current is sent[_STATE]
              # mosh's form of the test (last_heard + ACTIVE_RETRY_TIMEOUT
              # > now), so a time on the boundary goes the same way.
              or not self.last_heard + profile.active_retry_timeout > now):
            # Everything acknowledged, or the peer is silent: only the
            # heartbeat resends (mosh's last two branches).
            self._next_send_time = NEVER
        else:
            rto = self.retransmit_timeout(rtt)
            if current is not sent[self._assumed_index(now, rto) + _STATE]:
                send_time = back_time + self.send_interval(rtt.srtt)
                if profile.retransmit_backoff:
                    # The current state is the one last sent, and the peer
                    # probably lacks a state before it. mosh resends it at
                    # the frame rate, also when it went out just now (as a
                    # diff from the acknowledged state: an old state in
                    # between ends the walk for good), for as long as the
                    # peer is heard: 4 a second into a broker that is
                    # behind. Backing off, it waits its (grown) RTO too.
                    send_time = max(send_time,
                                    back_time + (rto + profile.ack_delay))
                if self._mindelay_clock is not None:
                    send_time = max(send_time, self._mindelay_clock
                                    + profile.send_mindelay)
                self._next_send_time = send_time
            elif profile.retransmit_backoff:
                self._next_send_time = back_time + (rto + profile.ack_delay)
            else:
                self._next_send_time = back_time + rto + profile.ack_delay
        if self._shutdown is not None or self.ack_num == UINT64_MAX:
            # Speed up the shutdown handshake.
            self._next_ack_time = back_time + self.send_interval(rtt.srtt)

    def acknowledge(self, num: int, rtt) -> None:
        """Acknowledge the peer's state ``num`` from now on (held acks,
        outside a receive, which recalculates every timer). Call after
        ``set_data_ack``: like calculate_timers, the shutdown handshake
        (ours, or the peer's once acknowledged) overrides the ack delay."""
        self.ack_num = num
        if self._shutdown is not None or num == UINT64_MAX:
            self._next_ack_time = (self._sent[-_STRIDE + _TIME]
                                   + self.send_interval(rtt.srtt))

    def next_wakeup(self) -> float | None:
        """The earlier timer from the last calculation, None if neither."""
        # (min()'s choice without its call: the first of equal times.)
        wakeup = self._next_ack_time
        send = self._next_send_time
        if send < wakeup:
            wakeup = send
        return None if wakeup == NEVER else wakeup

    # -- sending -----------------------------------------------------------

    def tick(self, now: float, rtt, random_bytes) -> Instruction | None:
        """The instruction to send now, or None (mosh's ``tick``).

        The caller must have a peer address; it fragments and sends the
        instruction (or drops it, which the protocol treats as loss).
        """
        self.calculate_timers(now, rtt)
        if now < self._next_ack_time and now < self._next_send_time:
            return None
        sent = self._sent
        current = self.current
        assumed = (self._assumed_index(now, self.retransmit_timeout(rtt))
                   if len(sent) > _STRIDE else 0)
        if assumed == 0:
            diff = current.diff_from(sent[_STATE])
        else:
            # Prospective resend: a diff from the acknowledged state is
            # safe even if the assumed one was lost. One shorter than the
            # slack wins whatever the other's length, so the diff from the
            # assumed state is built only when it could win.
            resend = current.diff_from(sent[_STATE])
            if len(resend) < PROSPECTIVE_RESEND_SLACK:
                assumed = 0
                diff = resend
            else:
                diff = current.diff_from(sent[assumed + _STATE])
                if (len(resend) <= len(diff)
                        or (len(resend) < PROSPECTIVE_RESEND_LIMIT
                            and len(resend) - len(diff)
                            < PROSPECTIVE_RESEND_SLACK)):
                    assumed = 0
                    diff = resend
        self._mindelay_clock = None
        old_num = sent[assumed + _NUM]
        if not diff:
            # mosh sends an empty ack only when the ack timer is due. If
            # the send timer fired with nothing to say, mosh would fire it
            # again every send interval until its 3 s heartbeat; a sender
            # without heartbeats would never stop, so we ack now instead.
            return self._send(now, old_num, self._next_num(), diff,
                              random_bytes, empty=True, state=current)
        if self._shutdown is not None:
            new_num = UINT64_MAX
        elif current is sent[-1]:
            new_num = sent[-_STRIDE + _NUM]  # retransmission
        else:
            new_num = self._next_num()
        return self._send(now, old_num, new_num, diff, random_bytes,
                          empty=False, state=current)

    def _next_num(self) -> int:
        if self._shutdown is not None:
            return UINT64_MAX
        return max(self._sent[-_STRIDE + _NUM] + 1, self._first_num)

    def _send(self, now, old_num, new_num, diff, random_bytes,
              empty, state=None) -> Instruction:
        sent = self._sent
        if new_num == UINT64_MAX and self._shutdown is not None:
            self._shutdown[1] += 1
        if not empty and new_num == sent[-_STRIDE + _NUM]:
            sent[-_STRIDE + _TIME] = now  # retransmission: only the time
            if (self._backoff < _BACKOFF_STEPS
                    and self._profile.retransmit_backoff):
                self._backoff += 1
        else:
            # the state the diff was made for (code run inside diff_from
            # may have set a newer self.current)
            self._add_sent_state(now, new_num, state)
        interval = self._profile.ack_interval
        self._next_ack_time = NEVER if interval == NEVER else now + interval
        self._next_send_time = NEVER
        # Built from a tuple in field order: a NamedTuple's keyword
        # constructor costs several times more (this runs per datagram).
        return _new_instruction(Instruction, (
            PROTOCOL_VERSION, old_num, new_num, self.ack_num,
            self._sent[_NUM], diff, make_chaff(random_bytes)))

    def probe(self, now: float, ask: bytes, went_out: int = 0) -> Instruction | None:
        """A path challenge: a state the peer may hold, under a new number, with no
        chaff, and ``ask`` (a state's ACK_REQUEST_DIFF) as the diff when it needs
        none, so that the peer acknowledges it at once.  Its acknowledgement
        proves the peer received a datagram we sent now.

        The state is the first sent one numbered ``went_out`` or above (the
        newest state the owner let go out; 0: none, the acknowledged one), as a
        diff from the acknowledged one: never older than a state the peer may
        hold, so a probe cannot take the peer back (its events would come
        again), and small as long as what went out was.  None during a shutdown
        (its numbers are spoken for)."""
        if self._shutdown is not None:
            return None
        sent = self._sent
        front = sent[_STATE]
        state = front
        if went_out > sent[_NUM]:
            for index in range(_STRIDE, len(sent), _STRIDE):
                if sent[index + _NUM] >= went_out:
                    state = sent[index + _STATE]
                    break
        diff = state.diff_from(front) if state is not front else b""
        num = self._next_num()
        self._add_sent_state(now, num, state)
        return _new_instruction(Instruction, (
            PROTOCOL_VERSION, sent[_NUM], num, self.ack_num, sent[_NUM],
            diff or ask, b""))

    def _add_sent_state(self, now: float, num: int, state=None) -> None:
        sent = self._sent + [now, num, self.current if state is None else state]
        cap = self._profile.sent_states_cap
        if len(sent) > cap * _STRIDE:
            # Limit on the state queue: erase one from the middle (the
            # 16th from the end), keeping the front and the newest ones.
            start = len(sent) - (cap // 2) * _STRIDE
            del sent[start:start + _STRIDE]
        self._sent = sent
