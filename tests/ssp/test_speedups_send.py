"""Differential tests of the compiled send path (broker.ssp._speedups.send).

THE RULE (docs of broker.ssp.speedups): ``datagrams_to_send`` through the
compiled path returns the same datagrams, byte for byte, and leaves every
slot as the pure path would; anything outside its usual cases (an empty
ack from a sender whose states, the acknowledged one and any in flight,
are all its current state; a new state, not a retransmission) is handed
over
before anything changes. A new state (the device's reports) is taken too:
its diff as Sender.tick chooses it, the prospective resend included
(NewStateTests). Every scenario runs in twin worlds
(tests.ssp.speedups_twins.Twin, whose pure world forces both the receive
and the send path pure), compared after every step. Without the C module
both worlds run pure and the tests still pass; with it, the send counts
prove the fast path ran.
"""

import contextlib
import dataclasses
import gc
import linecache
import os
import random
import sys
import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import session as session_module
from broker.ssp.crypto import CipherCache, open_sealed
from broker.ssp.device_state import DeviceState
from broker.ssp.framing import HEADER_SIZE, BrokerFraming
from broker.ssp.instruction import (UINT64_MAX, decode_instruction,
                                    encode_instruction)
from broker.ssp.outgoing import SEQ_RESERVATION_BLOCK
from broker.ssp.profile import FLEET, MOSH
from broker.ssp.sender import NEVER
from broker.ssp.session import SSPSession

from tests.ssp.linksim import BROKER_ADDRESS, DEVICE_ADDRESS, DEVICE_SECRET
from tests.ssp.speedups_send_twins import (fast_send_available,
                                           pure_send_path, send_counts)
from tests.ssp.speedups_twins import (CONFIGS, Config, Divergence, Twin,
                                      TwinLink)

EMPTY = DeviceState.empty()
IPV6_DEVICE = ("2001:db8::10", 40000, 0, 0)
#: Plain mosh framing both ways, with the broker's sessions answering
#: only (no heartbeat): its sends are acks of the device's states.
MOSH_CAPPED = dataclasses.replace(MOSH, sent_states_cap=4)


def established(config, now=10.0, seed=0, device_address=None):
    """Twins whose device state {"a": 1} the broker holds (and confirmed,
    when it holds acks) and whose broker state {"cmd": 1} the device
    holds, all acknowledged. Returns (twin, link, now)."""
    twin = Twin(config, now=now, seed=seed)
    link = TwinLink(twin, random.Random(seed))
    if device_address is not None:
        link.device_address = device_address
    twin.set_state("device", {"a": 1}, (), now)
    twin.set_state("broker", {"cmd": 1}, (), now)
    now = link.run_until(now + 3.0, now)
    return twin, link, now


def device_sends(twin, link, patch, now):
    """The device sets ``patch`` and sends it when due (after the send
    mindelay); the broker receives it. Returns now."""
    twin.set_state("device", patch, (), now)
    now = max(now, twin.fast.device.next_wakeup())
    out = twin.send("device", now)
    assert out, "the device sent nothing"
    for data, address in out:
        twin.receive("broker", data, link.device_address, now + 0.01)
    return now + 0.01


def broker_acks(test, twin, link, now, rounds, step=0.5, echo=True):
    """``rounds`` times: a new device state reaches the broker, which
    acknowledges it when due; each ack leaves the broker through the
    compiled path (counted) and reaches the device. ``echo`` False waits
    past ECHO_WINDOW before the ack. Returns now."""
    for number in range(rounds):
        now = device_sends(twin, link, {"n": number}, now)
        fast = twin.fast.broker
        if twin.config.hold_acks:
            twin.confirm(fast.latest_remote_num)
        now += 0.01 if echo else 1.5
        due = fast.next_wakeup()
        if due is not None and due > now:
            now = due
        before = send_counts()
        out = twin.send("broker", now)
        test.assertEqual(len(out), 1)
        test.assert_taken(before)
        for data, address in out:
            test.assertEqual(address, link.device_address)
            twin.receive("device", data, BROKER_ADDRESS, now + 0.01)
        now += step
    return now


def assert_flat(test, run, shared, warmup, rounds):
    """``run(count, now)`` (returning now) from now = 20.0: its ``warmup``
    sends all taken whole, then ``rounds`` more under tracemalloc grow the
    traced memory by less than 64 KiB and leave the reference counts of the
    ``shared`` objects where they were."""
    before = send_counts()
    now = run(warmup, 20.0)
    test.assertEqual(send_counts()[0], before[0] + warmup)
    gc.collect()
    counts = [sys.getrefcount(obj) for obj in shared]
    tracemalloc.start()
    try:
        first, _ = tracemalloc.get_traced_memory()
        run(rounds, now)
        gc.collect()
        last, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    test.assertLess(last - first, 64 * 1024)
    test.assertEqual([sys.getrefcount(obj) for obj in shared], counts)


class SendTestCase(SynchronousTestCase):
    """Helpers: the compiled path ran (or was handed over) once."""

    def setUp(self):
        if os.environ.get("CI") and not os.environ.get(
                "SSP_BROKER_PURE_PYTHON"):
            self.assertTrue(fast_send_available(),
                            "CI must build the compiled send path")

    def assert_taken(self, before):
        """One send taken whole since ``before`` (when compiled)."""
        after = send_counts()
        if fast_send_available():
            self.assertEqual(after[0], before[0] + 1)
            self.assertEqual(after[1], before[1])

    def assert_handed_over(self, before):
        """One send handed over since ``before`` (when compiled)."""
        after = send_counts()
        if fast_send_available():
            self.assertEqual(after[0], before[0])
            self.assertEqual(after[1], before[1] + 1)


