"""Which path a datagram takes: the compiled one (broker.ssp._speedups) for
the usual datagram, the Python code for anything else, with the same
result either way.

Each test feeds the same datagrams to two broker sessions built alike, one
receiving through ``incoming._fast_receive`` and one with it set to None
(the pure path), and compares every slot of both after every datagram
(as tests.ssp.speedups_canon sees them). RareInputTests run the branches
a random stream seldom reaches on the twin harness of
tests.ssp.speedups_twins. tests/ssp/test_speedups.py holds the random
differential suite; these are the named cases of the spec, one by one.
"""

import contextlib
import dataclasses
import math
import os
import random
import struct
import sys
import zlib

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import events, incoming, speedups
from broker.ssp.bounds import StateBounds
from broker.ssp.crypto import TO_CLIENT, CipherCache, seal
from broker.ssp.device_state import (_EMPTY_MAP, _NO_VALUES, MAX_DEPTH,
                                     DeviceState)
from broker.ssp.errors import DropReason
from broker.ssp.fragment import FINAL_BIT
from broker.ssp.framing import HEADER_SIZE, BrokerFraming
from broker.ssp.instruction import (PROTOCOL_VERSION, Instruction,
                                    encode_instruction, serialize_instruction)
from broker.ssp.parking import Resumption
from broker.ssp.datagram import NO_TIMESTAMP, RTTEstimator
from broker.ssp.profile import FLEET, MOSH
from broker.ssp.receiver import UNCHANGED
from broker.ssp.sender import NEVER, Sender
from broker.ssp.session import SSPSession

from tests.ssp.linksim import BROKER_ADDRESS, DEVICE_ADDRESS
from tests.ssp.speedups_canon import canon
from tests.ssp.speedups_canon import snapshot as session_snapshot
from tests.ssp.speedups_crafting import (craft, seal_from, timestamps,
                                         values_diff)
from tests.ssp.speedups_twins import (BROKER_PROFILE, CONFIGS, Twin,
                                      fast_available, fast_counts, pure_path)

SECRET = bytes(range(16))
DEVICE = ("127.0.0.1", 40000)
ELSEWHERE = ("127.0.0.1", 40001)
BROKER = ("127.0.0.1", 60001)
PROFILE = BROKER_PROFILE
FRAMING = BrokerFraming(42, 77)
STEP = 0.05


def zeros(count: int) -> bytes:
    """Deterministic chaff, so both brokers stay alike."""
    return bytes(count)


class CountingCiphers:
    """A cipher provider whose ciphers count their decrypt calls."""

    def __init__(self):
        self.cache = CipherCache()
        self.decrypts = 0

    def get(self, key):
        cipher = self.cache.get(key)
        provider = self

        class Counting:
            def encrypt(self, nonce, data, associated):
                return cipher.encrypt(nonce, data, associated)

            def decrypt(self, nonce, data, associated):
                provider.decrypts += 1
                return cipher.decrypt(nonce, data, associated)
        return Counting()


def broker_session(ciphers=None, **options):
    options.setdefault("framing", FRAMING)
    options.setdefault("profile", PROFILE)
    if ciphers is None:
        ciphers = CipherCache()
    return SSPSession(key=SECRET, cipher_provider=ciphers,
                      is_server=True, local_state=DeviceState.empty(),
                      remote_state=DeviceState.empty(), random_bytes=zeros,
                      now=1000.0, **options)


def device_session(**options):
    options.setdefault("framing", FRAMING)
    return SSPSession(key=SECRET, cipher_provider=CipherCache(),
                      is_server=False, local_state=DeviceState.empty(),
                      remote_state=DeviceState.empty(), random_bytes=zeros,
                      now=1000.0, profile=FLEET, remote_address=BROKER,
                      **options)


def snapshot(value):
    """``value`` in the twin harness's canonical form
    (tests.ssp.speedups_canon): a session slot by slot with its layers
    (less its providers), anything else type for type, bit for bit."""
    if type(value) is SSPSession:
        return session_snapshot(value)
    return canon(value, {})


@contextlib.contextmanager
def forbidden_python():
    """The Python receive path, past the compiled one, fails meanwhile."""
    def refuse(*args):
        raise AssertionError("the Python path ran")
    saved = incoming.Incoming._receive, incoming.Incoming._accept
    incoming.Incoming._receive = incoming.Incoming._accept = refuse
    try:
        yield
    finally:
        incoming.Incoming._receive, incoming.Incoming._accept = saved


class Twins:
    """Two brokers built alike, one fast and one pure, and a device."""

    def __init__(self, test, fast_ciphers=None, **options):
        self.test = test
        self.device = device_session()
        self.fast = broker_session(fast_ciphers, **options)
        self.pure = broker_session(**options)
        #: while set, the fast broker must not run the Python receive path
        self.python_forbidden = False
        self.now = 1000.0
        self.fast_events = []
        self.pure_events = []

    def receive(self, data, address=DEVICE, *, congestion=False):
        """Both brokers take ``data``; they must end alike."""
        if self.python_forbidden:
            with forbidden_python():
                self.fast.receive_datagram(data, address, self.now,
                                           congestion)
        else:
            self.fast.receive_datagram(data, address, self.now, congestion)
        self.fast_events.extend(self.fast.pop_events())
        with pure_path():
            self.pure.receive_datagram(data, address, self.now, congestion)
        self.pure_events.extend(self.pure.pop_events())
        self.check()

    def check(self):
        self.test.assertEqual(snapshot(self.fast), snapshot(self.pure))
        self.test.assertEqual(snapshot(self.fast_events),
                              snapshot(self.pure_events))

    def device_sends(self, state=None):
        """The device's datagrams for ``state`` (or for nothing new)."""
        self.now += STEP
        if state is not None:
            self.device.set_local_state(state, self.now)
        self.now += PROFILE.send_mindelay
        return [data for data, _ in self.device.datagrams_to_send(self.now)]

    def brokers_answer(self):
        """Both brokers send what is due; the device hears the fast one."""
        self.now += STEP
        out = self.fast.datagrams_to_send(self.now)
        self.pure.datagrams_to_send(self.now)
        for data, _ in out:
            self.device.receive_datagram(data, BROKER, self.now)
        self.device.pop_events()
        self.check()

    def exchange(self, state=None):
        for data in self.device_sends(state):
            self.receive(data)
        self.brokers_answer()

    def settle(self, values=None):
        """A first state (the broker learns the device's address) and its
        acknowledgement."""
        self.exchange(DeviceState(values or {"n": 0}))
        self.exchange()


