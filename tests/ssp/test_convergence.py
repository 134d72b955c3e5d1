"""Property tests: two sessions over a hostile link converge, and no
datagram a peer can send makes the core raise."""

import random
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import events
from broker.ssp.crypto import TO_SERVER, CipherCache, seal
from broker.ssp.device_state import DeviceState
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.instruction import (Instruction, encode_instruction,
                                    serialize_instruction)
from broker.ssp.profile import FLEET, MOSH

from tests.ssp.linksim import (ConfirmingLink, OutputChecker,
                               RecordingCiphers, broker_pair)

SETTINGS = settings(max_examples=50, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow])

_keys = st.sampled_from(["t", "h", "mode", "fw"])
_values = st.one_of(st.none(), st.integers(-5, 1000), st.text(max_size=8),
                    st.booleans())
_change = st.tuples(st.dictionaries(_keys, _values, max_size=3),
                    st.lists(st.integers(0, 10**6), max_size=3))
_action = st.one_of(
    st.tuples(st.just("device"), _change),
    st.tuples(st.just("broker"), _change),
    st.tuples(st.just("wait"), st.floats(0.0, 30.0)),
    st.tuples(st.just("roam"), st.integers(1, 250)),
)


class EventLog:
    """Collects the events carried by StateReceived, by absolute index,
    failing on a gap or on a different event at a known index."""

    def __init__(self, test):
        self.test = test
        self.delivered = []

    def take(self, state):
        for offset, event in enumerate(state.events):
            index = state.event_base + offset
            if index < len(self.delivered):
                self.test.assertEqual(self.delivered[index], event)
            else:
                self.test.assertEqual(index, len(self.delivered),
                                      "event gap")
                self.delivered.append(event)


class ConvergenceTests(SynchronousTestCase):
    """Device and broker sessions over a lossy, duplicating, reordering,
    delaying, roaming link."""

    @SETTINGS
    @given(script=st.lists(_action, min_size=1, max_size=10),
           seed=st.integers(0, 2**32 - 1),
           loss=st.floats(0.0, 0.5),
           duplicate=st.floats(0.0, 0.3),
           jitter=st.floats(0.0, 0.5),
           hold_acks=st.booleans(),
           profile=st.sampled_from([FLEET, MOSH]))
    def test_sessions_converge(self, script, seed, loss, duplicate, jitter,
                               hold_acks, profile):
        """Whatever the link does, once it heals both ends hold each other's
        latest values, every event arrives once and in order, no (key,
        nonce) pair is ever sealed twice, and no datagram sent could make a
        mosh peer abort."""
        now = 100.0
        ciphers = RecordingCiphers()
        device, broker = broker_pair(now, ciphers=ciphers, seed=seed,
                                     ack_requires_confirm=hold_acks,
                                     profile=profile)
        link = ConfirmingLink(device, broker, rng=random.Random(seed),
                              loss=loss, duplicate=duplicate,
                              delay=(0.002, 0.002 + jitter))
        link.inspect = checker = OutputChecker(self)
        models = {"device": DeviceState.empty(),
                  "broker": DeviceState.empty()}
        sessions = {"device": device, "broker": broker}
        for kind, argument in script:
            if kind in models:
                patch, new_events = argument
                model = models[kind].with_values(patch).with_events(
                    *new_events)
                models[kind] = model
                sessions[kind].set_local_state(model, now)
                step = 0.5
            elif kind == "roam":
                link.device_address = ("198.51.100.%d" % argument, 40000)
                step = 0.5
            else:
                step = argument
            now = link.run_until(now + step, now)
        link.loss = link.duplicate = 0.0
        now = link.run_until(now + 90.0, now)

        self.assertEqual(dict(broker.latest_remote_state.values),
                         dict(models["device"].values))
        self.assertEqual(dict(device.latest_remote_state.values),
                         dict(models["broker"].values))
        for received, model in ((link.broker_events, models["device"]),
                                (link.device_events, models["broker"])):
            log = EventLog(self)
            for event in received:
                if isinstance(event, events.StateReceived):
                    log.take(event.state)
            self.assertEqual(tuple(log.delivered), model.events)
        self.assertEqual(broker.remote_address, link.device_address)
        self.assertEqual(len(ciphers.sealed), len(set(ciphers.sealed)))
        self.assertGreater(checker.instructions, 0)
        self.assertEqual([e for e in link.device_events
                          if isinstance(e, events.DatagramRejected)], [])