class AckSendTests(SendTestCase):
    """The broker's acks go out fast and identical in every framing."""

    def test_broker_framing_acks(self):
        """Acks of received states, broker framing with held acks: the
        same datagrams and slots as the pure path, and all taken fast."""
        twin, link, now = established(CONFIGS["broker"])
        broker_acks(self, twin, link, now, 12)

    def test_broker_unheld_acks(self):
        """Acks without held acks (broker framing)."""
        twin, link, now = established(CONFIGS["broker-unheld"], seed=3)
        broker_acks(self, twin, link, now, 12)

    def test_plain_mosh_acks(self):
        """Acks in plain mosh framing (no header), mosh's profile."""
        twin, link, now = established(CONFIGS["mosh"], seed=5)
        broker_acks(self, twin, link, now, 12)

    def test_plain_fleet_acks(self):
        """Acks in plain framing with the fleet profile."""
        twin, link, now = established(CONFIGS["fleet"], seed=7)
        broker_acks(self, twin, link, now, 12)

    def test_ipv6_peer(self):
        """A peer on IPv6: the same datagrams to the same address."""
        twin, link, now = established(CONFIGS["broker"], seed=9,
                                      device_address=IPV6_DEVICE)
        self.assertEqual(twin.fast.broker.remote_address, IPV6_DEVICE)
        broker_acks(self, twin, link, now, 6)

    def test_stale_timestamps(self):
        """An ack more than ECHO_WINDOW after the datagram it answers
        echoes no timestamp (and forgets it), as the pure path."""
        twin, link, now = established(CONFIGS["broker-unheld"], seed=11)
        broker_acks(self, twin, link, now, 6, echo=False)

    def test_echoed_timestamp_bytes(self):
        """The fast ack carries the echoed timestamp, corrected by the
        time held, and an empty diff; the device reads it."""
        twin, link, now = established(CONFIGS["broker-unheld"], seed=13)
        now = device_sends(twin, link, {"x": 2}, now)
        now = twin.fast.broker.next_wakeup()
        broker = twin.fast.broker
        saved = broker._link.saved_timestamp
        held = int(now * 1000) - broker._link.saved_timestamp_at
        before = send_counts()
        [(data, _)] = twin.send("broker", now)
        self.assert_taken(before)
        cipher = CipherCache().get(broker.key)
        direction, seq, plain = open_sealed(cipher, data, HEADER_SIZE)
        self.assertEqual(direction, 1)
        self.assertEqual(int.from_bytes(plain[2:4], "big"),
                         (saved + held) & 0xFFFF)
        inst = decode_instruction(plain[14:])
        self.assertEqual(inst.diff, b"")
        self.assertEqual(inst.new_num, inst.throwaway_num + 1)
        self.assertEqual(inst.ack_num, broker.latest_remote_num)
        self.assertLessEqual(len(inst.chaff), 16)
        self.assertEqual(int.from_bytes(plain[4:12], "big"), seq + 1)
        self.assertEqual(broker._link.saved_timestamp, -1)


def heartbeats(test, config, count, seed=17):
    """``count`` heartbeats of the device (each taken fast), after one to
    settle (it may follow an unacknowledged one: handed over), each
    answered by the broker. Returns the twin."""
    twin, link, now = established(config, seed=seed)
    for number in range(count + 1):
        device = twin.fast.device
        due = device.next_wakeup()
        test.assertIsNotNone(due)
        if number == count:
            return twin
        before = send_counts()
        out = twin.send("device", due)
        test.assertEqual(len(out), 1)
        if number:
            test.assert_taken(before)
        # The broker acknowledges the heartbeat's number: the device
        # holds only its acknowledged state again.
        for data, _ in out:
            twin.receive("broker", data, link.device_address, due)
        if twin.config.hold_acks:
            twin.confirm(twin.fast.broker.latest_remote_num)
        now = due + 0.02
        for data, _ in twin.send("broker", twin.fast.broker.next_wakeup()
                                 or now):
            twin.receive("device", data, BROKER_ADDRESS, now)


class HeartbeatTests(SendTestCase):
    """Heartbeats (empty acks on the ack interval) go out fast."""

    def test_mosh_heartbeats(self):
        """The device's heartbeats every ack_interval, plain mosh."""
        heartbeats(self, CONFIGS["mosh"], 5)

    def test_broker_framing_heartbeats(self):
        """The device's heartbeats, broker framing (fleet profile)."""
        heartbeats(self, CONFIGS["broker-unheld"], 5)


class LargeNumberTests(SendTestCase):
    """Sequence and state numbers of every varint width serialize alike."""

    def test_large_first_seq(self):
        """A broker starting at 2**62 (nonces and state numbers of nine
        varint bytes): the same bytes as the pure path."""
        config = dataclasses.replace(
            CONFIGS["broker-unheld"], name="first-seq",
            broker_options=(("first_seq", 2**62),))
        twin, link, now = established(config, seed=19)
        broker_acks(self, twin, link, now, 4)

    def test_protobuf_matches_encode_instruction(self):
        """For each chaff length and number width, C's deflated protobuf is
        encode_instruction's (read back from the sealed datagram)."""
        if not fast_send_available():
            raise self.skipTest("the compiled send path is not built")
        for width in (0, 1, 7, 14, 35, 62):
            for chaff_length in range(17):
                session, cipher = _lone_device(2**width, chaff_length)
                [(data, _)] = session.datagrams_to_send(20.0)
                _, _, plain = open_sealed(cipher, data)
                inst = decode_instruction(plain[14:])
                self.assertEqual(len(inst.chaff), chaff_length)
                self.assertEqual(plain[14:], encode_instruction(inst))