class PathTests(SynchronousTestCase):
    """The compiled path takes the usual datagram and hands over the rest
    with the result the Python code gives."""

    def setUp(self):
        if speedups.fast_receive is None:
            raise self.skipTest(speedups.unavailable_reason)
        self.twins = Twins(self)
        self.twins.settle()

    def assertTaken(self, data, **options):
        before = speedups.counts()
        self.twins.receive(data, **options)
        after = speedups.counts()
        self.assertEqual((after[0] - before[0], after[1] - before[1]), (1, 0))

    def assertHandedOver(self, data, address=DEVICE, **options):
        before = speedups.counts()
        self.twins.receive(data, address, **options)
        after = speedups.counts()
        self.assertEqual((after[0] - before[0], after[1] - before[1]), (0, 1))

    def test_usual_datagrams_taken(self):
        """Value changes, deletions and heartbeats are taken by C, and the
        Python continuation never runs for them."""
        self.twins.python_forbidden = True
        state = DeviceState({"n": 0})
        for step in range(1, 40):
            state = state.with_values({"n": step, "t": step / 3,
                                       "gone": None if step % 3 else b"x"})
            for data in self.twins.device_sends(state):
                self.assertTaken(data)
            self.twins.brokers_answer()
        self.assertEqual(self.twins.fast.latest_remote_state.values["n"], 39)

    def test_state_received_events_match(self):
        """The StateReceived events of the fast path carry the same state
        and number as the pure path's."""
        state = DeviceState({"n": 1, "flag": True, "x": -2.5, "s": "é"})
        for data in self.twins.device_sends(state):
            self.assertTaken(data)
        found = [event for event in self.twins.fast_events
                 if type(event) is events.StateReceived]
        self.assertEqual(found[-1].state, state)

    def test_auth_failed_decrypts_once(self):
        """A forged datagram is rejected as AUTH_FAILED, as the pure path
        does, after exactly one decrypt."""
        ciphers = CountingCiphers()
        twins = Twins(self, fast_ciphers=ciphers)
        twins.settle()
        data = bytearray(twins.device_sends(DeviceState({"n": 5}))[0])
        data[-1] ^= 1
        before_decrypts = ciphers.decrypts
        before = speedups.counts()
        twins.receive(bytes(data))
        self.assertEqual(ciphers.decrypts - before_decrypts, 1)
        self.assertEqual(speedups.counts()[0] - before[0], 1)
        self.assertEqual(twins.fast_events[-1],
                         events.DatagramRejected(DropReason.AUTH_FAILED))

    def test_hand_over_after_decrypt_decrypts_once(self):
        """A datagram handed over after the decrypt (here: from another
        address) is not decrypted again by the Python continuation."""
        ciphers = CountingCiphers()
        twins = Twins(self, fast_ciphers=ciphers)
        twins.settle()
        (data,) = twins.device_sends(DeviceState({"n": 1}).with_events("e"))
        before = ciphers.decrypts
        handed = speedups.counts()[1]
        twins.receive(data, ELSEWHERE)
        self.assertEqual(ciphers.decrypts - before, 1)
        self.assertEqual(speedups.counts()[1] - handed, 1)

    def test_events_taken(self):
        """Diffs appending events (scalars, maps and arrays of them, with
        or without values) are taken by C, frozen as freeze() does, and
        reported alike."""
        self.twins.python_forbidden = True
        state = DeviceState({"n": 0})
        for step in range(1, 30):
            state = state.with_values({"n": step})
            added = [{"kind": "tick", "i": step, "f": step / 4},
                     [step, None, "x", b"y", True, -step],
                     step, "text", -2.5, False][:1 + step % 6]
            if step % 4 == 0:
                state = state.with_values({"n": None, "gone": step})
            state = state.with_events(*added)
            for data in self.twins.device_sends(state):
                self.assertTaken(data)
            if step % 3 == 0:
                self.twins.brokers_answer()
        received = self.twins.fast.latest_remote_state
        self.assertEqual(received.values, state.values)
        self.assertEqual(received.event_end, state.event_end)
        self.assertEqual(received.events,
                         state.events_since(received.event_base))

    def test_nested_values_taken(self):
        """Values and events that nest arrays and maps as deep as freeze()
        allows are taken by C; an empty map is the shared frozen one."""
        deep = 1
        for _ in range(MAX_DEPTH):
            deep = [deep]
        state = DeviceState({"n": [1, [2, {"a": None}]], "m": {},
                             "deep": deep}).with_events(
            {"empty": {}, "list": [[], {"k": [1.5]}]}, deep)
        (data,) = self.twins.device_sends(state)
        self.assertTaken(data)
        received = self.twins.fast.latest_remote_state
        self.assertEqual(received.values["deep"], state.values["deep"])
        self.assertIs(received.values["m"], _EMPTY_MAP)
        self.assertIs(received.events[-2]["empty"], _EMPTY_MAP)

    def test_too_deep_hands_over(self):
        """A value or an event nested deeper than freeze() allows goes to
        the Python code, which refuses it (BAD_DIFF)."""
        deep = b"\x01"
        for _ in range(MAX_DEPTH + 1):
            deep = b"\x81" + deep
        for diff in (b"\xa1\x00\xa1\x61a" + deep,
                     b"\xa2\x01\x00\x02\x81" + deep):
            self.assertHandedOver(self.crafted(diff))
            self.assertEqual(self.twins.fast_events[-1],
                             events.DatagramRejected(DropReason.BAD_DIFF))

    def test_event_diffs_python_decides(self):
        """Event diffs C does not take (a gap, an overlap, a key alone, a
        null event, a negative index, keys out of range or repeated, a tag
        55799) go to the Python code, which decides alike."""
        twins = self.twins
        (data,) = twins.device_sends(
            DeviceState({"n": 0}).with_events("a", "b"))
        self.assertTaken(data)
        # the broker now holds events 0 and 1: the next one is 2
        for diff in (b"\xa2\x01\x03\x02\x81\x01",  # gap: 3
                     b"\xa2\x01\x01\x02\x81\x01",  # overlap: 1
                     b"\xa1\x01\x02",  # key 1 alone
                     b"\xa1\x02\x81\x01",  # key 2 alone
                     b"\xa2\x01\x02\x02\x81\xf6",  # a null event
                     b"\xa2\x01\x20\x02\x81\x01",  # index -1
                     b"\xa2\x01\x02\x03\x81\x01",  # key 3
                     b"\xa3\x01\x02\x02\x80\x01\x02",  # key 1 twice
                     b"\xa2\x01\x02\x02\x81\xf7",  # undefined
                     b"\xd9\xd9\xf7\xa2\x01\x02\x02\x81\x01"):  # tag
            self.assertHandedOver(self.crafted(diff))
        rejected = [event.reason for event in twins.fast_events
                    if type(event) is events.DatagramRejected]
        self.assertEqual(rejected, [DropReason.BAD_DIFF] * 9)
        self.assertEqual(twins.fast.latest_remote_state.events[-1], 1)

    def test_event_diffs_taken_crafted(self):
        """Event diffs in any key order, with no event or no values, and
        maps with keys in any order, are taken by C."""
        twins = self.twins
        for diff in (b"\xa2\x02\x81\x01\x01\x00",  # key 2 first
                     b"\xa2\x01\x01\x02\x80",  # no event: unchanged
                     b"\xa3\x02\x81\xa2\x61b\x01\x61a\x02"
                     b"\x00\xa1\x61v\x01\x01\x01"):
            self.assertTaken(self.crafted(diff))
        self.assertEqual(list(twins.fast.latest_remote_state.events[-1]),
                         ["b", "a"])

    def test_state_zero_takes_any_first_index(self):
        """From the empty state 0, a diff whose events start past 0 (a
        peer resending what it holds) is taken, with that first index."""
        twins = Twins(self, remote_address=DEVICE)
        self.twins = twins
        self.assertTaken(self.crafted(b"\xa2\x01\x05\x02\x82\x61a\x01",
                                      old_num=0, new_num=3))
        self.assertEqual(twins.fast.latest_remote_state.event_base, 5)
        self.assertTaken(self.crafted(b"\xa3\x00\xa1\x61n\x01\x01\x07"
                                      b"\x02\x80", old_num=0, new_num=4))
        self.assertEqual(twins.fast.latest_remote_state.event_base, 7)

    def test_event_bounds(self):
        """With tight bounds, event diffs are taken while the bound stays
        under the limits, and handed over where Python must count or
        encode the events (and then refuses or takes them alike)."""
        tight = dataclasses.replace(
            PROFILE, state_bounds=StateBounds(max_diff_bytes=200, max_events=6,
                                              max_event_bytes=40,
                                              max_values=4))
        twins = Twins(self, profile=tight)
        twins.settle()
        self.twins = twins
        state = DeviceState({"n": 0})
        outcomes = []
        for step in range(1, 14):
            state = state.with_events(*["e%d" % step] * (step % 3 + 1))
            if step == 9:
                state = state.with_values({f"k{i}": i for i in range(5)})
            for data in twins.device_sends(state):
                before = speedups.counts()
                twins.receive(data)
                after = speedups.counts()
                outcomes.append(after[0] - before[0])
            if step in (5, 11):
                twins.brokers_answer()
                state = state.with_values({"k0": None, "k1": None})
        self.assertIn(1, outcomes)
        self.assertIn(0, outcomes)
        reasons = {event.reason for event in twins.fast_events
                   if type(event) is events.DatagramRejected}
        self.assertIn(DropReason.EVENTS_OVER_LIMIT, reasons)
        self.assertIn(DropReason.VALUES_OVER_LIMIT, reasons)

    def test_acknowledgements_move_the_front(self):
        """Acks of the broker's states (one or several sent, some equal)
        are taken by C, which drops and rationalizes the sent states and
        reports StateAcknowledged as Python does."""
        twins = self.twins
        command = DeviceState({"cmd": 0})
        reported = DeviceState({"n": 0})
        for step in range(1, 8):
            command = command.with_values({"cmd": step}).with_events(step)
            twins.fast.set_local_state(command, twins.now)
            twins.pure.set_local_state(command, twins.now)
            twins.brokers_answer()
            if step % 3 == 0:
                reported = reported.with_values({"n": step}).with_events("x")
                for data in twins.device_sends(reported):
                    self.assertTaken(data)
        back = command.with_values({"cmd": 0})
        twins.fast.set_local_state(back, twins.now)
        twins.pure.set_local_state(back, twins.now)
        twins.brokers_answer()
        twins.exchange(reported.with_values({"n": 99}))
        acknowledged = [event for event in twins.fast_events
                        if type(event) is events.StateAcknowledged]
        self.assertGreater(len(acknowledged), 1)

    def test_cipher_cache_order_kept(self):
        """The cipher lookup done in C keeps the shared CipherCache in
        Python's order (a hit moves the key to the end) and counts no
        miss."""
        fast_cache, pure_cache = CipherCache(), CipherCache()
        fast = Twins(self)
        other = BrokerFraming(43, 77)
        for cache in (fast_cache, pure_cache):
            for framing in (FRAMING, other):
                broker_session(cache, framing=framing)  # keys in the cache
        fast.fast = broker_session(fast_cache)
        fast.pure = broker_session(pure_cache)
        self.twins = fast
        fast.settle()
        for cache in (fast_cache, pure_cache):
            cache.get(broker_session(CipherCache(), framing=other).key)
        (data,) = fast.device_sends(DeviceState({"n": 5}))
        self.assertTaken(data)
        self.assertEqual(list(fast_cache._ciphers), list(pure_cache._ciphers))
        self.assertEqual(list(fast_cache._ciphers)[-1], fast.fast.key)
        self.assertEqual(fast_cache.misses, pure_cache.misses)

    def crafted(self, diff, old_num=None, new_num=None):
        """A datagram of the device carrying ``diff`` (from the newest
        state the brokers hold, unless told)."""
        num = self.twins.fast.latest_remote_num
        old = num if old_num is None else old_num
        return self.sealed(Instruction(
            old_num=old, new_num=num + 1 if new_num is None else new_num,
            ack_num=self.twins.fast.acknowledged_num,
            throwaway_num=min(old, num), diff=diff))

    def test_hands_over_replay(self):
        """An old datagram again (out of order) goes to the Python code."""
        (data,) = self.twins.device_sends(DeviceState({"n": 2}))
        self.assertTaken(data)
        self.assertHandedOver(data)

    def test_hands_over_roam(self):
        """A datagram from a new address goes to the Python code, which
        reports the roam."""
        (data,) = self.twins.device_sends(DeviceState({"n": 2}))
        self.assertHandedOver(data, ELSEWHERE)
        self.assertIn(events.PeerRoamed(ELSEWHERE), self.twins.fast_events)

    def test_hands_over_first_address(self):
        """A broker's very first datagram (no address yet) goes to the
        Python code."""
        twins = Twins(self)
        (data,) = twins.device_sends(DeviceState({"n": 1}))
        self.twins = twins
        self.assertHandedOver(data)

    def test_hands_over_fragments(self):
        """An instruction in several fragments goes to the Python code."""
        big = {f"k{index}": os.urandom(40) for index in range(60)}
        datagrams = self.twins.device_sends(DeviceState(big))
        self.assertGreater(len(datagrams), 1)
        for data in datagrams:
            self.assertHandedOver(data)
        self.assertEqual(self.twins.fast.latest_remote_state.values["k1"],
                         big["k1"])

    def test_hands_over_other_data_types(self):
        """A bytearray or memoryview datagram goes to the Python code."""
        (data,) = self.twins.device_sends(DeviceState({"n": 3}))
        self.assertHandedOver(bytearray(data))

    def test_hands_over_foreign_header(self):
        """A datagram naming another session goes to the Python code,
        which rejects it as BAD_HEADER."""
        (data,) = self.twins.device_sends(DeviceState({"n": 3}))
        other = BrokerFraming(42, 78).header + data[HEADER_SIZE:]
        self.assertHandedOver(other)
        self.assertEqual(self.twins.fast_events[-1],
                         events.DatagramRejected(DropReason.BAD_HEADER))

    def test_hands_over_short(self):
        """A datagram shorter than nonce and tag goes to the Python code."""
        self.assertHandedOver(FRAMING.header + bytes(10))

    def test_hands_over_wrong_direction(self):
        """An authentic datagram with the server's direction bit is handed
        over decrypted and rejected as WRONG_DIRECTION."""
        key = self.twins.fast.key
        plaintext = b"\x00\x01\xff\xff" + bytes(10) + b"x"
        data = seal(CipherCache().get(key), TO_CLIENT, 500, plaintext,
                    FRAMING.header)
        self.assertHandedOver(data)
        self.assertEqual(self.twins.fast_events[-1],
                         events.DatagramRejected(DropReason.WRONG_DIRECTION))

    def test_congestion_goes_to_python(self):
        """With congestion_experienced the compiled path is not asked."""
        (data,) = self.twins.device_sends(DeviceState({"n": 4}))
        before = speedups.counts()
        self.twins.receive(data, congestion=True)
        self.assertEqual(speedups.counts(), before)

    def test_hands_over_resumed_receiver(self):
        """A session resumed with held acks (a ResumedReceiver) goes to the
        Python code."""
        resume = Resumption(remote_num=5, remote_state=DeviceState({"n": 0}),
                            seq_floor=100, expected_seq=0)
        twins = Twins(self, resume=resume, ack_requires_confirm=True,
                      remote_address=DEVICE)
        (data,) = twins.device_sends(DeviceState({"n": 1}))
        self.twins = twins
        self.assertHandedOver(data)

    def test_held_acks_fast(self):
        """With acks held until durable, new states are taken by C and
        their arrival times recorded as the Python code records them."""
        twins = Twins(self, ack_requires_confirm=True)
        twins.settle()
        self.twins = twins
        for step in range(1, 12):
            (data,) = twins.device_sends(DeviceState({"n": step}))
            self.assertTaken(data)
        twins.fast.confirm_durable(twins.fast.latest_remote_num)
        twins.pure.confirm_durable(twins.pure.latest_remote_num)
        twins.check()

    def test_shutdown_state_goes_to_python(self):
        """The peer's shutdown (new_num UINT64_MAX) goes to the Python
        code, which reports it."""
        self.twins.device.start_shutdown(self.twins.now)
        for data in self.twins.device_sends():
            self.assertHandedOver(data)
        self.assertIn(events.ShutdownRequested(), self.twins.fast_events)

    def test_empty_patch_on_empty_state(self):
        """A diff that deletes a key never set leaves the state as it was
        (UNCHANGED), as DeviceState.apply decides."""
        twins = self.twins
        crafted = Instruction(old_num=twins.fast.latest_remote_num,
                              new_num=twins.fast.latest_remote_num + 1,
                              ack_num=twins.fast.acknowledged_num,
                              throwaway_num=twins.fast.latest_remote_num,
                              diff=b"\xa1\x00\xa1\x61z\xf6")
        self.assertTaken(self.sealed(crafted))

    def test_odd_cbor_hands_over(self):
        """Duplicate keys, trailing bytes, tags, NaN and indefinite maps
        go to the Python code, which rejects or takes them."""
        for diff in (b"\xa1\x00\xa2\x61a\x01\x61a\x02",  # duplicate key
                     b"\xa1\x00\xa1\x61a\x01\x00",  # trailing byte
                     b"\xa1\x00\xa1\x61a\xc1\x01",  # a tag
                     b"\xa1\x00\xa1\x61a\xf9\x7e\x00",  # NaN
                     b"\xa1\x00\xbf\x61a\x01\xff",  # indefinite map
                     b"\xa1\x00\xa1\x61\xff\x01"):  # invalid UTF-8
            num = self.twins.fast.latest_remote_num
            crafted = Instruction(old_num=num, new_num=num + 1,
                                  ack_num=self.twins.fast.acknowledged_num,
                                  throwaway_num=num, diff=diff)
            self.assertHandedOver(self.sealed(crafted))

    def test_scalars_like_python(self):
        """Every scalar kind decodes to the very value the Python decoder
        gives (half, single and double floats, big integers, -0.0)."""
        for diff in (b"\xa1\x00\xa1\x61a\xf9\x80\x00",  # -0.0 half
                     b"\xa1\x00\xa1\x61a\xf9\x7c\x00",  # inf half
                     b"\xa1\x00\xa1\x61a\xfa\x3f\xc0\x00\x00",  # 1.5 single
                     b"\xa1\x00\xa1\x61a\x3b" + b"\xff" * 8,  # -2**64
                     b"\xa1\x00\xa1\x61a\x1b" + b"\xff" * 8,  # 2**64 - 1
                     b"\xa1\x00\xa1\x61a\x38\x00",  # -1, not minimal
                     b"\xa1\x00\xa1\x61a\x42\x00\x01",  # bytes
                     b"\xa1\x00\xa1\x62\xc3\xa9\xf5",  # "é": True
                     b"\xa0"):  # the ack request: nothing changes
            num = self.twins.fast.latest_remote_num
            crafted = Instruction(old_num=num, new_num=num + 1,
                                  ack_num=self.twins.fast.acknowledged_num,
                                  throwaway_num=num, diff=diff)
            self.assertTaken(self.sealed(crafted))

    def test_inflate_like_zlib_decompress(self):
        """Instructions that inflate past C's own buffer, or whose zlib
        stream has bytes after its end (zlib.decompress ignores them), are
        still taken whole, as Python's zlib gives them; a truncated stream
        goes to the Python code (BAD_ZLIB)."""
        twins = self.twins
        big = b"\xa1\x00\xa1\x61b\x59\x13\x88" + b"z" * 5000
        for diff, tail, taken in ((big, b"", True),
                                  (b"\xa1\x00\xa1\x61a\x01", b"junk", True),
                                  (b"\xa1\x00\xa1\x61a\x02", None, False)):
            num = twins.fast.latest_remote_num
            inst = Instruction(old_num=num, new_num=num + 1,
                               ack_num=twins.fast.acknowledged_num,
                               throwaway_num=num, diff=diff)
            stream = zlib.compress(serialize_instruction(inst))
            stream = stream[:-2] if tail is None else stream + tail
            if taken:
                self.assertTaken(self.sealed(inst, stream))
            else:
                self.assertHandedOver(self.sealed(inst, stream))
        self.assertEqual(twins.fast.latest_remote_state.values["b"],
                         b"z" * 5000)
        self.assertEqual(twins.fast_events[-1],
                         events.DatagramRejected(DropReason.BAD_ZLIB))

    def sealed(self, inst: Instruction, stream=None) -> bytes:
        """``inst`` (or the zlib ``stream`` given) as the device's next
        datagram."""
        device = self.twins.device
        link = device._link
        if stream is None:
            stream = encode_instruction(inst)
        payload = (b"\x00" * 8 + b"\x80\x00") + stream
        seq = link.next_seq
        link.next_seq += 1
        return seal(device._ciphers.get(device.key), link.direction_out, seq,
                    b"\x00\x01\xff\xff" + payload, FRAMING.header)