class FuzzTests(SynchronousTestCase):
    """Nothing a peer sends raises out of receive_datagram."""

    def setUp(self):
        self.device, self.broker = broker_pair(10.0)
        [(self.valid, _)] = self.device.datagrams_to_send(10.0)
        self.header = self.valid[:HEADER_SIZE]
        self.cipher = CipherCache().get(self.broker.key)
        self.seq = 1000

    def dropped(self):
        """Drops since the last pop_events."""
        return sum(self.broker.drops.values())

    @SETTINGS
    @given(data=st.binary(max_size=120), with_header=st.booleans())
    def test_random_bytes_dropped_and_counted(self, data, with_header):
        """Random bytes (with or without our header) are each dropped and
        counted exactly once."""
        if with_header:
            data = self.header + data
        before = self.dropped()
        self.broker.receive_datagram(data, ("192.0.2.5", 1), 10.0)
        self.assertEqual(self.dropped(), before + 1)
        self.assertIsNone(self.broker.remote_address)

    @SETTINGS
    @given(position=st.integers(0, 200), value=st.integers(1, 255),
           cut=st.integers(0, 200), tail=st.binary(max_size=8))
    def test_mutated_datagrams_dropped_and_counted(self, position, value,
                                                   cut, tail):
        """A valid datagram with a byte changed, cut short or extended is
        dropped and counted exactly once."""
        data = bytearray(self.valid)
        data[position % len(data)] ^= value
        for mutated in (bytes(data), self.valid[:cut % len(self.valid)],
                        self.valid + tail):
            if mutated == self.valid:
                continue
            before = self.dropped()
            self.broker.receive_datagram(mutated, ("192.0.2.5", 1), 10.0)
            self.assertEqual(self.dropped(), before + 1)

    def authentic(self, payload):
        """An authentic datagram to the broker carrying ``payload``."""
        self.seq += 1
        return seal(self.cipher, TO_SERVER, self.seq,
                    b"\x00\x01\x00\x02" + payload, self.header)

    @SETTINGS
    @given(kind=st.sampled_from(["raw", "fragment", "zlib", "protobuf",
                                 "instruction"]),
           blob=st.binary(max_size=64),
           number=st.integers(0, 2**16 - 1),
           nums=st.tuples(*[st.integers(0, 2**64 - 1)] * 4),
           version=st.sampled_from([2, 2, 2, 0, 3]))
    def test_authentic_malformed_never_raises(self, kind, blob, number,
                                              nums, version):
        """Authentic datagrams with any fragment, zlib, protobuf or
        instruction content never raise; refusals are counted."""
        if kind == "raw":
            payload = blob
        else:
            if kind == "fragment":
                body = blob
            elif kind == "zlib":
                body = zlib.compress(blob)
            elif kind == "protobuf":
                body = zlib.compress(serialize_instruction(
                    Instruction(protocol_version=version, diff=blob)) + blob)
            else:
                old, new, ack, throwaway = nums
                body = encode_instruction(Instruction(
                    protocol_version=version, old_num=old % 4,
                    new_num=new % 8 if number & 1 else new,
                    ack_num=ack % 4, throwaway_num=throwaway % 6,
                    diff=blob))
            payload = (number.to_bytes(8, "big") + number.to_bytes(2, "big")
                       + body)
        before = self.dropped()
        self.broker.receive_datagram(self.authentic(payload),
                                     ("192.0.2.5", 1), 10.0)
        self.broker.datagrams_to_send(10.0)
        dropped = self.dropped() - before
        self.assertIn(dropped, (0, 1))
        rejected = [e for e in self.broker.pop_events()
                    if isinstance(e, events.DatagramRejected)]
        self.assertEqual(len(rejected), dropped)
        self.assertEqual(self.dropped(), 0)  # forgotten by pop_events