def _lone_device(first_seq, chaff_length):
    """A plain-framing device session due at 20.0 whose chaff is
    ``chaff_length`` bytes; (session, cipher)."""
    def random_bytes(n):
        return bytes([chaff_length]) + bytes(range(1, n))
    ciphers = CipherCache()
    session = SSPSession(
        key=DEVICE_SECRET, cipher_provider=ciphers, is_server=False,
        local_state=EMPTY, remote_state=EMPTY, random_bytes=random_bytes,
        now=20.0, profile=MOSH, remote_address=BROKER_ADDRESS,
        first_seq=first_seq)
    session._sender.ack_num = first_seq * 3 + 1
    return session, ciphers.get(session.key)


class ReservationTests(SendTestCase):
    """The sequence reservation: fast while it allows one datagram
    without a request; the Python code asks (or burns) otherwise."""

    def test_reservation_near_limit(self):
        """Acks with the reservation running out: fast while at least
        SEQ_RESERVATION_BLOCK // 2 remain, then handed over (the request
        event), confirmed, fast again; identical throughout."""
        half = SEQ_RESERVATION_BLOCK // 2
        config = dataclasses.replace(
            CONFIGS["broker-unheld"], name="reserved",
            broker_options=(("seq_reserved", half + 8),))
        twin, link, now = established(config, seed=23)
        fast = twin.fast.broker
        taken_some = handed_some = False
        for number in range(16):
            now = device_sends(twin, link, {"r": number}, now)
            now = max(now, fast.next_wakeup() or now)
            reserved = fast.seq_reservation
            room = reserved - (fast.next_seq + 1) >= half
            before = send_counts()
            for data, _ in twin.send("broker", now):
                twin.receive("device", data, BROKER_ADDRESS, now + 0.01)
            if room:
                self.assert_taken(before)
                taken_some = True
            else:
                self.assert_handed_over(before)
                handed_some = True
            if number == 10:
                limit = fast.seq_reservation + SEQ_RESERVATION_BLOCK
                twin.call("confirm", lambda world:
                          world.broker.confirm_seq_reservation(limit))
            now += 0.5
        self.assertTrue(taken_some and handed_some)

    def test_reservation_exhausted(self):
        """A reservation with no number left: the Python code burns one
        and asks (handed over), identical in both worlds."""
        config = dataclasses.replace(
            CONFIGS["broker-unheld"], name="exhausted",
            broker_options=(("seq_reserved", 4),))
        twin, link, now = established(config, seed=29)
        for number in range(6):
            now = device_sends(twin, link, {"e": number}, now)
            now = max(now, twin.fast.broker.next_wakeup() or now)
            before = send_counts()
            twin.send("broker", now)
            self.assert_handed_over(before)
            now += 0.5


def broker_due(twin, now):
    """The broker confirms what it received (when it holds acks); returns
    when its next send is due (``now`` if it already is)."""
    fast = twin.fast.broker
    if twin.config.hold_acks:
        twin.confirm(fast.latest_remote_num)
    due = fast.next_wakeup()
    return due if due is not None and due > now else now


def acks_unheard(test, twin, now, rounds):
    """``rounds`` times: a new device state reaches the broker, whose ack
    (taken whole by the compiled path) never reaches the device, so each
    ack joins the earlier ones in flight. Returns now."""
    link_address = twin.fast.broker.remote_address
    for number in range(rounds):
        twin.set_state("device", {"u": number}, (), now)
        now = max(now, twin.fast.device.next_wakeup())
        for data, _ in twin.send("device", now):
            twin.receive("broker", data, link_address, now + 0.01)
        now = broker_due(twin, now + 0.01)
        before = send_counts()
        test.assertEqual(len(twin.send("broker", now)), 1)  # (lost on the way)
        test.assert_taken(before)
        now += 0.05
    return now


class InFlightAckTests(SendTestCase):
    """Acks sent while earlier acks are unacknowledged (every state in
    flight the acknowledged one) are taken whole too, the cap on sent
    states included."""

    def test_acks_pile_up(self):
        """Broker framing, held acks: each ack numbers the next state after
        the last one sent, and the broker's sent states grow, as in the
        pure path; once the device hears one, both paths trim alike."""
        twin, link, now = established(CONFIGS["broker"], seed=71)
        now = acks_unheard(self, twin, now, 5)
        self.assertEqual(twin.fast.broker._sender.sent_count, 6)
        sender = twin.fast.broker._sender
        self.assertEqual(sender.sent_nums, list(range(sender.front_num, sender.front_num + 6)))
        broker_acks(self, twin, link, now, 3)   # heard: both paths trim alike
        self.assertLessEqual(sender.sent_count, 2)

    def test_cap_erases_from_the_middle(self):
        """Past the cap (4 here) one state is erased from the middle, the
        same one in both paths; plain mosh framing."""
        config = Config("capped", False, MOSH_CAPPED, MOSH_CAPPED, False)
        twin, link, now = established(config, seed=73)
        acks_unheard(self, twin, now, 9)
        self.assertEqual(twin.fast.broker._sender.sent_count, 4)

    def test_odd_cap(self):
        """A cap of 5 erases as one of 4 does (at len - (cap // 2) * 3: the
        state sent before the new one): the same numbers in both paths."""
        profile = dataclasses.replace(MOSH, sent_states_cap=5)
        config = Config("cap-5", False, profile, profile, False)
        twin, link, now = established(config, seed=83)
        acks_unheard(self, twin, now, 7)
        sender = twin.fast.broker._sender
        self.assertEqual(sender.sent_count, 5)
        front = sender.front_num
        # states front+1 .. front+7 went out; past the cap each send
        # erased the one sent just before it
        self.assertEqual(sender.sent_nums, [front, front + 1, front + 2, front + 3, front + 7])


