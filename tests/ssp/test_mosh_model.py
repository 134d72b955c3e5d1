"""Our sessions, run over a lossy link, against a literal model of mosh.

Every session of a simulated conversation is ``Shadowed`` by a
:class:`~tests.ssp.mosh_reference.MoshTransport` fed the same inputs (the
instructions it receives, the application's states, the time, the RTT our
datagram layer measured). Whenever the session sends, the model must send
the same instruction (old, new, ack and throwaway numbers, diff); after
every input both must want to wake at the same time. So every timer of
mosh's sender (send interval, SEND_MINDELAY, ACK_DELAY, the heartbeat, the
RTO + ACK_DELAY retransmission, ACTIVE_RETRY_TIMEOUT, shutdown pacing) and
every rule of its receiver is checked in whole conversations, not one by
one.
"""

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import events
from broker.ssp.crypto import CipherCache, open_sealed
from broker.ssp.datagram import RTTEstimator, decode_plaintext
from broker.ssp.fragment import Fragment
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.instruction import decode_instruction
from broker.ssp.profile import FLEET, MOSH
from broker.ssp.sender import Sender

from tests.ssp.linksim import (Link, TextState, broker_pair,
                               seeded_random_bytes)
from tests.ssp.mosh_reference import MoshTransport

_ciphers = CipherCache()


def instruction_of(session, data):
    """(old, new, ack, throwaway, diff) of one single-fragment datagram,
    and its sequence number."""
    if session.framing is not None:
        data = data[HEADER_SIZE:]
    _, seq, plaintext = open_sealed(_ciphers.get(session.key), data)
    _, _, payload = decode_plaintext(plaintext)
    fragment = Fragment.decode(payload)
    assert fragment.final and fragment.number == 0, fragment
    inst = decode_instruction(fragment.contents)
    return (inst.old_num, inst.new_num, inst.ack_num, inst.throwaway_num,
            inst.diff), seq