class AvailabilityTests(SynchronousTestCase):
    """Whether the compiled path is there, and the way to turn it off."""

    def test_ci_has_the_compiled_path(self):
        """In CI (gcc and python3-dev installed) the compiled path is
        built and used; elsewhere its absence is explained."""
        if os.environ.get("CI") and not os.environ.get(
                speedups.PURE_PYTHON_VARIABLE):
            self.assertIsNotNone(speedups.fast_receive,
                                 speedups.unavailable_reason)
        if speedups.fast_receive is None:
            self.assertIsInstance(speedups.unavailable_reason, str)
        else:
            self.assertIsNone(speedups.unavailable_reason)
            self.assertIs(incoming._fast_receive, speedups.fast_receive)

    def _built(self):
        """The extension, where it is built; in CI its absence fails the
        test, elsewhere it skips."""
        if speedups.fast_receive is None:
            if os.environ.get("CI") and not os.environ.get(
                    speedups.PURE_PYTHON_VARIABLE):
                self.fail(speedups.unavailable_reason)
            raise self.skipTest(speedups.unavailable_reason)
        from broker.ssp import _speedups
        return _speedups

    def test_ci_has_zlib(self):
        """In CI (zlib1g-dev installed) the compiled path is built with zlib
        linked, whatever CFLAGS the build had; elsewhere HAVE_ZLIB says
        whether it was."""
        _speedups = self._built()
        self.assertIsInstance(_speedups.HAVE_ZLIB, bool)
        if os.environ.get("CI"):
            self.assertTrue(_speedups.HAVE_ZLIB, "zlib was not linked")

    def test_ci_has_openssl(self):
        """In CI (libssl-dev installed) the compiled path is built with
        OpenSSL's libcrypto, and every CipherCache builds its OCBCipher;
        elsewhere HAVE_OPENSSL says whether it was."""
        _speedups = self._built()
        from broker.ssp import crypto
        self.assertIsInstance(_speedups.HAVE_OPENSSL, bool)
        if os.environ.get("CI"):
            self.assertTrue(_speedups.HAVE_OPENSSL, "OpenSSL was not linked")
        if _speedups.HAVE_OPENSSL:
            self.assertIs(type(crypto.CipherCache().get(bytes(16))),
                          _speedups.OCBCipher)

    def test_pure_python_variable(self):
        """SSP_BROKER_PURE_PYTHON set to a non-empty value leaves the
        compiled path out (a fresh interpreter)."""
        import subprocess
        code = ("from broker.ssp import speedups, incoming, instruction, crypto; "
                "print(speedups.fast_receive, incoming._fast_receive, "
                "instruction._compiled_deflate, "
                "type(crypto.CipherCache().get(bytes(16))).__name__, "
                "speedups.counts(), speedups.unavailable_reason)")
        env = dict(os.environ, SSP_BROKER_PURE_PYTHON="1")
        root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        result = subprocess.run([sys.executable, "-c", code], cwd=root,
                                env=env, capture_output=True, text=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(),
                         "None None None AESOCB3 (0, 0) SSP_BROKER_PURE_PYTHON is set")

    def test_compiled_deflate(self):
        """With the compiled path, every short instruction is deflated by
        the extension's kept stream: zlib.compress()'s bytes, again and
        again from the one stream; None past SMALL_INSTRUCTION (Python then
        compresses), TypeError for anything but bytes."""
        if speedups.fast_receive is None:
            raise self.skipTest(speedups.unavailable_reason)
        from broker.ssp import _speedups, instruction
        self.assertIs(instruction._compiled_deflate, _speedups.deflate)
        generator = random.Random(7)
        for size in (0, 1, 2, 30, instruction.SMALL_INSTRUCTION) * 3:
            raw = generator.randbytes(size)
            self.assertEqual(_speedups.deflate(raw), zlib.compress(raw), size)
            self.assertEqual(_speedups.deflate(b"ab" * (size // 2)),
                             zlib.compress(b"ab" * (size // 2)), size)
        self.assertIsNone(_speedups.deflate(
            bytes(instruction.SMALL_INSTRUCTION + 1)))
        for wrong in (bytearray(b"x"), "x", None):
            self.assertRaises(TypeError, _speedups.deflate, wrong)

    def test_acks_waiting_in_step(self):
        """The compiled path's held-ack list bound is incoming's."""
        self.assertEqual(speedups._MAX_ACKS_WAITING, incoming.MAX_ACKS_WAITING)


class ReferenceTests(SynchronousTestCase):
    """The compiled path keeps no reference it should not."""

    def setUp(self):
        if speedups.fast_receive is None:
            raise self.skipTest(speedups.unavailable_reason)

    def test_shared_objects_not_leaked(self):
        """Thousands of fast receives, with values and events, leave the
        reference counts of the shared objects they touch (None, True,
        _NO_VALUES, the empty map, UNCHANGED, NEVER, the profile) where
        they were."""
        twins = Twins(self)
        twins.settle()
        datagrams = []
        state = DeviceState({"n": 0})
        for step in range(2000):
            state = state.with_values({"n": step, "f": step / 7,
                                       "d": None})
            if step % 2:
                state = state.with_events({"i": step, "m": {}}, [None, 1])
            datagrams.extend(twins.device_sends(state))
            if step % 3 == 0:
                datagrams.extend(twins.device_sends())
            twins.device._sender.process_acknowledgment_through(
                twins.device._sender.back_num)
        session = twins.fast
        shared = (_NO_VALUES, _EMPTY_MAP, UNCHANGED, NEVER, PROFILE, None,
                  True, False)
        taken = speedups.counts()[0]
        # a first round, so that every lazily built object exists
        for data in datagrams[:100]:
            session.receive_datagram(data, DEVICE, twins.now)
            session.pop_events()
        before = [sys.getrefcount(item) for item in shared]
        for data in datagrams[100:]:
            session.receive_datagram(data, DEVICE, twins.now)
            session.pop_events()
        after = [sys.getrefcount(item) for item in shared]
        self.assertGreater(speedups.counts()[0] - taken, 1500)
        # None, True, False and the empty map may move a little with other
        # live objects (the states held); a leak per datagram would move
        # them by thousands
        for name, was, now in zip("NO_VALUES EMPTY_MAP UNCHANGED NEVER "
                                  "PROFILE None True False".split(), before,
                                  after):
            self.assertLess(abs(now - was), 50, name)
        self.assertFalse(math.isnan(session.rtt.srtt))


class TimerTests(SynchronousTestCase):
    """Sender.calculate_timers done in C (``_speedups.timers``, what the
    receive path calls) sets what the Python method sets, in every branch,
    and calls the method for what it does not compute."""

    def setUp(self):
        if speedups.fast_receive is None:
            raise self.skipTest(speedups.unavailable_reason)
        from broker.ssp import _speedups
        self.timers = _speedups.timers

    def twin_senders(self, profile, rng):
        """Two senders and RTT estimators built alike from ``rng``'s
        choices, for C and for Python."""
        pairs = []
        now = 1000.0 + rng.choice([0, 0.25, 1 / 3])
        for _ in range(2):
            sender = Sender(DeviceState.empty(), now, profile)
            rtt = RTTEstimator()
            pairs.append((sender, rtt))
        return pairs, now

    def run_scenario(self, profile, seed):
        import random
        rng = random.Random(seed)
        pairs, now = self.twin_senders(profile, rng)
        state = DeviceState.empty()
        in_c = 0
        for step in range(60):
            now += rng.choice([0.001, 0.01, 0.05, 0.3, 1.0, 12.0])
            choice = rng.random()
            ops = []
            if choice < 0.3:
                state = state.with_values({"v": rng.randrange(4)})
                if rng.random() < 0.3:
                    state = state.with_events(step)
                ops.append(("set_current_state", state, now))
            elif choice < 0.5:
                ops.append(("tick", now))
            elif choice < 0.6:
                ops.append(("ack",))
            elif choice < 0.7:
                ops.append(("remote_heard", now))
            elif choice < 0.75:
                ops.append(("sample", rng.choice([3, 40, 250, 900, 4000])))
            elif choice < 0.78:
                ops.append(("start_shutdown", now))
            elif choice < 0.8:
                ops.append(("peer_shutdown",))
            for sender, rtt in pairs:
                for op in ops:
                    if op[0] == "tick":
                        sender.tick(op[1], rtt, zeros)
                    elif op[0] == "ack":
                        sender.process_acknowledgment_through(
                            sender.back_num)
                    elif op[0] == "sample":
                        rtt.add_sample_ms(op[1])
                    elif op[0] == "peer_shutdown":
                        sender.ack_num = 2**64 - 1
                    else:
                        getattr(sender, op[0])(*op[1:])
            (fast, fast_rtt), (pure, pure_rtt) = pairs
            in_c += self.timers(fast, now, fast_rtt)
            pure.calculate_timers(now, pure_rtt)
            self.assertEqual(snapshot(fast), snapshot(pure), (seed, step))
        return in_c

    def test_every_branch_like_python(self):
        """Random senders (values and events sent, acked, resent, backed
        off, shut down, peers silent or heard) get the same deadlines from
        C as from Python, nearly always computed in C."""
        total = 0
        for profile in (FLEET, PROFILE, MOSH,
                        dataclasses.replace(FLEET, retransmit_backoff=False)):
            for seed in range(15):
                total += self.run_scenario(profile, seed)
        self.assertGreater(total, 4 * 15 * 60 * 0.95)

    def test_odd_values_call_python(self):
        """Deadlines C cannot compute exactly as Python (an int profile
        constant, a huge int time) are left to the Python method, with
        the same result."""
        for profile, now in ((dataclasses.replace(FLEET, send_mindelay=1),
                              1000.0),
                             (FLEET, 2**60)):
            fast = Sender(DeviceState.empty(), 1000.0, profile)
            pure = Sender(DeviceState.empty(), 1000.0, profile)
            for sender in (fast, pure):
                sender.set_current_state(DeviceState({"a": 1}), 1000.0)
            self.assertFalse(self.timers(fast, now, RTTEstimator()))
            pure.calculate_timers(now, RTTEstimator())
            self.assertEqual(snapshot(fast), snapshot(pure))

    def test_never_is_shared(self):
        """An idle sender's send deadline is the shared NEVER, as Python
        sets it."""
        sender = Sender(DeviceState.empty(), 1000.0, FLEET)
        self.assertTrue(self.timers(sender, 1000.0, RTTEstimator()))
        self.assertIs(sender._next_send_time, NEVER)


def started(config="broker-unheld", profile=None, now=10.0):
    """A twin (tests.ssp.speedups_twins) whose broker holds the device's
    first state and whose device holds the broker's answer; and the time."""
    config = CONFIGS[config]
    if profile is not None:
        config = dataclasses.replace(config, broker_profile=profile)
    twin = Twin(config, now=now)
    twin.set_state("device", {"n": 0}, now=now)
    for data, _ in twin.send("device", now + 0.05):
        twin.receive("broker", data, DEVICE_ADDRESS, now + 0.06)
    now += 0.2
    for data, _ in twin.send("broker", now):
        twin.receive("device", data, BROKER_ADDRESS, now + 0.01)
    return twin, now + 0.05


def counted(twin, datagrams, now) -> tuple:
    """(taken, handed over) by the fast broker of ``twin`` for
    ``datagrams`` from the device at ``now`` (both worlds compared)."""
    before = fast_counts()
    for data in datagrams:
        twin.receive("broker", data, DEVICE_ADDRESS, now)
    after = fast_counts()
    return after[0] - before[0], after[1] - before[1]


def crafted_to_broker(twin, diff, now, **spec) -> list:
    """The device's datagrams carrying ``diff`` (speedups_crafting.craft:
    from the broker's newest state to the next, unless ``spec`` says)."""
    spec = dict({"target": "broker", "old": "newest", "new": "next",
                 "throwaway": "old", "ack": "front", "diff": diff}, **spec)
    return twin.call("craft", lambda world: craft(world, spec, now))


def numbered_to_broker(twin, numbers, diff, now, reply=NO_TIMESTAMP):
    """The device's datagram carrying ``diff`` with instruction ``numbers``
    ``numbers(broker session) -> (old, new, ack, throwaway)``."""
    def action(world):
        old, new, ack, throwaway = numbers(world.broker)
        inst = tuple.__new__(Instruction, (PROTOCOL_VERSION, old, new, ack,
                                           throwaway, diff, b""))
        payload = (struct.pack(">QH", 7, FINAL_BIT)
                   + encode_instruction(inst))
        return seal_from(world.device, timestamps(now, reply) + payload)
    return [twin.call("craft", action)]


def next_state(broker):
    """(old, new, ack, throwaway) of the usual next instruction."""
    newest = broker._receiver.newest_num
    return newest, newest + 1, broker._sender.front_num, newest


def broker_sets(twin, make, now) -> None:
    """The broker application sets the state ``make(world)`` in both
    worlds."""
    def action(world):
        world.apps["broker"] = state = make(world)
        world.broker.set_local_state(state, now)
    twin.step("broker sets a state", action)


class RareInputTests(SynchronousTestCase):
    """Rare inputs of the compiled path (each a branch the random suite
    seldom or never reaches) end in the fast twin exactly as in the pure
    one (tests.ssp.speedups_twins compares every slot after every step)."""

    def setUp(self):
        if not fast_available():
            raise self.skipTest(speedups.unavailable_reason)

    def test_int_srtt_like_python(self):
        """An RTT sample on an estimator restored with int milliseconds is
        taken by C while they are small, and left to Python (which
        subtracts the sample exactly, then rounds) once they pass 2**40."""
        for seconds, expected in ((10**6, (1, 0)), (10**14 + 1, (0, 1))):
            twin, now = started()
            twin.call("restore rtt", lambda world, seconds=seconds:
                      world.broker._link.rtt.restore(seconds))
            self.assertIs(type(twin.fast.broker._link.rtt._srtt_ms), int)
            at = now + 0.5
            reply = (int(at * 1000) - 10) & 0xFFFF  # a 10 ms sample
            data = numbered_to_broker(twin, next_state,
                                      values_diff({"a": 1}), at, reply)
            self.assertEqual(counted(twin, data, at), expected)

    def test_event_bound_reused(self):
        """States built on the peer's own unacknowledged states, each adding
        events, reuse the bound of the state before (StateBounds.check's
        known), in C while it stays under the limit."""
        for config, all_taken in (("broker", True), ("broker-tight", False),
                                  ("broker-unheld", True)):
            twin, now = started(config)
            outcomes = []
            for step in range(8):
                newest = twin.fast.broker._receiver.newest_state
                diff = cbor2.dumps({1: newest.event_end,
                                    2: [f"e{step}"] * 2}, canonical=True)
                now += 0.01
                outcomes.append(counted(twin, crafted_to_broker(
                    twin, diff, now, throwaway="zero"), now))
            self.assertEqual(outcomes[:2], [(1, 0)] * 2)
            self.assertEqual(set(outcomes) == {(1, 0)}, all_taken, config)

    def test_int_now(self):
        """Receives and timers at int times (``now`` an int, as a caller may
        pass) are taken by C and end as in Python."""
        taken = 0
        for config in ("broker", "mosh", "fleet", "broker-unheld"):
            twin = Twin(CONFIGS[config], now=10)
            now = 10
            twin.set_state("device", {"n": 0}, now=now)
            for step in range(30):
                now += 1 if step % 3 else 0
                if step % 4 == 0:
                    twin.set_state("device", {"n": step}, added=(step,),
                                   now=now)
                before = fast_counts()[0]
                for data, _ in twin.send("device", now):
                    twin.receive("broker", data, DEVICE_ADDRESS, now)
                for data, _ in twin.send("broker", now):
                    twin.receive("device", data, BROKER_ADDRESS, now)
                taken += fast_counts()[0] - before
        self.assertGreater(taken, 20)

    def test_clock_at_all_ones(self):
        """A reply timestamp received when our 16-bit ms clock reads 0xFFFF
        (which mosh sends as 0) gives the RTT sample Python computes."""
        twin, _ = started()
        now = 131.0715
        self.assertEqual(int(now * 1000) & 0xFFFF, 0xFFFF)
        data = crafted_to_broker(twin, values_diff({"a": 1}), now,
                                 plaintext="reply")
        self.assertEqual(counted(twin, data, now), (1, 0))
        self.assertTrue(twin.fast.broker._link.rtt.hit)

    def test_compressed_near_inflate_at_once(self):
        """Instructions whose compressed part is just under or at least
        incoming._INFLATE_AT_ONCE bytes are taken whole or handed to the
        capped inflate of the Python code, with the same result."""
        rng = random.Random(1)
        outcomes = set()
        for blob in range(960, 1010, 3):
            twin, now = started()
            diff = values_diff({"b": rng.randbytes(blob)})
            data = crafted_to_broker(twin, diff, now + 0.01,
                                     zlib="stored" if blob % 2 else "default")
            outcomes.add(counted(twin, data, now + 0.01))
        self.assertEqual(outcomes, {(1, 0), (0, 1)})

    def test_nesting_at_max_depth(self):
        """Maps and arrays nested around MAX_DEPTH, in values and in events,
        are taken by C up to the depth freeze() allows and refused by the
        Python code past it."""
        outcomes = {}
        for kind in ("map", "array"):
            for depth in range(MAX_DEPTH - 2, MAX_DEPTH + 3):
                for leaf in (1, {}, [], None):
                    value = leaf
                    for _ in range(depth):
                        value = {"k": value} if kind == "map" else [value]
                    for where in ("values", "events"):
                        twin, now = started()
                        newest = twin.fast.broker._receiver.newest_state
                        diff = cbor2.dumps(
                            {0: {"a": value}} if where == "values"
                            else {1: newest.event_end, 2: [value]})
                        result = counted(twin, crafted_to_broker(
                            twin, diff, now + 0.01), now + 0.01)
                        outcomes.setdefault(depth, set()).add(result)
        self.assertEqual(outcomes[MAX_DEPTH - 2], {(1, 0)})
        self.assertEqual(outcomes[MAX_DEPTH + 2], {(0, 1)})

    def test_event_index_near_uint64_max(self):
        """Events whose first index plus count reaches or passes 2**64 - 1
        are left to the Python code, which refuses them as it decides;
        those that fit are taken."""
        outcomes = set()
        for first, count in ((2**64 - 2, 1), (2**64 - 2, 2), (2**64 - 1, 0),
                             (2**64 - 1, 1), (2**64 - 3, 2)):
            twin, now = started()
            diff = cbor2.dumps({1: first, 2: ["x"] * count})
            outcomes.add(counted(twin, crafted_to_broker(
                twin, diff, now + 0.01, old="zero", throwaway="zero"),
                now + 0.01))
            for step, added in ((2, ["y"]), (3, [])):
                at = now + step / 100
                newest = twin.fast.broker._receiver.newest_state
                diff = cbor2.dumps({1: newest.event_end, 2: added})
                outcomes.add(counted(twin, crafted_to_broker(twin, diff, at),
                                     at))
        self.assertEqual(outcomes, {(1, 0), (0, 1)})

    def test_front_swapped_for_equal_current(self):
        """An ack that makes the front a state equal to (not the same
        object as) the current one swaps current for the front, in C as in
        Python."""
        twin, now = started()
        for value in (1, 2, 1):
            broker_sets(twin, lambda world, value=value:
                        DeviceState({"v": value}), now)
            now += 0.3
            twin.send("broker", now)  # never delivered
        sender = twin.fast.broker._sender
        acked = sender.sent_nums[2]  # the first {"v": 1}
        first = sender._sent[3 * 2 + 2]
        self.assertEqual((first, sender.current is first),
                         (sender.current, False))

        def numbers(broker):
            old, new, _, throwaway = next_state(broker)
            return old, new, acked, throwaway
        data = numbered_to_broker(twin, numbers, values_diff({"n": 5}),
                                  now + 0.01)
        self.assertEqual(counted(twin, data, now + 0.01), (1, 0))
        sender = twin.fast.broker._sender
        self.assertIs(sender.current, sender.front_state)

    def test_mindelay_clock_when_retransmitting(self):
        """Timers with a minimum-delay clock set while the current state is
        the last one sent (the retransmit branch) are computed in C as
        Python computes them."""
        twin, now = started()
        broker_sets(twin, lambda world: DeviceState({"v": 1}), now)
        now += 0.3
        twin.send("broker", now)  # never delivered
        now += 2.5  # past rto + ack_delay: a retransmit is due
        broker_sets(twin, lambda world: DeviceState({"v": 2}), now)
        broker_sets(twin, lambda world: world.broker._sender._sent[-1],
                    now + 0.001)
        sender = twin.fast.broker._sender
        self.assertIsNotNone(sender._mindelay_clock)
        self.assertIs(sender.current, sender._sent[-1])
        data = numbered_to_broker(twin, next_state, values_diff({"n": 6}),
                                  now + 0.002)
        self.assertEqual(counted(twin, data, now + 0.002), (1, 0))

    def test_more_sent_states_than_c_rationalizes(self):
        """A sender holding more than 64 sent states (a large
        sent_states_cap) is rationalized by the Python method, alike."""
        profile = dataclasses.replace(BROKER_PROFILE, sent_states_cap=100)
        twin, now = started(profile=profile)
        for value in range(70):
            broker_sets(twin, lambda world, value=value:
                        DeviceState({"v": value}), now)
            now += 0.3
            twin.send("broker", now)  # never delivered
        self.assertGreater(twin.fast.broker._sender.sent_count, 64)
        acked = twin.fast.broker._sender.sent_nums[2]

        def numbers(broker):
            old, new, _, throwaway = next_state(broker)
            return old, new, acked, throwaway
        data = numbered_to_broker(twin, numbers, values_diff({"n": 7}),
                                  now + 0.01)
        self.assertEqual(counted(twin, data, now + 0.01), (1, 0))
        self.assertGreater(twin.fast.broker._sender.sent_count, 64)