#: The fleet profile with the sent-state cap at 4 (the device's).
FLEET_CAPPED = dataclasses.replace(FLEET, sent_states_cap=4)


def instruction_of(session, data):
    """The instruction in ``session``'s one-fragment datagram ``data``."""
    cipher = CipherCache().get(session.key)
    _, _, plain = open_sealed(cipher, data, len(session._header or b""))
    return decode_instruction(plain[14:])


def broker_answers(twin, link, now):
    """The broker acknowledges what it received (confirmed first when it
    holds acks) when due, and the device hears it. Returns now."""
    now = broker_due(twin, now)
    for data, _ in twin.send("broker", now):
        twin.receive("device", data, BROKER_ADDRESS, now + 0.01)
    return now + 0.01


class NewStateTests(SendTestCase):
    """The device's reports (a new state with a small diff) go out through
    the compiled path, identical to the pure path's."""

    def report(self, twin, link, now, patch, added=(), deliver=True,
               taken=True):
        """The device sets ``patch`` (and appends ``added`` events) and
        sends it when due, taken whole (or handed over); the broker gets
        it if ``deliver``. Returns (now, the instruction sent, the index
        of the assumed state tick read)."""
        twin.set_state("device", patch, added, now)
        device = twin.fast.device
        now = max(now, device.next_wakeup())
        sender = device._sender
        assumed = (sender._assumed_index(
            now, sender.retransmit_timeout(device._link.rtt))
            if sender.sent_count > 1 else 0)
        before = send_counts()
        out = twin.send("device", now)
        self.assertEqual(len(out), 1)
        if taken:
            self.assert_taken(before)
        else:
            self.assert_handed_over(before)
        [(data, address)] = out
        self.assertEqual(address, BROKER_ADDRESS)
        if deliver:
            twin.receive("broker", data, link.device_address, now + 0.005)
        return now + 0.005, instruction_of(device, data), assumed

    def reports(self, config, seed, rounds=12):
        """Reports with values and, every third, an event, each answered
        by the broker."""
        twin, link, now = established(config, seed=seed)
        for number in range(rounds):
            added = ({"kind": "tick", "i": number},) if number % 3 == 0 else ()
            now, inst, _ = self.report(
                twin, link, now, {"n": number, "temp": 20.0 + number / 10},
                added)
            self.assertTrue(inst.diff)
            self.assertEqual(inst.old_num, inst.throwaway_num)
            self.assertGreater(inst.new_num, inst.old_num)
            now = broker_answers(twin, link, now + 0.02) + 0.3
        return twin

    def test_broker_framing_reports(self):
        """Broker framing, held acks: values and events, all taken."""
        self.reports(CONFIGS["broker"], 101)

    def test_broker_unheld_reports(self):
        """Broker framing without held acks."""
        self.reports(CONFIGS["broker-unheld"], 103)

    def test_plain_mosh_reports(self):
        """Plain mosh framing and profile (no backoff)."""
        self.reports(CONFIGS["mosh"], 107)

    def test_asks_acks(self):
        """ASKS_ACKS does not touch a non-empty diff: taken."""
        twin, link, now = established(CONFIGS["broker-unheld"], seed=109)
        twin.call("ask", lambda world: world.device.ask_acks(True))
        for number in range(4):
            now, inst, _ = self.report(twin, link, now, {"q": number})
            self.assertNotEqual(inst.diff,
                                twin.fast.device._sender.current
                                .ACK_REQUEST_DIFF)
            now = broker_answers(twin, link, now + 0.02) + 0.3

    def test_states_in_flight(self):
        """Reports while the broker hears none: several states in flight,
        each diff from the acknowledged state (shorter than the slack), in
        both framings; then the link delivers and both paths trim alike."""
        for name, seed in (("broker", 113), ("mosh", 127)):
            twin, link, now = established(CONFIGS[name], seed=seed)
            front = twin.fast.device._sender.front_num
            count = twin.fast.device._sender.sent_count
            in_flight = False
            for number in range(6):
                added = ({"e": number},) if number % 2 else ()
                now, inst, assumed = self.report(
                    twin, link, now, {"f": number}, added, deliver=False)
                in_flight = in_flight or bool(assumed)
                self.assertEqual(inst.old_num, front)
                self.assertLess(len(inst.diff), 100)
                now += 0.03
            self.assertTrue(in_flight)
            self.assertEqual(twin.fast.device._sender.sent_count, count + 6)
            twin.set_state("device", {"f": "last"}, (), now)
            now = link.run_until(now + 5.0, now)
            self.assertEqual(twin.fast.device._sender.sent_count, 1)

    def test_prospective_resend_both_ways(self):
        """States in flight whose diff from the acknowledged state is 100
        bytes or more: from the assumed state when that is shorter by the
        slack or more, else still from the acknowledged one (diff_from
        called twice); plain mosh and broker framing."""
        for name, seed, size in (("mosh", 131, 30), ("broker", 137, 30),
                                 ("mosh", 139, 120), ("broker", 149, 120)):
            twin, link, now = established(CONFIGS[name], seed=seed)
            seen = set()
            for number in range(4):
                patch = {f"k{number}": "x" * size, "n": number}
                now, inst, assumed = self.report(twin, link, now, patch,
                                                 deliver=False)
                front = twin.fast.device._sender.front_num
                if not assumed:
                    seen.add("nothing assumed")
                elif inst.old_num != front:
                    seen.add("from assumed")
                elif len(inst.diff) >= 100:
                    seen.add("long resend")
                else:
                    seen.add("short resend")
                now += 0.03
            self.assertIn("long resend" if size == 30 else "from assumed",
                          seen, f"{name} {size}")
            link.run_until(now + 5.0, now)

    def test_sent_state_cap(self):
        """Past the device's cap (4) one state is erased from the middle,
        as in the pure path; both framings."""
        for framing, seed in ((True, 151), (False, 157)):
            config = Config(f"device-capped-{framing}", framing,
                            FLEET_CAPPED, FLEET, False)
            twin, link, now = established(config, seed=seed)
            for number in range(9):
                now, _, _ = self.report(twin, link, now, {"c": number},
                                        deliver=False)
                now += 0.03
            sender = twin.fast.device._sender
            self.assertEqual(sender.sent_count, 4)
            front = sender.front_num
            self.assertEqual(sender.sent_nums,
                             [front, front + 1, front + 2, front + 9])
            link.run_until(now + 5.0, now)

    def test_medium_diff(self):
        """A diff past SMALL_INSTRUCTION (deflated as zlib.compress does)
        but within one fragment: taken."""
        twin, link, now = established(CONFIGS["broker"], seed=163)
        for number in range(3):
            now, inst, _ = self.report(twin, link, now,
                                       {"m": "y" * (150 + 100 * number)})
            self.assertGreater(len(inst.diff), 96)
            now = broker_answers(twin, link, now + 0.02) + 0.3

    def test_large_diff(self):
        """A diff that may not fit the compiled path's buffer: handed
        over, the same datagrams (also several fragments)."""
        twin, link, now = established(CONFIGS["broker"], seed=167)
        rng = random.Random(5)
        for size in (600, 3000):
            value = rng.randbytes(size)
            twin.set_state("device", {"big": value}, (), now)
            now = max(now, twin.fast.device.next_wakeup())
            before = send_counts()
            out = twin.send("device", now)
            self.assert_handed_over(before)
            self.assertEqual(len(out), 1 if size < 1000 else 3)
            for data, _ in out:
                twin.receive("broker", data, link.device_address, now + 0.005)
            now = broker_answers(twin, link, now + 0.02) + 0.3
        self.report(twin, link, now, {"big": None})

    def test_retransmission(self):
        """A state lost on the way is sent again (a retransmission):
        handed over; the next report fast again."""
        twin, link, now = established(CONFIGS["broker-unheld"], seed=173)
        now, first, _ = self.report(twin, link, now, {"r": 1}, deliver=False)
        due = twin.fast.device.next_wakeup()
        before = send_counts()
        [(data, _)] = twin.send("device", due)
        self.assert_handed_over(before)
        self.assertEqual(instruction_of(twin.fast.device, data).new_num,
                         first.new_num)
        twin.receive("broker", data, link.device_address, due + 0.005)
        now = broker_answers(twin, link, due + 0.02) + 0.3
        self.report(twin, link, now, {"r": 2})

    def test_diff_from_raises(self):
        """DeviceState.diff_from raising: handed over before any change,
        and the Python code raises the same error (both worlds alike). (An
        array value: C leaves its diff to the method.)"""
        twin, link, now = established(CONFIGS["broker"], seed=179)
        twin.set_state("device", {"z": [1]}, (), now)
        now = max(now, twin.fast.device.next_wakeup())
        original = DeviceState.diff_from

        def diff_from(state, base):
            raise ValueError("no diff today")
        self.patch(DeviceState, "diff_from", diff_from)

        def send(world):
            try:
                world.device.datagrams_to_send(now)
            except ValueError as error:
                return str(error)
            return None
        before = send_counts()
        self.assertEqual(twin.call("send, diff_from raising", send),
                         "no diff today")
        self.assert_handed_over(before)
        self.patch(DeviceState, "diff_from", original)
        self.report(twin, link, now + 0.01, {"z": 2})

    def test_int_now(self):
        """An int ``now``: taken, alike."""
        twin, link, now = established(CONFIGS["mosh"], seed=181)
        twin.set_state("device", {"i": 1}, (), now)
        due = int(twin.fast.device.next_wakeup()) + 1
        before = send_counts()
        self.assertEqual(len(twin.send("device", due)), 1)
        self.assert_taken(before)