class Shadowed:
    """A session and its model, given the same inputs; every output and
    wake-up time compared (the four calls a Link makes, and
    set_local_state / start_shutdown for the script)."""

    def __init__(self, test, name, session, model, confirm=False,
                 confirm_lag=None):
        self.test = test
        self.confirm = confirm  # make every state durable on arrival
        # Or: confirm each state reported ``confirm_lag`` seconds after
        # it was (the owner's store), the model holding acks as well.
        self.confirm_lag = confirm_lag
        self.confirms = []  # (when, num)
        self.now = None
        self.name = name
        self.session = session
        self.model = model
        self.closed = False
        self.sends = 0
        # network.cc Connection: expected_receiver_seq, last_heard
        self.expected_seq = 0
        self.last_heard = None

    def _rtt(self):
        rtt = self.session.rtt
        return rtt.srtt, rtt.rto

    def _settle(self, now, what):
        """mosh recalculates its timers before every wait: compare them."""
        session, model = self.session, self.model
        if self.closed:
            self.test.assertTrue(session.closed, f"{self.name} {what}")
            self.test.assertIsNone(session.next_wakeup())
            return
        self.test.assertFalse(session.closed, f"{self.name} {what} at {now}")
        self.test.assertEqual(session.remote_address is not None,
                              model.has_remote_addr,
                              f"{self.name} attached after {what} at {now}")
        model.calculate_timers(now, *self._rtt())
        ours, theirs = session.next_wakeup(), model.wakeup()
        if ours is None or theirs is None:
            self.test.assertEqual(ours, theirs,
                                  f"{self.name} wake-up after {what} at {now}")
        else:
            # Both due already: the same (timers are recomputed when due).
            self.test.assertAlmostEqual(
                max(ours, now), max(theirs, now), delta=1e-9,
                msg=f"{self.name} wake-up after {what} at {now}: ours {ours},"
                    f" mosh {theirs}")

    def receive_datagram(self, data, address, now):
        inst, seq = instruction_of(self.session, data)
        session = self.session
        session.receive_datagram(data, address, now)
        if self.confirm and not session.closed:
            session.confirm_durable(session.latest_remote_num)
        if self.closed:
            return
        model = self.model
        in_order = seq >= self.expected_seq
        if in_order:  # Connection::recv_one
            self.expected_seq = seq + 1
            self.last_heard = now
            model.has_remote_addr = True
        model.recv(inst, now, in_order)
        if model.shutdown_in_progress and model.shutdown_acknowledged():
            self.closed = True
        self._settle(now, f"receiving {inst[:4]}")

    def _run_confirms(self, now):
        session, model = self.session, self.model
        while self.confirms and self.confirms[0][0] <= now:
            _, num = self.confirms.pop(0)
            session.confirm_durable(num)
            if not self.closed:
                model.confirm(num, now, self._rtt()[0])
                self._settle(now, f"confirming {num}")

    def datagrams_to_send(self, now):
        self.now = now
        self._run_confirms(now)
        session, model = self.session, self.model
        srtt, rto = self._rtt()
        if not self.closed and model.shutdown_ack_timed_out(now):
            self.closed = True
        out = session.datagrams_to_send(now)
        if self.closed:
            self.test.assertEqual(out, [], f"{self.name} closed at {now}")
            self._settle(now, "closing")
            return out
        expected = model.tick(now, srtt, rto)
        got = [instruction_of(session, data)[0] for data, _ in out]
        self.test.assertEqual(got, [] if expected is None else [expected],
                              f"{self.name} sends at {now}")
        self.sends += len(got)
        if expected is not None and expected[2] == 2**64 - 1:
            self.closed = True  # the peer's shutdown acknowledged: done
        elif (expected is not None and session.is_server
              and now - self.last_heard
              > model.profile.server_association_timeout):
            # Connection::send(), after sending: "Server now detached".
            model.has_remote_addr = False
        self._settle(now, "sending")
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)  # the rest, unchecked

    def next_wakeup(self):
        wakeup = self.session.next_wakeup()
        if self.confirms and not self.session.closed:
            when = self.confirms[0][0]
            return when if wakeup is None else min(wakeup, when)
        return wakeup

    def pop_events(self):
        found = self.session.pop_events()
        if self.confirm_lag is not None:
            for event in found:
                if isinstance(event, events.StateReceived):
                    self.confirms.append((self.now + self.confirm_lag,
                                          event.num))
        return found

    def set_local_state(self, state, now):
        self.session.set_local_state(state, now)
        if not self.closed:
            self.model.current = state
            self._settle(now, f"setting {state}")

    def start_shutdown(self, now):
        self.session.start_shutdown(now)
        if not self.closed:
            self.model.start_shutdown(now)
            self._settle(now, "starting the shutdown")


def shadowed_pair(test, profile, broker_framing, now, seed, hold_acks=False,
                  confirm_lag=None):
    """A device (client) and a broker (server) with TextState, each with its
    model; the broker has no address until the device is heard."""
    empty = TextState.empty()
    zero = empty if broker_framing else None
    device, broker = broker_pair(
        now, ciphers=_ciphers, profile=profile, seed=seed, empty=empty,
        broker_framing=broker_framing,
        ack_requires_confirm=hold_acks or confirm_lag is not None)
    device_model = MoshTransport(empty, empty, now, profile, zero=zero,
                                 backoff=profile.retransmit_backoff)
    broker_model = MoshTransport(
        empty, empty, now, profile, zero=zero,
        backoff=profile.retransmit_backoff,
        heartbeats=profile.broker_heartbeats,
        answering=profile.answer_heartbeats,
        hold_acks=confirm_lag is not None)
    broker_model.has_remote_addr = False
    return (Shadowed(test, "device", device, device_model),
            Shadowed(test, "broker", broker, broker_model, confirm=hold_acks,
                     confirm_lag=confirm_lag))


# The link: loss rate, duplication rate, one-way delay range (seconds).
_loss = st.sampled_from([0.0, 0.1, 0.4])
_duplicate = st.sampled_from([0.0, 0.2])
_delay = st.sampled_from([(0.001, 0.003), (0.02, 0.09), (0.05, 0.4)])
# (wait, on the device?, new text, then a blackout of that many seconds)
_steps = st.lists(
    st.tuples(st.floats(0.0, 4.0), st.booleans(),
              st.text("abc", max_size=3),
              st.sampled_from([0.0, 0.0, 0.0, 0.5, 4.0, 12.0])),
    min_size=1, max_size=12)


