"""Tests for broker.ssp.sender: mosh's TransportSender rules, time explicit."""

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.device_state import DeviceState
from broker.ssp.instruction import UINT64_MAX
from broker.ssp.profile import MOSH
from broker.ssp.sender import CHAFF_MAX, NEVER, Sender, make_chaff

from tests.ssp.linksim import TextState, seeded_random_bytes

T0 = 1000.0
SRTT = 0.1  # send interval ceil(SRTT/2) = 50 ms
RTO = 0.2  # a state counts as received for RTO + ACK_DELAY = 0.3 s
INTERVAL = 0.05


class FixedRTT:
    """What the sender reads of an RTTEstimator, fixed."""

    srtt = SRTT
    rto = RTO


RTT = FixedRTT()


class SizedState:
    """A test-only state whose diff from each ancestor (an object) has a
    chosen length, so the choice between two diffs shows."""

    __slots__ = ("sizes",)

    def __init__(self, sizes=None):
        self.sizes = sizes or {}

    @classmethod
    def empty(cls):
        return _EMPTY_SIZED

    def diff_from(self, existing):
        return b"" if existing is self else b"d" * self.sizes[existing]

    def subtract(self, prefix):
        return self

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__


_EMPTY_SIZED = SizedState()


class SenderTests(SynchronousTestCase):
    """The sending half of SSP, driven with explicit times."""

    def setUp(self):
        self.random_bytes = seeded_random_bytes(1)

    def sender(self, state=None, **kwargs):
        return Sender(state if state is not None else TextState.empty(), T0,
                      MOSH, **kwargs)

    def tick(self, sender, now):
        return sender.tick(now, RTT, self.random_bytes)

    def send_state(self, sender, text, now):
        """Set a new current state and tick once its send timer is due."""
        sender.set_current_state(TextState(text), now)
        sender.calculate_timers(now, RTT)
        due = sender.next_wakeup()
        inst = self.tick(sender, max(now, due))
        self.assertIsNotNone(inst)
        return inst, max(now, due)

    def test_first_tick_sends_empty_ack_at_once(self):
        """Both timers start at creation, so the first tick sends an empty
        ack [0=>1] right away, as mosh's first datagram does."""
        sender = self.sender()
        inst = self.tick(sender, T0)
        self.assertEqual(
            (inst.old_num, inst.new_num, inst.ack_num, inst.throwaway_num,
             inst.diff, inst.protocol_version), (0, 1, 0, 0, b"", 2))

    def test_heartbeat_after_ack_interval(self):
        """After a send the next empty ack is due ACK_INTERVAL (3 s) later,
        and it consumes a new state number."""
        sender = self.sender()
        self.tick(sender, T0)
        sender.calculate_timers(T0, RTT)
        self.assertEqual(sender.next_wakeup(), T0 + MOSH.ack_interval)
        self.assertIsNone(self.tick(sender, T0 + 2.9))
        inst = self.tick(sender, T0 + 3.0)
        self.assertEqual((inst.old_num, inst.new_num, inst.diff), (0, 2, b""))

    def test_no_heartbeats_when_only_answering(self):
        """With heartbeats off the sender has no timer once all is sent."""
        sender = self.sender(heartbeats=False)
        self.tick(sender, T0)
        sender.calculate_timers(T0 + 1, RTT)
        self.assertIsNone(sender.next_wakeup())

    def test_new_state_waits_for_mindelay_and_send_interval(self):
        """A change is sent at max(first change + SEND_MINDELAY, last send +
        send interval)."""
        sender = self.sender()
        self.tick(sender, T0)
        sender.set_current_state(TextState("a"), T0 + 0.01)
        sender.calculate_timers(T0 + 0.01, RTT)
        self.assertAlmostEqual(sender.next_wakeup(), T0 + INTERVAL)
        sender.set_current_state(TextState("b"), T0 + 0.049)
        sender.calculate_timers(T0 + 0.049, RTT)
        # The mindelay clock started at the first change, 0.01.
        self.assertAlmostEqual(sender.next_wakeup(), T0 + INTERVAL)
        inst = self.tick(sender, T0 + INTERVAL)
        # The diff from the front is as short: prospective resend, old 0.
        self.assertEqual((inst.old_num, inst.new_num, inst.diff),
                         (0, 2, b"=b"))

    def test_send_interval_from_srtt(self):
        """The send interval is ceil(SRTT/2) ms clamped to [20, 250] ms."""
        sender = self.sender()
        self.assertEqual(sender.send_interval(1.0), 0.25)
        self.assertEqual(sender.send_interval(0.2), 0.1)
        self.assertEqual(sender.send_interval(0.0051), 0.02)
        self.assertEqual(sender.send_interval(0.0999), 0.05)

    def test_retransmission_keeps_the_number(self):
        """An unacknowledged state is resent with the same number once
        RTO + ACK_DELAY passed and the peer was heard recently."""
        sender = self.sender()
        sender.remote_heard(T0)
        first, sent_at = self.send_state(sender, "a", T0)
        self.assertEqual((first.old_num, first.new_num), (0, 1))
        sender.calculate_timers(sent_at, RTT)
        self.assertAlmostEqual(sender.next_wakeup(), sent_at + RTO + 0.1)
        again = self.tick(sender, sent_at + RTO + 0.1)
        self.assertEqual((again.old_num, again.new_num, again.diff),
                         (0, 1, b"=a"))
        self.assertEqual(sender.sent_nums, [0, 1])

    def test_no_fast_retransmission_after_active_retry_timeout(self):
        """When the peer was not heard for ACTIVE_RETRY_TIMEOUT only the
        3 s heartbeat resends the state."""
        sender = self.sender()
        inst, sent_at = self.send_state(sender, "a", T0)
        self.assertEqual(inst.new_num, 1)
        self.assertIsNone(self.tick(sender, sent_at + 1.0))
        sender.calculate_timers(sent_at + 1.0, RTT)
        self.assertAlmostEqual(sender.next_wakeup(),
                               sent_at + MOSH.ack_interval)
        again = self.tick(sender, sent_at + MOSH.ack_interval)
        self.assertEqual((again.new_num, again.diff), (1, b"=a"))

    def test_acknowledgment_prunes_and_ignores_unknown(self):
        """An ack erases every older sent state; an ack for a state no
        longer kept changes nothing."""
        sender = self.sender()
        now = T0
        for text in "abc":
            _, now = self.send_state(sender, text, now + 1)
        self.assertEqual(sender.sent_nums, [0, 1, 2, 3])
        self.assertFalse(sender.process_acknowledgment_through(7))
        self.assertEqual(sender.sent_nums, [0, 1, 2, 3])
        self.assertTrue(sender.process_acknowledgment_through(2))
        self.assertEqual(sender.sent_nums, [2, 3])
        self.assertEqual(sender.front_num, 2)
        self.assertEqual(sender.front_state, TextState("b"))
        self.assertFalse(sender.process_acknowledgment_through(2))

    def test_throwaway_is_the_front(self):
        """Every instruction tells the peer it may forget states below the
        newest one we know it has (throwaway_num = front)."""
        sender = self.sender()
        _, now = self.send_state(sender, "a", T0)
        sender.process_acknowledgment_through(1)
        inst, _ = self.send_state(sender, "b", now + 1)
        self.assertEqual((inst.old_num, inst.new_num, inst.throwaway_num),
                         (1, 2, 1))

    def test_sent_states_cap_erases_sixteenth_from_end(self):
        """Beyond 32 kept states the one 16th from the end is erased, and an
        ack for it is then ignored."""
        sender = self.sender()
        model = [0]
        now = T0
        for n in range(1, 41):
            inst, now = self.send_state(sender, f"s{n}", now + 1)
            self.assertEqual(inst.new_num, n)
            model.append(n)
            if len(model) > 32:
                del model[len(model) - 16]
        self.assertEqual(sender.sent_nums, model)
        self.assertEqual(len(model), 32)
        erased = next(n for n in range(1, 41) if n not in model)
        self.assertFalse(sender.process_acknowledgment_through(erased))
        self.assertEqual(sender.front_num, 0)

    def test_data_ack_within_ack_delay(self):
        """set_data_ack brings the ack timer to now + ACK_DELAY and the ack
        carries the current ack_num."""
        sender = self.sender()
        self.tick(sender, T0)
        sender.ack_num = 5
        sender.set_data_ack(T0 + 1)
        sender.calculate_timers(T0 + 1, RTT)
        self.assertAlmostEqual(sender.next_wakeup(), T0 + 1.1)
        inst = self.tick(sender, T0 + 1.1)
        self.assertEqual((inst.new_num, inst.ack_num, inst.diff), (2, 5, b""))

    def test_prospective_resend_from_front_when_not_longer(self):
        """If the diff from the acknowledged state is no longer, the sender
        uses it (old_num = front) instead of the assumed state."""
        sender = self.sender()
        _, now = self.send_state(sender, "aaaa", T0)
        inst, _ = self.send_state(sender, "bbbb", now + 0.01)
        self.assertEqual((inst.old_num, inst.new_num, inst.diff),
                         (0, 2, b"=bbbb"))

    def test_prospective_resend_skipped_when_much_longer(self):
        """A diff from the front that is over 1000 bytes and longer is not
        used; the diff goes from the assumed state."""
        empty = DeviceState.empty()
        sender = Sender(empty, T0, MOSH)
        big = empty.with_values({"big": "x" * 2000})
        sender.set_current_state(big, T0)
        first = self.tick(sender, T0 + 0.008)
        self.assertEqual(first.new_num, 1)
        sender.set_current_state(big.with_values({"small": 1}), T0 + 0.06)
        second = self.tick(sender, T0 + 0.1)
        self.assertEqual((second.old_num, second.new_num), (1, 2))
        self.assertLess(len(second.diff), 100)

    def test_prospective_resend_boundaries(self):
        """The diff from the front is used when no longer than the one from
        the assumed state, or under 1000 bytes and under 100 bytes longer
        (mosh's rule), at each boundary of it."""
        cases = [(99, 1, 0), (100, 1, 0), (101, 1, 1), (150, 60, 0),
                 (160, 60, 1), (999, 900, 0), (1000, 950, 1),
                 (1000, 1000, 0), (2000, 1500, 1), (50, 200, 0)]
        for resend, assumed, old_num in cases:
            sender = Sender(SizedState.empty(), T0, MOSH)
            first = SizedState({SizedState.empty(): 5})
            sender.set_current_state(first, T0)
            self.assertEqual(self.tick(sender, T0).new_num, 1)
            second = SizedState({SizedState.empty(): resend,
                                 first: assumed})
            sender.set_current_state(second, T0 + 0.06)
            inst = self.tick(sender, T0 + 0.1)
            self.assertEqual((inst.old_num, inst.new_num, len(inst.diff)),
                             (old_num, 2, assumed if old_num else resend),
                             (resend, assumed))

    def test_stale_empty_ack_does_not_force_fast_resends(self):
        """An old, never acknowledged empty ack (an answer the peer does not
        ack) does not stop the walk: a new state sent after it is assumed
        received for RTO + ACK_DELAY instead of resent every interval."""
        sender = self.sender(heartbeats=False)
        sender.remote_heard(T0)
        self.tick(sender, T0)
        sender.process_acknowledgment_through(1)
        sender.set_data_ack(T0 + 1)
        answer = self.tick(sender, T0 + 1.1)  # the empty answer, state 2
        self.assertEqual((answer.new_num, answer.diff), (2, b""))
        sender.remote_heard(T0 + 5)
        inst, sent_at = self.send_state(sender, "b", T0 + 5)
        self.assertEqual((inst.old_num, inst.new_num), (1, 3))
        sender.calculate_timers(sent_at, RTT)
        self.assertAlmostEqual(sender.next_wakeup(), sent_at + RTO + 0.1)
        self.assertIsNone(self.tick(sender, sent_at + INTERVAL))

    def test_revert_to_acknowledged_state_sends_empty_ack(self):
        """Going back to the acknowledged state sends one empty ack (no
        spinning send timer) and then rests."""
        sender = self.sender(heartbeats=False)
        sender.remote_heard(T0)
        self.tick(sender, T0)
        sender.process_acknowledgment_through(1)
        inst, now = self.send_state(sender, "b", T0 + 1)
        self.assertEqual(inst.new_num, 2)
        sender.set_current_state(TextState(""), now + 0.01)
        sender.calculate_timers(now + 0.01, RTT)
        due = sender.next_wakeup()
        back = self.tick(sender, due)
        self.assertEqual((back.old_num, back.new_num, back.diff), (1, 3, b""))
        sender.calculate_timers(due, RTT)
        self.assertIsNone(sender.next_wakeup())

    def test_acknowledged_state_equal_to_current_rests(self):
        """When an ack makes the front a state equal to the current one
        (another object: the application went back to it), the sender rests
        as mosh does (it compares by value), whether or not the current
        state was sent again: no resend every RTO + ACK_DELAY."""
        for resent in (False, True):
            sender = self.sender(heartbeats=False)
            sender.remote_heard(T0)
            self.tick(sender, T0)
            sender.process_acknowledgment_through(1)
            inst, now = self.send_state(sender, "a", T0 + 1)
            self.assertEqual(inst.new_num, 2)
            inst, now = self.send_state(sender, "", now + 0.1)
            self.assertEqual(inst.new_num, 3)
            sender.set_current_state(TextState("a"), now + 0.1)
            now += 0.1
            if resent:
                inst, now = self.send_state(sender, "a", now)
                self.assertEqual((inst.new_num, inst.diff), (4, b"=a"))
            sender.process_acknowledgment_through(2)  # "a" (2) arrived
            sender.calculate_timers(now, RTT)
            if not resent:
                # Nothing new for the peer: one empty ack, as mosh's first
                # tick would (sender.py tick), then rest.
                due = sender.next_wakeup()
                inst = self.tick(sender, due)
                self.assertEqual((inst.old_num, inst.new_num, inst.diff),
                                 (2, 4, b""))
                now = due
                sender.calculate_timers(now, RTT)
            self.assertIsNone(sender.next_wakeup(), resent)
            self.assertIsNone(self.tick(sender, now + RTO + 0.1))

    def test_shutdown_numbers_and_timeout_after_retries(self):
        """During shutdown every instruction has new_num UINT64_MAX, sent
        every send interval, and the shutdown times out after 16 tries."""
        sender = self.sender()
        self.tick(sender, T0)
        sender.start_shutdown(T0 + 1)
        now = T0 + 1
        for _ in range(MOSH.shutdown_retries):
            self.assertFalse(sender.shutdown_timed_out(now))
            sender.calculate_timers(now, RTT)
            now = max(now, sender.next_wakeup())
            inst = self.tick(sender, now)
            self.assertEqual(inst.new_num, UINT64_MAX)
        self.assertTrue(sender.shutdown_timed_out(now))
        self.assertLess(now - (T0 + 1), 2.0)

    def test_shutdown_times_out_after_ten_seconds(self):
        """Without enough sends the shutdown still times out after 10 s."""
        sender = self.sender()
        sender.start_shutdown(T0)
        self.assertFalse(sender.shutdown_timed_out(T0 + 9.99))
        self.assertTrue(sender.shutdown_timed_out(T0 + 10))

    def test_shutdown_acknowledged(self):
        """The shutdown is acknowledged once the peer acks UINT64_MAX."""
        sender = self.sender()
        sender.start_shutdown(T0)
        # Shutdown paces acks at the send interval from the last send.
        self.assertIsNone(self.tick(sender, T0))
        inst = self.tick(sender, T0 + INTERVAL)
        self.assertEqual(inst.new_num, UINT64_MAX)
        self.assertFalse(sender.shutdown_acknowledged)
        self.assertTrue(sender.process_acknowledgment_through(UINT64_MAX))
        self.assertTrue(sender.shutdown_acknowledged)

    def test_first_num_floor(self):
        """A resumed sender numbers new states from first_num on."""
        sender = self.sender(first_num=500)
        inst = self.tick(sender, T0)
        self.assertEqual((inst.old_num, inst.new_num), (0, 500))
        second, _ = self.send_state(sender, "a", T0 + 5)
        self.assertEqual(second.new_num, 501)

    def test_subtract_on_acknowledgment(self):
        """Acknowledged events are forgotten by every kept state."""
        empty = DeviceState.empty()
        sender = Sender(empty, T0, MOSH)
        sender.set_current_state(empty.with_events("a", "b"), T0)
        self.tick(sender, T0 + 0.01)
        sender.set_current_state(empty.with_events("a", "b", "c"), T0 + 1)
        self.tick(sender, T0 + 1.01)
        sender.process_acknowledgment_through(1)
        self.assertEqual(sender.current.event_base, 2)
        self.assertEqual(sender.current.events, ("c",))
        self.assertEqual(sender.front_state.events, ())

    def test_idle(self):
        """A sender is idle once everything it sent is acknowledged."""
        sender = self.sender()
        self.tick(sender, T0)
        self.assertFalse(sender.idle)
        sender.process_acknowledgment_through(1)
        self.assertTrue(sender.idle)
        self.assertEqual(sender.sent_count, 1)

    def test_chaff_length(self):
        """Chaff is 0..16 random bytes, length = first random byte mod 17."""
        self.assertEqual(len(make_chaff(lambda n: bytes([33]) * n)), 16)
        self.assertEqual(make_chaff(lambda n: bytes([17]) * n), b"")
        lengths = {len(make_chaff(lambda n, b=b: bytes([b]) * n))
                   for b in range(256)}
        self.assertEqual(lengths, set(range(CHAFF_MAX + 1)))

    def test_chaff_one_call(self):
        """Chaff costs one random_bytes call (it may be a system call), and
        its bytes follow the length byte."""
        calls = []

        def random_bytes(n):
            calls.append(n)
            return bytes([3]) + bytes(range(1, n))
        self.assertEqual(make_chaff(random_bytes), bytes([1, 2, 3]))
        self.assertEqual(calls, [CHAFF_MAX + 1])

    def test_never_is_infinite(self):
        """NEVER compares after every time."""
        self.assertGreater(NEVER, 1e300)