class HandOverTests(SendTestCase):
    """Outside the usual case the Python code does it all, identically."""

    def test_unacknowledged_states(self):
        """A sender with states in flight (the cap on sent states at its
        least, 4): its new states (taken) and retransmissions (handed
        over) alike, and the later acks fast again."""
        config = Config("capped", False, MOSH_CAPPED, MOSH_CAPPED, False)
        twin, link, now = established(config, seed=31)
        for number in range(8):
            twin.set_state("broker", {"s": number}, (), now)
            before = send_counts()
            twin.send("broker", now)
            if fast_send_available():
                self.assertEqual(sum(send_counts()), sum(before) + 1)
            now += 0.3
        self.assertGreater(twin.fast.broker._sender.sent_count, 1)
        now = link.run_until(now + 5.0, now)
        self.assertLessEqual(twin.fast.broker._sender.sent_count, 2)
        broker_acks(self, twin, link, now, 4)

    def test_not_due(self):
        """A tick that is not due: handed over, nothing sent."""
        twin, link, now = established(CONFIGS["mosh"], seed=37)
        before = send_counts()
        self.assertEqual(twin.send("device", now), [])
        self.assert_handed_over(before)

    def test_asks_acks(self):
        """ASKS_ACKS set: handed over (the diff is the state's ask)."""
        twin, link, now = established(CONFIGS["broker-unheld"], seed=41)
        twin.call("ask", lambda world: world.device.ask_acks(True))
        due = twin.fast.device.next_wakeup()
        before = send_counts()
        out = twin.send("device", due)
        self.assertEqual(len(out), 1)
        if twin.fast.device._flags & 64:
            self.assert_handed_over(before)

    def test_shutdown(self):
        """Our shutdown, and the peer's acknowledged: handed over."""
        twin, link, now = established(CONFIGS["mosh"], seed=43)
        twin.call("shutdown", lambda world: world.device.start_shutdown(now))
        before = send_counts()
        twin.send("device", now)
        self.assert_handed_over(before)
        now = link.run_until(now + 3.0, now)
        self.assertTrue(twin.fast.device.closed)
        self.assertEqual(twin.fast.broker.ack_num, UINT64_MAX)
        before = send_counts()
        twin.send("broker", now + 5.0)
        self.assert_handed_over(before)

    def test_closed_and_no_address(self):
        """A closed session and a server without an address: handed over,
        nothing sent."""
        twin = Twin(CONFIGS["broker"], now=10.0)
        before = send_counts()
        self.assertEqual(twin.send("broker", 10.0), [])
        self.assert_handed_over(before)
        twin.call("close", lambda world: world.device._close(None))
        before = send_counts()
        self.assertEqual(twin.send("device", 10.0), [])
        self.assert_handed_over(before)

    def test_detach(self):
        """A server not heard for the association timeout detaches after
        sending: handed over, the same PeerDetached."""
        profile = dataclasses.replace(FLEET, server_association_timeout=2.0)
        config = Config("detach", True, FLEET, profile, False)
        twin, link, now = established(config, seed=47)
        now = device_sends(twin, link, {"d": 1}, now)
        before = send_counts()
        late = now + 2.5
        twin.call("due", lambda world: setattr(
            world.broker._sender, "_next_ack_time", late))
        out = twin.send("broker", late)
        self.assertEqual(len(out), 1)
        self.assert_handed_over(before)
        self.assertIsNone(twin.fast.broker.remote_address)

    def test_int_now(self):
        """An int ``now`` (exact milliseconds) goes fast and alike."""
        twin = heartbeats(self, CONFIGS["mosh"], 2, seed=53)
        due = int(twin.fast.device.next_wakeup()) + 1
        before = send_counts()
        self.assertEqual(len(twin.send("device", due)), 1)
        self.assert_taken(before)

    def test_twin_notices_a_wrong_send(self):
        """A fast send that left one slot different (next_seq) is caught
        by the twin: the comparison covers the send path."""
        twin = heartbeats(self, CONFIGS["mosh"], 1, seed=71)
        def wrong(session, now):
            with pure_send_path():
                out = session.datagrams_to_send(now)
            session._link.next_seq += 1
            return out
        self.patch(session_module, "_fast_send", wrong)
        with self.assertRaises(Divergence):
            twin.send("device", twin.fast.device.next_wakeup())

    def test_reentrant_random_bytes(self):
        """random_bytes that sends on the session (next_seq moves) while
        the chaff is made: the nonce is the fresh next_seq, as Python's."""
        twin = heartbeats(self, CONFIGS["mosh"], 1, seed=73)
        start = twin.fast.device.next_seq

        def arm(world):
            session = world.device
            inner = session._random_bytes

            def random_bytes(n):
                session._link.next_seq += 5
                session._random_bytes = inner
                return inner(n)
            session._random_bytes = random_bytes
        twin.call("arm random_bytes", arm)
        [(data, _)] = twin.send("device", twin.fast.device.next_wakeup())
        cipher = CipherCache().get(twin.fast.device.key)
        self.assertEqual(open_sealed(cipher, data)[1], start + 5)
        self.assertEqual(twin.fast.device.next_seq, start + 6)

    def test_reentrant_cipher_provider(self):
        """A cipher provider that sends on the session (next_seq moves)
        while the cipher is looked up: the nonce is the fresh next_seq,
        the fragment id the one read before, as Python's."""
        twin = heartbeats(self, CONFIGS["mosh"], 1, seed=79)
        start = twin.fast.device.next_seq

        class Provider:
            def __init__(self, session):
                self.session = session
                self.ciphers = session._ciphers

            def get(self, key):
                self.session._link.next_seq += 3
                self.session._ciphers = self.ciphers
                return self.ciphers.get(key)

        def arm(world):
            world.device._ciphers = Provider(world.device)
        twin.call("arm the cipher provider", arm)
        [(data, _)] = twin.send("device", twin.fast.device.next_wakeup())
        cipher = CipherCache().get(twin.fast.device.key)
        _, seq, plain = open_sealed(cipher, data)
        self.assertEqual(seq, start + 3)
        self.assertEqual(int.from_bytes(plain[4:12], "big"), start + 1)

    def test_pure_send_path(self):
        """pure_send_path() forces the pure path (the sender's timers in
        Python too) and restores the globals; with the extension the
        sessions' timers are the compiled ones."""
        saved = session_module._fast_send, session_module._fast_timers
        if fast_send_available():
            self.assertIsNotNone(saved[1])
        with pure_send_path():
            self.assertIsNone(session_module._fast_send)
            self.assertIsNone(session_module._fast_timers)
        self.assertEqual((session_module._fast_send, session_module._fast_timers), saved)


