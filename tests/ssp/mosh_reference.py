"""A literal model of mosh's transport, to check our session against.

``MoshTransport`` follows ``TransportSender`` (src/network/
transportsender-impl.h) and the receiving half of ``Transport::recv``
(src/network/networktransport-impl.h) statement by statement, with time in
float seconds and states as values compared with ``==``. It is written
for clarity, not speed, and keeps nothing of ours but the choices that
wire.md and the sender module make on purpose, each behind a switch:

* ``skip_stale_empty_acks`` (sender.py ``_assumed_index``): an old
  unacknowledged state equal to the one before it does not end the walk
  that finds the assumed receiver state;
* ``ack_when_nothing_to_send`` (sender.py ``tick``): a due send timer with
  an empty diff sends an empty ack, where mosh clears the timer (and
  would set it again at once);
* ``answering`` (wire.md section 6, profile ``answer_heartbeats``): every
  new state is acknowledged within ACK_DELAY, also one with an empty diff,
  and so is a resent acknowledged state or a diff from a state not held,
  if its datagram came in order (a replay gets no answer, wire.md 3);
* ``zero`` (wire.md section 4): ``old_num = 0`` always means the empty
  state;
* ``backoff`` (profile ``retransmit_backoff``): each retransmission of the
  newest state that an ack has not yet answered doubles the RTO, up to the
  profile's ``backoff_max`` (an ack that moves the front starts over); the
  current state, once sent, is resent no sooner than RTO + ACK_DELAY later
  also when the assumed receiver state is older than the front's successor
  (mosh: at the send interval); and a state counts as recent until exactly
  its send time + RTO + ACK_DELAY, the time the retransmission timer is set
  to;
* ``hold_acks`` (wire.md section 7, ``ack_requires_confirm``): a new state
  is acknowledged only once ``confirm`` says it is durable (a state equal
  to the newest, once everything before it is acknowledged, at once), and
  its delayed ack is then due ACK_DELAY after its arrival.

``tests/ssp/test_mosh_model.py`` runs it beside real sessions
(``Shadowed``) and requires the same datagrams at the same times.
"""

import math

from broker.ssp.instruction import UINT64_MAX

NEVER = math.inf