class MoshModelTests(SynchronousTestCase):
    """Whole conversations: every datagram and timer as mosh's would be."""

    def converse(self, *, profile, broker_framing, steps, seed, loss,
                 duplicate, delay, shutdown=None, hold_acks=False,
                 confirm_lag=None, tail=30.0):
        """Run ``steps`` between a shadowed device and broker, then the
        shutdown (True: the device's), then ``tail`` seconds. ``hold_acks``:
        the broker holds acks but each state is durable on arrival (so
        plain mosh is the model); ``confirm_lag``: each reported state is
        confirmed that long after it came (the model holds acks too)."""
        now = 10.0
        device, broker = shadowed_pair(self, profile, broker_framing, now,
                                       seed, hold_acks, confirm_lag)
        link = Link(device, broker, rng=random.Random(seed), loss=loss,
                    duplicate=duplicate, delay=delay)
        for wait, on_device, text, blackout in steps:
            now = link.run_until(now + wait, now)
            side = device if on_device else broker
            side.set_local_state(TextState(text), now)
            if blackout:
                # Nothing gets through: retransmissions, then after
                # ACTIVE_RETRY_TIMEOUT only heartbeats.
                link.loss, loss = 1.0, link.loss
                now = link.run_until(now + blackout, now)
                link.loss = loss
        if shutdown is not None:
            side = device if shutdown else broker
            side.start_shutdown(now)
        link.run_until(now + tail, now)
        return device, broker

    @settings(max_examples=60, deadline=None)
    @given(steps=_steps, seed=st.integers(0, 2**16),
           loss=_loss, duplicate=_duplicate, delay=_delay,
           broker_framing=st.booleans(),
           shutdown=st.sampled_from([None, True, False]),
           hold_acks=st.booleans())
    # Found by this test: an ack making the front equal (not identical) to
    # the current state; the peer's shutdown confirmed durable.
    @example(steps=[(0.0, False, "aa", 0.0), (1.0, False, "a", 0.0),
                    (0.125, False, "", 0.0), (0.125, False, "a", 0.0)],
             seed=0, loss=0.0, duplicate=0.0, delay=(0.02, 0.09),
             broker_framing=False, shutdown=None, hold_acks=False)
    @example(steps=[(0.0, True, "a", 0.0)], seed=0, loss=0.0, duplicate=0.0,
             delay=(0.001, 0.003), broker_framing=False, shutdown=True,
             hold_acks=True)
    @example(steps=[(0.0, True, "a", 0.0)], seed=0, loss=0.0, duplicate=0.0,
             delay=(0.001, 0.003), broker_framing=False, shutdown=False,
             hold_acks=True)
    # Found by this test: the server detaches after the send that finds
    # the client silent for SERVER_ASSOCIATION_TIMEOUT, not before it.
    @example(steps=[(0.0, False, "a", 0.0), (0.0625, False, "", 0.5),
                    (0.0, True, "a", 12.0), (0.0, False, "", 12.0),
                    (0.0, False, "", 12.0)],
             seed=14648, loss=0.4, duplicate=0.0, delay=(0.001, 0.003),
             broker_framing=False, shutdown=None, hold_acks=False)
    def test_mosh_profile_matches_mosh(self, steps, seed, loss, duplicate,
                                       delay, broker_framing, shutdown,
                                       hold_acks):
        """With mosh's profile both ends send what mosh would send, when it
        would send it, whatever the loss, duplication and reordering."""
        device, broker = self.converse(
            profile=MOSH, broker_framing=broker_framing, steps=steps,
            seed=seed, loss=loss, duplicate=duplicate, delay=delay,
            shutdown=shutdown, hold_acks=hold_acks)
        self.assertGreater(device.sends, 0)

    @settings(max_examples=60, deadline=None)
    @given(steps=_steps, seed=st.integers(0, 2**16),
           loss=_loss, duplicate=_duplicate, delay=_delay,
           hold_acks=st.booleans())
    # Found by this test: a resend due exactly ACTIVE_RETRY_TIMEOUT after
    # the peer was last heard (mosh does not send then).
    @example(steps=[(0.0, True, "a", 0.0), (0.0, False, "aa", 12.0),
                    (1.0094703943390808, False, "a", 0.5),
                    (0.0, True, "", 0.0)],
             seed=191, loss=0.4, duplicate=0.0, delay=(0.001, 0.003),
             hold_acks=False)
    def test_fleet_profile_matches_mosh_with_answers(self, steps, seed, loss,
                                                     duplicate, delay,
                                                     hold_acks):
        """With the fleet profile the broker only answers (wire.md 6) and
        otherwise both ends keep mosh's rules and timers."""
        device, broker = self.converse(
            profile=FLEET, broker_framing=True, steps=steps, seed=seed,
            loss=loss, duplicate=duplicate, delay=delay, hold_acks=hold_acks)
        self.assertGreater(device.sends, 0)

    @settings(max_examples=60, deadline=None)
    @given(steps=_steps, seed=st.integers(0, 2**16),
           loss=_loss, duplicate=_duplicate, delay=_delay,
           confirm_lag=st.sampled_from([0.0, 0.003, 0.05, 0.3, 1.0]),
           shutdown=st.sampled_from([None, True, False]),
           profile=st.sampled_from([MOSH, FLEET]),
           broker_framing=st.booleans())
    # Found by this test: a made-up arrival for a state number that never
    # came (or wanted no ack); a state equal to the newest, sent from an
    # older one, taken for a change.
    @example(steps=[(0.0, True, "a", 0.0), (1.0, True, "", 0.0)], seed=0,
             loss=0.0, duplicate=0.0, delay=(0.001, 0.003), confirm_lag=1.0,
             shutdown=None, profile=MOSH, broker_framing=False)
    @example(steps=[(0.0, False, "a", 0.0), (0.0, True, "a", 0.0),
                    (0.25, True, "", 0.5), (0.0, False, "", 0.0),
                    (0.0, True, "a", 0.0)],
             seed=0, loss=0.0, duplicate=0.0, delay=(0.001, 0.003),
             confirm_lag=0.3, shutdown=None, profile=MOSH,
             broker_framing=False)
    def test_held_acks_match_mosh_once_durable(self, steps, seed, loss,
                                               duplicate, delay, confirm_lag,
                                               shutdown, profile,
                                               broker_framing):
        """With acks held until the store confirms each reported state
        (wire.md 7), a state is acknowledged when it is durable, its ack
        due ACK_DELAY after it arrived, and otherwise mosh's rules hold."""
        device, broker = self.converse(
            profile=profile, broker_framing=broker_framing, steps=steps,
            seed=seed, loss=loss, duplicate=duplicate, delay=delay,
            confirm_lag=confirm_lag, shutdown=shutdown)
        self.assertGreater(device.sends, 0)