class StreamTests(SendTestCase):
    """Lossy, duplicating streams of updates: the twins stay identical
    while the compiled path sends many of the acks."""

    def stream(self, name, seed):
        twin = Twin(CONFIGS[name], now=10.0, seed=seed)
        rng = random.Random(seed)
        link = TwinLink(twin, rng, loss=0.1, duplicate=0.05,
                        delay=(0.002, 0.05))
        before = send_counts()
        now = 10.0
        for number in range(40):
            twin.set_state("device", {"t": number}, (), now)
            now = link.run_until(now + rng.choice((0.05, 0.3, 1.2)), now)
        now = link.run_until(now + 30.0, now)
        if fast_send_available():
            self.assertGreater(send_counts()[0], before[0] + 5)

    def test_broker_stream(self):
        """Broker framing, held acks."""
        self.stream("broker", 61)

    def test_mosh_stream(self):
        """Plain mosh framing, heartbeats both ways."""
        self.stream("mosh", 67)


class ResourceTests(SendTestCase):
    """The compiled send path keeps nothing it should not."""

    def test_no_leak(self):
        """200,000 fast sends (each then acknowledged) leave traced memory
        and the shared objects' reference counts flat."""
        if not fast_send_available():
            raise self.skipTest("the compiled send path is not built")
        session, _ = _lone_device(1, 5)
        sender = session._sender
        address = session.remote_address

        def run(count, now):
            for _ in range(count):
                out = session.datagrams_to_send(now)
                if len(out) != 1:
                    raise AssertionError(f"no datagram at {now}")
                sender.process_acknowledgment_through(sender.back_num)
                now += 3.0
            return now
        assert_flat(self, run, (NEVER, address, EMPTY), 2000, 200_000)