class MoshTransport:
    """mosh's sender and receiver of one side, driven with explicit time."""

    def __init__(self, local, remote, now, profile, *, heartbeats=True,
                 first_num=1, skip_stale_empty_acks=True,
                 ack_when_nothing_to_send=True, answering=False, zero=None,
                 hold_acks=False, backoff=False):
        self.profile = profile
        self.ack_interval = profile.ack_interval if heartbeats else NEVER
        # TransportSender constructor
        self.current = local
        self.sent = [[now, 0, local]]  # [timestamp, num, state]
        self.assumed = 0  # index into sent
        self.next_ack_time = now
        self.next_send_time = now
        self.shutdown_in_progress = False
        self.shutdown_tries = 0
        self.shutdown_start = None
        self.ack_num = 0
        self.pending_data_ack = False
        self.last_heard = -math.inf
        self.mindelay_clock = None
        self.first_num = first_num
        # Transport constructor
        self.received = [[0, remote]]  # [num, state]
        self.quench_until = -math.inf
        self.zero = zero
        self.skip_stale_empty_acks = skip_stale_empty_acks
        self.ack_when_nothing_to_send = ack_when_nothing_to_send
        self.answering = answering
        self.has_remote_addr = True
        self.hold_acks = hold_acks
        self.backoff = backoff
        self.retransmissions = 0  # since the front last moved
        self.held = []  # [num, arrival] of held states that want an ack
        self.changed_num = 0  # newest state that differs from the one before

    # -- TransportSender -------------------------------------------------

    def send_interval(self, srtt):
        interval = math.ceil(srtt * 1000 / 2) / 1000
        return min(max(interval, self.profile.send_interval_min),
                   self.profile.send_interval_max)

    def backed_off(self, rto):
        if not self.backoff:
            return rto
        return min(rto * 2 ** self.retransmissions,
                   max(rto, self.profile.backoff_max))

    def _recent(self, sent_at, now, limit):
        """mosh: ``now - sent < limit``; with the backoff, compared as the timer
        is set (``sent + limit``), so a timer that fires finds its state old."""
        if self.backoff:
            return now < sent_at + limit
        return now - sent_at < limit

    def update_assumed_receiver_state(self, now, rto):
        self.assumed = 0
        limit = rto + self.profile.ack_delay
        for index in range(1, len(self.sent)):
            if self._recent(self.sent[index][0], now, limit):
                self.assumed = index
            elif (self.skip_stale_empty_acks
                  and self.sent[index][2] == self.sent[index - 1][2]):
                continue
            else:
                return

    def calculate_timers(self, now, srtt, rto):
        profile = self.profile
        rto = self.backed_off(rto)
        self.update_assumed_receiver_state(now, rto)
        if (self.pending_data_ack
                and self.next_ack_time > now + profile.ack_delay):
            self.next_ack_time = now + profile.ack_delay
        back_time = self.sent[-1][0]
        heard = self.last_heard + profile.active_retry_timeout > now
        if not self.current == self.sent[-1][2]:
            if self.mindelay_clock is None:
                self.mindelay_clock = now
            self.next_send_time = max(
                self.mindelay_clock + profile.send_mindelay,
                back_time + self.send_interval(srtt))
        elif not self.current == self.sent[self.assumed][2] and heard:
            self.next_send_time = back_time + self.send_interval(srtt)
            if self.backoff:
                self.next_send_time = max(
                    self.next_send_time, back_time + (rto + profile.ack_delay))
            if self.mindelay_clock is not None:
                self.next_send_time = max(
                    self.next_send_time,
                    self.mindelay_clock + profile.send_mindelay)
        elif not self.current == self.sent[0][2] and heard:
            if self.backoff:
                self.next_send_time = back_time + (rto + profile.ack_delay)
            else:
                self.next_send_time = back_time + rto + profile.ack_delay
        else:
            self.next_send_time = NEVER
        if self.shutdown_in_progress or self.ack_num == UINT64_MAX:
            self.next_ack_time = back_time + self.send_interval(srtt)

    def wakeup(self):
        """wait_time() as an absolute time (None: never)."""
        if not self.has_remote_addr:
            return None
        wakeup = min(self.next_ack_time, self.next_send_time)
        return None if wakeup == NEVER else wakeup

    def tick(self, now, srtt, rto):
        """The instruction sent now, as (old, new, ack, throwaway, diff),
        or None."""
        self.calculate_timers(now, srtt, rto)
        if not self.has_remote_addr:
            return None
        if now < self.next_ack_time and now < self.next_send_time:
            return None
        diff = self.current.diff_from(self.sent[self.assumed][2])
        diff = self.attempt_prospective_resend_optimization(diff)
        if not diff:
            inst = None
            if now >= self.next_ack_time or self.ack_when_nothing_to_send:
                inst = self.send_empty_ack(now)
                self.mindelay_clock = None
            if now >= self.next_send_time:
                self.next_send_time = NEVER
                self.mindelay_clock = None
            return inst
        inst = self.send_to_receiver(now, diff)
        self.mindelay_clock = None
        return inst

    def _next_num(self):
        return max(self.sent[-1][1] + 1, self.first_num)

    def send_empty_ack(self, now):
        new_num = self._next_num()
        if self.shutdown_in_progress:
            new_num = UINT64_MAX
        self.add_sent_state(now, new_num, self.current)
        inst = self.send_in_fragments(b"", new_num)
        self.next_ack_time = now + self.ack_interval
        self.next_send_time = NEVER
        return inst

    def add_sent_state(self, now, num, state):
        self.sent.append([now, num, state])
        if len(self.sent) > 32:  # limit on state queue
            del self.sent[len(self.sent) - 16]

    def send_to_receiver(self, now, diff):
        if self.current == self.sent[-1][2]:
            new_num = self.sent[-1][1]
        else:
            new_num = self._next_num()
        if self.shutdown_in_progress:
            new_num = UINT64_MAX
        if new_num == self.sent[-1][1]:
            self.sent[-1][0] = now
            self.retransmissions += 1
        else:
            self.add_sent_state(now, new_num, self.current)
        inst = self.send_in_fragments(diff, new_num)
        self.assumed = len(self.sent) - 1
        self.next_ack_time = now + self.ack_interval
        self.next_send_time = NEVER
        return inst

    def send_in_fragments(self, diff, new_num):
        inst = (self.sent[self.assumed][1], new_num, self.ack_num,
                self.sent[0][1], diff)
        if new_num == UINT64_MAX:
            self.shutdown_tries += 1
        self.pending_data_ack = False
        return inst

    def process_acknowledgment_through(self, ack_num):
        if any(num == ack_num for _, num, _ in self.sent):
            if ack_num != self.sent[0][1]:
                self.retransmissions = 0
            self.sent = [entry for entry in self.sent if entry[1] >= ack_num]

    def shutdown_ack_timed_out(self, now):
        return self.shutdown_in_progress and (
            self.shutdown_tries >= self.profile.shutdown_retries
            or now - self.shutdown_start >= self.profile.shutdown_timeout)

    def start_shutdown(self, now):
        if not self.shutdown_in_progress:
            self.shutdown_start = now
            self.shutdown_in_progress = True

    def shutdown_acknowledged(self):
        return self.sent[0][1] == UINT64_MAX

    def attempt_prospective_resend_optimization(self, proposed):
        if self.assumed == 0:
            return proposed
        resend = self.current.diff_from(self.sent[0][2])
        if (len(resend) <= len(proposed)
                or (len(resend) < 1000
                    and len(resend) - len(proposed) < 100)):
            self.assumed = 0
            return resend
        return proposed

    def set_data_ack(self):
        self.pending_data_ack = True

    # -- Transport::recv -------------------------------------------------

    def recv(self, inst, now, in_order=True):
        """One complete instruction (old, new, ack, throwaway, diff);
        ``in_order``: its datagram's sequence number was the newest yet."""
        old_num, new_num, ack_num, throwaway_num, diff = inst
        self.process_acknowledgment_through(ack_num)
        reminding = self.answering and in_order
        for num, _ in self.received:
            if num == new_num:
                if reminding and new_num == self.ack_num:
                    self.set_data_ack()
                return
        reference = None
        for num, state in self.received:
            if num == old_num:
                reference = state
                break
        borrowed = False
        if reference is None and old_num == 0 and self.zero is not None:
            reference, borrowed = self.zero, True
        if reference is None:
            if reminding:
                self.set_data_ack()
            return
        if throwaway_num > self.received[-1][0] and not borrowed:
            return  # mosh aborts; we drop
        kept = [entry for entry in self.received if entry[0] >= throwaway_num]
        if len(kept) > self.profile.received_states_cap:
            if now < self.quench_until:
                return
            self.quench_until = now + self.profile.quench_time
        self.received = kept
        state = reference.apply(diff) if diff else reference
        for index, (num, _) in enumerate(self.received):
            if num > new_num:
                self.received.insert(index, [new_num, state])
                return
        unchanged = not diff and state == self.received[-1][1]
        self.received.append([new_num, state])
        self.last_heard = now
        wants_ack = diff or self.answering
        if not unchanged:
            self.changed_num = new_num
        if self.hold_acks and not (unchanged
                                   and self.ack_num >= self.changed_num):
            if wants_ack:
                self.held.append([new_num, now])
            return
        self.ack_num = new_num
        if wants_ack:
            self.set_data_ack()

    def confirm(self, num, now, srtt):
        """The owner made received state ``num`` durable (hold_acks)."""
        newest = self.received[-1][0]
        if num <= self.ack_num or num > newest:
            return
        acked = newest if num >= self.changed_num else num
        arrivals = [when for held, when in self.held if held <= acked]
        self.held = [entry for entry in self.held if entry[0] > acked]
        if arrivals:
            self.next_ack_time = min(self.next_ack_time,
                                     min(arrivals) + self.profile.ack_delay)
        self.ack_num = acked
        if self.shutdown_in_progress or acked == UINT64_MAX:
            self.next_ack_time = self.sent[-1][0] + self.send_interval(srtt)