class _RTT:
    """What a sender reads of an RTT estimator, fixed."""

    def __init__(self, srtt, rto):
        self.srtt, self.rto = srtt, rto


_sender_ops = st.lists(st.one_of(
    st.tuples(st.just("set"), st.text("ab", max_size=6)),
    st.tuples(st.just("ack"), st.integers(0, 60)),  # maybe not kept
    st.tuples(st.just("ack_back"), st.integers(0, 3)),  # back minus this
    st.tuples(st.just("heard"), st.none()),
    st.tuples(st.just("data_ack"), st.none()),
    st.tuples(st.just("shutdown"), st.none()),
    st.tuples(st.just("wait"), st.floats(0.0, 1.5)),
), min_size=1, max_size=120)


class MoshSenderModelTests(SynchronousTestCase):
    """The sender alone, long runs of random inputs: what it sends, the
    states it keeps (the cap of 32, acks of states no longer kept) and its
    timers, against mosh's TransportSender."""

    @settings(max_examples=80, deadline=None)
    @given(ops=_sender_ops, srtt=st.sampled_from([0.004, 0.1, 0.6]),
           heartbeats=st.booleans())
    def test_sender_matches_mosh(self, ops, srtt, heartbeats):
        """Every tick sends what mosh would, the kept state numbers match
        and both want to wake at the same time."""
        self.drive(ops, srtt, heartbeats)

    @settings(max_examples=80, deadline=None)
    @given(ops=_sender_ops, srtt=st.sampled_from([0.004, 0.1, 0.6]),
           heartbeats=st.booleans())
    # One state never acknowledged while the peer is heard: resent after
    # 0.4 s (RTO 0.3 + ACK_DELAY), then 0.7, 1.3, 2.5 s.
    @example(ops=[("heard", None), ("set", "a")] + [("wait", 0.3)] * 10,
             srtt=0.1, heartbeats=True)
    # Three states sent unacknowledged, then resent from the front: the
    # two between are forgotten, and the resends back off.
    @example(ops=[("heard", None), ("set", "a"), ("wait", 0.05), ("set", "b"),
                  ("wait", 0.05), ("set", "c")] + [("wait", 0.3)] * 10,
             srtt=0.1, heartbeats=True)
    def test_sender_with_backoff_matches_model(self, ops, srtt, heartbeats):
        """The fleet profile's retransmission backoff, against the model's
        statement of it."""
        self.drive(ops, srtt, heartbeats, profile=FLEET)

    def test_sent_states_cap_matches_mosh(self):
        """Many states sent and none acknowledged: past 32 kept states the
        same one (16th from the end) is erased as in mosh."""
        for seed in range(4):
            rng = random.Random(seed)
            ops = []
            for _ in range(150):
                ops.append(("set", rng.choice("ab") * rng.randint(1, 6)))
                ops.append(("wait", rng.uniform(0.0, 0.3)))
                if rng.random() < 0.3:
                    ops.append(("heard", None))
            sender = self.drive(ops, 0.004 if seed % 2 else 0.1, True)
            self.assertEqual(sender.sent_count, MOSH.sent_states_cap)

    def drive(self, ops, srtt, heartbeats, profile=MOSH):
        """Run ``ops`` on our Sender and mosh's beside it; returns ours."""
        estimator = RTTEstimator()
        estimator.add_sample(srtt)
        rtt = _RTT(estimator.srtt, estimator.rto)
        now = 100.0
        empty = TextState.empty()
        ours = Sender(empty, now, profile, heartbeats=heartbeats)
        model = MoshTransport(empty, empty, now, profile,
                              heartbeats=heartbeats,
                              backoff=profile.retransmit_backoff)
        chaff = seeded_random_bytes(3)
        for op, arg in ops:
            if op == "set":
                state = TextState(arg)
                ours.set_current_state(state, now)
                model.current = state
            elif op in ("ack", "ack_back"):
                num = arg if op == "ack" else max(ours.back_num - arg, 0)
                ours.process_acknowledgment_through(num)
                model.process_acknowledgment_through(num)
            elif op == "heard":
                ours.remote_heard(now)
                model.last_heard = now
            elif op == "data_ack":
                ours.set_data_ack(now)
                model.set_data_ack()
            elif op == "shutdown":
                ours.start_shutdown(now)
                model.start_shutdown(now)
            else:
                now += arg
            # mosh's loop: recalculate, then tick when due.
            ours.calculate_timers(now, rtt)
            model.calculate_timers(now, rtt.srtt, rtt.rto)
            due = ours.next_wakeup()
            if due is not None and due <= now:
                inst = ours.tick(now, rtt, chaff)
                got = None if inst is None else (
                    inst.old_num, inst.new_num, inst.ack_num,
                    inst.throwaway_num, inst.diff)
                self.assertEqual(got, model.tick(now, rtt.srtt, rtt.rto))
                ours.calculate_timers(now, rtt)
                model.calculate_timers(now, rtt.srtt, rtt.rto)
            self.assertEqual(ours.sent_nums, [num for _, num, _ in model.sent])
            theirs = model.wakeup()
            mine = ours.next_wakeup()
            if mine is None or theirs is None:
                self.assertEqual(mine, theirs)
            else:
                self.assertAlmostEqual(max(mine, now), max(theirs, now),
                                       delta=1e-9)
        return ours