class NewStateResourceTests(SendTestCase):
    """The new-state send keeps nothing either (its diffs, the states)."""

    def test_no_leak(self):
        """50,000 fast reports (each with a value and an event, then
        acknowledged) leave traced memory and the reference counts of the
        shared objects flat."""
        if not fast_send_available():
            raise self.skipTest("the compiled send path is not built")
        session, _ = _lone_device(1, 5)
        sender = session._sender
        address = session.remote_address
        value = "shared value"

        def run(count, now):
            for number in range(count):
                state = sender.current.with_values(
                    {"n": number, "s": value}).with_events({"i": number})
                session.set_local_state(state, now)
                out = session.datagrams_to_send(now + 1.0)
                if len(out) != 1:
                    raise AssertionError(f"no datagram at {now}")
                sender.process_acknowledgment_through(sender.back_num)
                now += 3.0
            return now
        assert_flat(self, run, (NEVER, address, value), 2000, 50_000)


class FramingTests(SendTestCase):
    """The framed datagram carries the session's header as the prefix."""

    def test_header_prefix(self):
        """A broker-framed fast ack starts with the session header."""
        twin, link, now = established(CONFIGS["broker-unheld"], seed=59)
        due = twin.fast.device.next_wakeup()
        [(data, address)] = twin.send("device", due)
        self.assertEqual(address, BROKER_ADDRESS)
        self.assertEqual(data[:HEADER_SIZE],
                         BrokerFraming(42, 7).header)
        self.assertEqual(DEVICE_ADDRESS, link.device_address)


def _lone_session(cipher_provider=None, random_bytes=bytes):
    """A client session due to send its empty heartbeat at 20.0 (the
    compiled path's usual case)."""
    return SSPSession(key=bytes(range(16)),
                      cipher_provider=cipher_provider or CipherCache(),
                      is_server=False, local_state=EMPTY,
                      remote_state=EMPTY, random_bytes=random_bytes,
                      now=20.0, profile=MOSH,
                      remote_address=DEVICE_ADDRESS)


def _is_compiled_send_frame(frame) -> bool:
    """Whether ``frame`` is datagrams_to_send inside the compiled call."""
    return (frame.f_code.co_name == "datagrams_to_send"
            and frame.f_code.co_filename == session_module.__file__
            and "fast(self, now)" in linecache.getline(
                frame.f_code.co_filename, frame.f_lineno))


class ReentryTests(SendTestCase):
    """Code run in the middle of a send (the cyclic GC, random_bytes, the
    cipher) that sends on, or changes, the same session: never a crash,
    a freed object read, or a nonce used twice."""

    def test_send_inside_diff_from(self):
        """A report sent from inside the diff of another (code that
        DeviceState.diff_from's allocations run: a GC callback, a
        finalizer), compiled and pure: no state number goes out with two
        different diffs, and each number sent is kept for the state whose
        diff went out under it. (Array values: C leaves their diffs to the
        method; a diff C writes runs no Python code.)"""
        for pure in (False, True):
            session = _lone_session()
            real = DeviceState.diff_from
            inner = []

            def diff_from(state, other, session=session, inner=inner):
                if not inner:
                    inner.append(None)
                    session.set_local_state(EMPTY.with_values({"x": [2]}), 20.0)
                    inner[:] = session.datagrams_to_send(25.0)
                return real(state, other)
            session.set_local_state(EMPTY.with_values({"x": [1]}), 20.0)
            with contextlib.ExitStack() as stack:
                if pure:
                    stack.enter_context(pure_send_path())
                DeviceState.diff_from = diff_from
                try:
                    outer = session.datagrams_to_send(25.0)
                finally:
                    DeviceState.diff_from = real
            self.assertEqual(len(inner), 1)
            cipher = CipherCache().get(session.key)
            sent = {}
            for data, _ in inner + outer:
                inst = decode_instruction(open_sealed(cipher, data)[2][14:])
                self.assertEqual(inst.old_num, 0)   # from the front, EMPTY
                self.assertEqual(sent.setdefault(inst.new_num, inst.diff), inst.diff,
                                 f"pure={pure}: state {inst.new_num} sent twice")
            states = dict(zip(session._sender.sent_nums, session._sender._sent[2::3]))
            for num, diff in sent.items():
                self.assertEqual(states[num].diff_from(EMPTY), diff, f"pure={pure}")

    def gc_reentry(self, inner_send):
        """Sessions sent on until a GC pass starts inside the compiled
        call (its first tracked allocation grows the sent list) and
        ``inner_send(session)`` runs from the gc callback there. Returns
        (session, outer datagrams, inner datagrams)."""
        state = {"armed": False, "inner": None, "session": None}

        def callback(phase, info):
            if phase == "start" and state["armed"] and \
                    _is_compiled_send_frame(sys._getframe(1)):
                state["armed"] = False
                state["inner"] = inner_send(state["session"])
                # reuse what the inner send freed, as a later allocation
                [[i] * 3 for i in range(2000)]

        thresholds = gc.get_threshold()
        gc.callbacks.append(callback)
        self.addCleanup(gc.callbacks.remove, callback)
        self.addCleanup(gc.set_threshold, *thresholds)
        holds = []
        for extra in range(40):
            session = _lone_session()
            state["session"] = session
            holds.append([[] for _ in range(200)])  # empty the free list
            gc.set_threshold(1, 1000, 1000)
            more = []
            for _ in range(extra):
                more.append([])
            holds.append(more)
            state["armed"] = True
            outer = session.datagrams_to_send(20.0)
            state["armed"] = False
            gc.set_threshold(*thresholds)
            if state["inner"] is not None:
                return session, outer, state["inner"]
        self.fail("no GC pass started inside the compiled send")

    def test_gc_callback_sends_while_sent_grows(self):
        """A GC pass inside the compiled send whose callback sends on the
        same session (replacing, and freeing, its sent list): the outer
        send still builds its sent list from the list it checked."""
        if not fast_send_available():
            raise self.skipTest("the compiled send path is not in use")
        session, outer, inner = self.gc_reentry(
            lambda s: s.datagrams_to_send(20.0))
        sent = session._sender._sent
        self.assertEqual(len(sent) % 3, 0)
        for index in range(0, len(sent), 3):
            self.assertEqual(
                [type(x) for x in sent[index:index + 3]],
                [float, int, DeviceState])
        cipher = CipherCache().get(session.key)
        seqs = [open_sealed(cipher, data)[1] for data, _ in inner + outer]
        self.assertEqual(len(set(seqs)), len(seqs))

    def test_random_bytes_deletes_a_slot(self):
        """random_bytes deleting the session's cipher provider or key:
        both paths raise the same AttributeError (never a crash)."""
        for slot in ("_ciphers", "_key"):
            errors = []
            for pure in (False, True):
                holder = {}

                def random_bytes(n, holder=holder, slot=slot):
                    delattr(holder["session"], slot)
                    return bytes(n)
                session = _lone_session(random_bytes=random_bytes)
                holder["session"] = session
                with contextlib.ExitStack() as stack:
                    if pure:
                        stack.enter_context(pure_send_path())
                    error = self.assertRaises(
                        AttributeError, session.datagrams_to_send, 20.0)
                errors.append(str(error))
            self.assertEqual(errors[0], errors[1])
            self.assertIn(slot, errors[0])

    def test_reentrant_encrypt_uses_fresh_nonces(self):
        """A cipher whose encrypt sends on the same session: the inner
        and outer datagrams carry distinct nonces, on both paths."""
        for pure in (False, True):
            provider = _ReentrantProvider()
            session = _lone_session(cipher_provider=provider)
            provider.session = session
            with contextlib.ExitStack() as stack:
                if pure:
                    stack.enter_context(pure_send_path())
                outer = session.datagrams_to_send(20.0)
            datagrams = provider.inner + outer
            self.assertEqual(len(datagrams), 2)
            nonces = [data[:8] for data, _ in datagrams]
            self.assertEqual(len(set(nonces)), 2, f"pure={pure}")
            cipher = CipherCache().get(session.key)
            for data, _ in datagrams:
                open_sealed(cipher, data)  # authentic under the key


class _ReentrantProvider:
    """A cipher provider whose ciphers send on ``session`` (once) from
    within their first encrypt."""

    def __init__(self):
        self.cache = CipherCache()
        self.session = None
        self.inner = None

    def get(self, key):
        return _ReentrantCipher(self, self.cache.get(key))


class _ReentrantCipher:
    """An AEAD cipher that sends on the session before its first seal."""

    def __init__(self, provider, real):
        self.provider, self.real = provider, real

    def encrypt(self, nonce, plaintext, ad):
        provider = self.provider
        if provider.inner is None:
            provider.inner = []
            session = provider.session
            session.set_local_state(EMPTY.with_values({"x": 1}), 20.0)
            provider.inner = session.datagrams_to_send(25.0)
        return self.real.encrypt(nonce, plaintext, ad)
