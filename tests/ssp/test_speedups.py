"""Differential tests of the compiled receive path (broker.ssp._speedups).

THE RULE (docs of broker.ssp.speedups): for every input, a session
receiving through the compiled path ends in exactly the state a pure
session would and emits the same events. Every test here drives twin
worlds (tests.ssp.speedups_twins.Twin): the same scenario into a session
pair receiving fast and one forced pure, compared after every step, slot
by slot, byte by byte. Without the C module both run pure and the tests
still pass; with it, FastShareTests proves the fast path really ran.
"""

import dataclasses
import gc
import random
import sys
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import device_state, events, incoming, receiver
from broker.ssp.crypto import open_sealed
from broker.ssp.device_state import DeviceState
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.instruction import Instruction, decode_instruction
from broker.ssp.parking import Resumption

from tests.ssp.linksim import BROKER_ADDRESS, DEVICE_ADDRESS
from tests.ssp.speedups_crafting import (ACK_CHOICES, CBOR_DIFFS, CORRUPTIONS,
                                         NEW_CHOICES, OLD_CHOICES,
                                         PROTO_ODDITIES, THROWAWAY_CHOICES,
                                         ZLIB_ODDITIES, compress, corrupt,
                                         craft, protobuf, seal_from,
                                         timestamps, values_diff)
from tests.ssp.speedups_streams import random_ops, run_ops, usual_spec
from tests.ssp.speedups_twins import (CONFIGS, Divergence, Twin, TwinLink,
                                      World, fast_available, fast_counts,
                                      pure_path)

EMPTY = DeviceState.empty()
#: hypothesis: the machine is slow and shared.
FEW = settings(max_examples=10, deadline=None)

scalars = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)),
            max_size=12),
    st.binary(max_size=12),
    st.integers(-(2**64), 2**64 - 1),
    st.sampled_from([2**64 - 1, 2**64 - 2, 2**63, -(2**64), -(2**63) - 1,
                     23, 24, -24, -25, 0]),
    st.floats(allow_nan=False, width=16),
    st.floats(allow_nan=False, width=32),
    st.floats(allow_nan=False),
    st.sampled_from([0.0, -0.0, float("inf"), float("-inf")]),
    st.booleans())
values = st.one_of(scalars, st.none(),
                   st.lists(st.one_of(scalars, st.none()), max_size=3),
                   st.dictionaries(st.text(max_size=3), scalars, max_size=2))
keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",)),
               max_size=6)
patches = st.dictionaries(keys, values, min_size=1, max_size=4)


def established(config_name="broker", now=10.0, seed=0):
    """A twin whose device state {"a": 5, "b": "x"} the broker holds (and,
    holding acks, confirmed), and whose broker state {"cmd": 1} the device
    holds, both acknowledged. Returns (twin, link, now)."""
    twin = Twin(CONFIGS[config_name], now=now, seed=seed)
    link = TwinLink(twin, random.Random(seed))
    twin.set_state("device", {"a": 5, "b": "x"}, (), now)
    twin.set_state("broker", {"cmd": 1}, (), now)
    now = link.run_until(now + 2.0, now)
    return twin, link, now


def send_crafted(twin, link, spec, now, source=None):
    """One hand-made instruction (speedups_crafting.craft) into both worlds,
    then a usual exchange so that the sessions go on in lockstep."""
    out = twin.call(f"craft {spec!r}"[:300],
                    lambda world: craft(world, spec, now))
    side = spec["target"]
    if source is None:
        source = link.device_address if side == "broker" else BROKER_ADDRESS
    for data in out:
        twin.receive(side, data, source, now)
    return now


def spec_for(diff, target="broker", **more):
    spec = {"target": target, "old": "newest", "new": "next",
            "throwaway": "old", "ack": "front", "diff": diff}
    spec.update(more)
    return spec


class HarnessTests(SynchronousTestCase):
    """The twin notices what a wrong fast path would change."""

    def broken(self, mutate):
        """A fake compiled path: the pure receive, then ``mutate(session)``."""
        def fast(session, data, address, now):
            with pure_path():
                session.receive_datagram(data, address, now)
            mutate(session)
            return None
        return fast

    def run_with(self, fast):
        self.patch(incoming, "_fast_receive", fast)
        twin, link, now = established("broker")
        twin.set_state("device", {"a": 6}, (), now)
        link.run_until(now + 1.0, now)

    def test_pure_path_sets_and_restores(self):
        """pure_path() forces the pure path and restores the module global."""
        marker = object()
        self.patch(incoming, "_fast_receive", marker)
        with pure_path():
            self.assertIsNone(incoming._fast_receive)
        self.assertIs(incoming._fast_receive, marker)

    def test_catches_a_changed_float(self):
        """A fast path that leaves the smoothed RTT one ulp off is caught."""
        def nudge(session):
            rtt = session._link.rtt
            rtt._srtt_ms = rtt._srtt_ms + rtt._srtt_ms * 1e-16 + 1e-12
        error = self.assertRaises(Divergence, self.run_with,
                                  self.broken(nudge))
        self.assertIn("_link.rtt._srtt_ms", str(error))

    def test_catches_an_equal_value_of_another_type(self):
        """A value decoded as 5.0 where the pure path has 5 is caught."""
        def as_float(session):
            states = session._receiver._states
            newest = states[-1]
            if newest.values.get("a") == 6 and type(newest.values["a"]) is int:
                states[-1] = DeviceState._make(
                    dict(newest._values, a=6.0), newest._events,
                    newest._event_base)
        error = self.assertRaises(Divergence, self.run_with,
                                  self.broken(as_float))
        self.assertIn("_receiver._states", str(error))

    def test_catches_an_equal_copy(self):
        """A newest state equal to the pure one but not shared alike is
        caught (the identity pattern)."""
        def copy(session):
            states = session._receiver._states
            newest = states[-1]
            if newest.values.get("a") == 6:
                states[-1] = DeviceState._make(dict(newest._values),
                                               newest._events,
                                               newest._event_base)
        self.assertRaises(Divergence, self.run_with, self.broken(copy))

    def test_catches_a_lost_event(self):
        """A fast path that drops the StateReceived event is caught."""
        def forget(session):
            session._events = None
        error = self.assertRaises(Divergence, self.run_with,
                                  self.broken(forget))
        self.assertIn("events", str(error))


class StreamTests(SynchronousTestCase):
    """Random streams (state changes, heartbeats, loss, duplicates,
    reordering, delay, roams, replays, corruption, hand-made instructions,
    shutdowns) leave both worlds identical after every step."""

    def check(self, config_name, rng, count=80, seed=0):
        twin = Twin(CONFIGS[config_name], seed=seed)
        run_ops(twin, random_ops(rng, count), seed)
        self.assertGreater(twin.received["broker"], 0)

    @FEW
    @given(st.randoms(use_true_random=False))
    def test_broker_framing(self, rng):
        """Broker framing, the broker's profile, acks held until durable."""
        self.check("broker", rng)

    @FEW
    @given(st.randoms(use_true_random=False))
    def test_broker_framing_tight_bounds(self, rng):
        """Broker framing with bounds and a state cap small enough to hit."""
        self.check("broker-tight", rng)

    @FEW
    @given(st.randoms(use_true_random=False))
    def test_mosh_framing(self, rng):
        """Plain mosh framing with the MOSH profile."""
        self.check("mosh", rng)

    @FEW
    @given(st.randoms(use_true_random=False), st.sampled_from(
        ["fleet", "mosh-tight", "broker-unheld"]))
    def test_other_configurations(self, rng, config_name):
        """FLEET over plain mosh, mosh's quench, and unheld broker acks."""
        self.check(config_name, rng)

    def test_fixed_seeds(self):
        """Long streams from fixed seeds, every configuration."""
        for config_name in sorted(CONFIGS):
            for seed in (1, 2):
                self.check(config_name, random.Random(seed), 150, seed)


class ValueTests(SynchronousTestCase):
    """Every scalar kind (half floats, -0.0, ints near 2**64, bytes,
    unicode, deletes) and nested values arrive alike both ways."""

    def exchange(self, config_name, changes, side):
        """Each patch set by ``side``'s application and exchanged, then
        sent again as the instruction the compiled path takes."""
        twin, link, now = established(config_name)
        target = "broker" if side == "device" else "device"
        for patch in changes:
            twin.set_state(side, patch, (), now)
            now = link.run_until(now + 0.3, now)
            send_crafted(twin, link, spec_for(values_diff(patch), target), now)
            now = link.run_until(now + 0.3, now)
        self.assertEqual(
            twin.fast.session(target).latest_remote_state,
            twin.pure.session(target).latest_remote_state)

    @FEW
    @given(st.lists(patches, min_size=1, max_size=4))
    def test_device_values_broker_framing(self, changes):
        """Device values through the broker's sessions."""
        self.exchange("broker", changes, "device")

    @FEW
    @given(st.lists(patches, min_size=1, max_size=4))
    def test_device_values_mosh_framing(self, changes):
        """Device values through plain mosh sessions."""
        self.exchange("mosh", changes, "device")

    @FEW
    @given(st.lists(patches, min_size=1, max_size=4))
    def test_desired_values_to_device(self, changes):
        """The broker's desired values into the device, whose acks move
        the broker's sender."""
        self.exchange("broker", changes, "broker")

    def test_events_and_values_together(self):
        """Diffs with events (handed over in phase 1) alike."""
        twin, link, now = established("broker")
        for n in range(5):
            twin.set_state("device", {"n": n}, ({"kind": "tick", "i": n},),
                           now)
            now = link.run_until(now + 0.2, now)
        self.assertEqual(twin.fast.broker.latest_remote_state.event_end, 5)


class CraftTests(SynchronousTestCase):
    """Hand-made instructions: every unusual encoding and number."""

    def test_every_cbor_diff(self):
        """Each diff shape (canonical or not, tags, indefinite lengths,
        duplicates, NaN, bad UTF-8, odd keys, nested, events) alike, into
        the broker and the device, in both framings."""
        for config_name in ("broker", "mosh", "broker-tight"):
            for target in ("broker", "device"):
                twin, link, now = established(config_name)
                for name, diff in sorted(CBOR_DIFFS.items()):
                    now = send_crafted(twin, link, spec_for(diff, target),
                                       now)
                    now = link.run_until(now + 0.15, now)
                self.assertEqual(twin.fast.session(target).closed, False)

    def test_every_protobuf_oddity(self):
        """Unknown, repeated, reordered, non-minimal, wide or missing
        protobuf fields alike."""
        for config_name in ("broker", "mosh"):
            twin, link, now = established(config_name)
            for oddity in PROTO_ODDITIES:
                for diff in (b"", CBOR_DIFFS["one_int"],
                             CBOR_DIFFS["every_scalar"]):
                    for target in ("broker", "device"):
                        send_crafted(twin, link,
                                     spec_for(diff, target, proto=oddity),
                                     now)
                    now = link.run_until(now + 0.15, now)

    def test_every_zlib_oddity(self):
        """Other compression levels, trailing bytes, truncated or foreign
        streams alike."""
        twin, link, now = established("broker")
        for oddity in ZLIB_ODDITIES:
            for target in ("broker", "device"):
                send_crafted(twin, link, spec_for(
                    CBOR_DIFFS["one_int"], target, zlib=oddity), now)
            now = link.run_until(now + 0.15, now)

    def test_fragments(self):
        """Instructions in several fragments, in order, reversed,
        duplicated, incomplete or never final, alike."""
        for config_name in ("broker", "mosh"):
            twin, link, now = established(config_name)
            for count in (1, 2, 3):
                for order in ("in", "reversed", "duplicate", "missing",
                              "not_final"):
                    send_crafted(twin, link, spec_for(
                        CBOR_DIFFS["every_scalar"], "broker",
                        fragments=count, order=order), now)
                    now = link.run_until(now + 0.15, now)

    def test_every_number_relation(self):
        """Every old/new/throwaway/ack relation (unknown reference,
        duplicates, older states, throwaway above newest, acks moving the
        front, UINT64_MAX) alike."""
        diffs = (b"", CBOR_DIFFS["one_int"], CBOR_DIFFS["same_value"])
        for config_name in ("broker", "mosh-tight"):
            twin, link, now = established(config_name)
            step = 0
            for old in sorted(set(OLD_CHOICES)):
                for new in sorted(set(NEW_CHOICES) - {"max"}):
                    for throwaway in sorted(set(THROWAWAY_CHOICES)):
                        for ack in sorted(set(ACK_CHOICES)):
                            step += 1
                            spec = spec_for(diffs[step % 3],
                                            ("broker", "device")[step % 2],
                                            old=old, new=new,
                                            throwaway=throwaway, ack=ack)
                            send_crafted(twin, link, spec, now)
                    twin.set_state("device", {"step": step}, (), now)
                    twin.set_state("broker", {"step": step}, (), now)
                    now = link.run_until(now + 0.2, now)

    def test_plaintext_oddities(self):
        """Short plaintexts (0..13 bytes), missing timestamps, echoed
        timestamps and the wrong direction bit alike."""
        twin, link, now = established("broker")
        for target in ("broker", "device"):
            for length in range(14):
                send_crafted(twin, link, spec_for(
                    CBOR_DIFFS["one_int"], target, plaintext="short",
                    short=length), now)
            for kind in ("no_ts", "reply"):
                send_crafted(twin, link, spec_for(
                    CBOR_DIFFS["one_int"], target, plaintext=kind), now)
            send_crafted(twin, link, spec_for(
                CBOR_DIFFS["one_int"], target, direction="wrong"), now)
            now = link.run_until(now + 0.15, now)

    def test_stale_and_strange_sources(self):
        """Authentic datagrams older than the expected sequence number, from
        the peer's address or another one, and the first datagram of a
        broker that has no address yet, alike."""
        twin = Twin(CONFIGS["broker"])
        twin.set_state("device", {"a": 1}, (), 10.0)
        sent = twin.send("device", 10.0)
        twin.receive("broker", sent[0][0], ("192.0.2.50", 1), 10.0)
        twin.receive("broker", sent[0][0], DEVICE_ADDRESS, 10.01)
        link = TwinLink(twin, random.Random(3))
        now = link.run_until(11.0, 10.01)
        old = twin.call("seal stale", lambda world: seal_from(
            world.device, timestamps(now) + b"\x00" * 7 + b"\x09\x80\x00"
            + compress(protobuf(usual_inst(world.broker))), seq=0))
        for source in (DEVICE_ADDRESS, ("192.0.2.77", 5)):
            twin.receive("broker", old, source, now)
        link.run_until(now + 1.0, now)

    def test_roams_on_the_fast_path(self):
        """A usual datagram from a new address (a roam) and back alike."""
        twin, link, now = established("broker")
        for address in (("192.0.2.10", 40001), ("2001:db8::10", 4),
                        DEVICE_ADDRESS):
            link.device_address = address
            twin.set_state("device", {"a": address[1]}, (), now)
            now = link.run_until(now + 0.5, now)
        self.assertEqual(twin.fast.broker.remote_address, DEVICE_ADDRESS)

    def test_queue_caps(self):
        """States that are never thrown away reach the receiver's cap (the
        bounded evict, mosh's quench) alike."""
        for config_name in ("broker-tight", "mosh-tight"):
            twin, link, now = established(config_name)
            for n in range(8):
                send_crafted(twin, link, spec_for(
                    CBOR_DIFFS["one_int"] if n % 2 else b"", "broker",
                    throwaway="zero"), now)
                send_crafted(twin, link, spec_for(
                    b"", "broker", throwaway="zero", old="oldest"), now)
                now += 0.05
            link.run_until(now + 20.0, now)

    def test_held_acks_overflow(self):
        """More unconfirmed states than the held-ack list keeps, then the
        confirmations, alike."""
        twin, link, now = established("broker")
        for n in range(12):
            send_crafted(twin, link, spec_for(
                CBOR_DIFFS["one_int"] if n % 3 else b"\xa1\x00\xa1\x61\x61"
                + bytes([n]), "broker", throwaway="newest"), now)
            now += 0.01
        for num in (3, 9, 12, 30):
            twin.confirm(twin.fast.broker.latest_remote_num - 30 + num)
        link.run_until(now + 1.0, now)

    def test_peer_shutdown(self):
        """A crafted shutdown state (new_num UINT64_MAX), then the real
        handshakes both ways, alike."""
        for config_name in ("broker", "mosh"):
            twin, link, now = established(config_name)
            send_crafted(twin, link, spec_for(b"", "broker", new="max"), now)
            now = link.run_until(now + 2.0, now)
            twin2, link2, now2 = established(config_name, seed=4)
            twin2.call("device.start_shutdown", lambda world:
                       world.device.start_shutdown(now2))
            link2.run_until(now2 + 12.0, now2)
            self.assertTrue(twin2.fast.broker.closed
                            or twin2.fast.device.closed)
            twin3, link3, now3 = established(config_name, seed=5)
            twin3.call("broker.start_shutdown", lambda world:
                       world.broker.start_shutdown(now3))
            link3.run_until(now3 + 12.0, now3)

    def test_resumed_broker(self):
        """A broker session resumed after a restart (ResumedReceiver, held
        acks) alike."""
        remote = DeviceState({"a": 1})
        config = dataclasses.replace(
            CONFIGS["broker"], name="broker-resumed",
            device_options=(("first_seq", 50),),
            broker_options=(("resume", Resumption(5, remote, 100, 0)),))
        twin = Twin(config)
        link = TwinLink(twin, random.Random(7))
        now = 10.0
        for n in range(6):
            twin.set_state("device", {"a": n}, (), now)
            now = link.run_until(now + 0.4, now)


def usual_inst(session, diff=CBOR_DIFFS["one_int"]):
    """The instruction the fast path takes: the next state after the newest
    held, acking the sender's front."""
    newest = session._receiver.newest_num
    return Instruction(old_num=newest, new_num=min(newest + 1, 2**64 - 1),
                       ack_num=session._sender.front_num,
                       throwaway_num=newest, diff=diff)


class CorruptionTests(SynchronousTestCase):
    """Damaged copies of real datagrams (flipped bits, truncations, wrong
    headers, reflections, splices, garbage) alike."""

    def test_every_corruption(self):
        """Each corruption of each recorded datagram, both framings."""
        rng = random.Random(11)
        for config_name in ("broker", "mosh"):
            twin, link, now = established(config_name)
            history = list(link.history)
            for index, (side, data, source) in enumerate(history[:12]):
                for kind in CORRUPTIONS:
                    target = side
                    if kind == "reflect":
                        target = "device" if side == "broker" else "broker"
                    other = history[rng.randrange(len(history))][1]
                    damaged = corrupt(data, kind, rng.randrange(1 << 16),
                                      rng.randbytes(rng.randrange(30)),
                                      twin.config.framing, other)
                    twin.receive(target, damaged, source, now)
                # And the original again: a replay.
                twin.receive(side, data, source, now)
                now = link.run_until(now + 0.1, now)


class FastShareTests(SynchronousTestCase):
    """The twins compare something: the compiled path runs where built."""

    def test_fast_shaped_stream_taken(self):
        """Instructions of the fast case (next state from the newest held,
        acking the front, small canonical values diffs and heartbeats) are
        taken whole by the compiled path, into the broker and the device,
        in both framings; without it counts() stays (0, 0)."""
        before = fast_counts()
        received = 0
        rng = random.Random(8)
        for config_name in ("broker", "mosh"):
            twin, link, now = established(config_name)
            for n in range(40):
                spec = usual_spec(rng, ("broker", "device")[n % 2])
                send_crafted(twin, link, spec, now)
                received += 1
                now += 0.01
        taken, handed = (after - first for after, first
                         in zip(fast_counts(), before))
        if not fast_available():
            self.assertEqual((taken, handed), (0, 0))
            return
        self.assertGreaterEqual(taken, received * 9 // 10,
                                f"fast {taken}, handed over {handed}, "
                                f"fast-shaped {received}")

    def test_usual_stream(self):
        """On a usual broker stream (small value changes, acks confirmed)
        the compiled path takes at least half of the receives that have the
        fast case's shape (SPEC: next state from the newest held, acking
        the sender's front); without it counts() stays (0, 0)."""
        before = fast_counts()
        twin, link, now = established("broker")
        shaped = [0]
        receive = twin.receive

        def counting(side, data, source, when, congestion=False):
            shaped[0] += fast_shaped(twin.fast.session(side), data)
            receive(side, data, source, when, congestion)
        twin.receive = counting
        for n in range(40):
            twin.set_state("device", {"n": n, "temp": 20.0 + n / 10}, (),
                           now)
            now = link.run_until(now + (0.05, 1.0)[n % 2], now)
        taken, handed = (after - first for after, first
                         in zip(fast_counts(), before))
        if not fast_available():
            self.assertEqual((taken, handed), (0, 0))
            return
        self.assertGreaterEqual(taken, shaped[0] // 2,
                                f"fast {taken}, handed over {handed}, "
                                f"fast-shaped {shaped[0]}")


def fast_shaped(session, data) -> bool:
    """Whether a datagram has the numbers of the fast case (SPEC): one
    fragment, the next state from the newest held, acking the front."""
    data = bytes(data)
    if session._header is not None:
        data = data[len(session._header):]
    try:
        _, _, plaintext = open_sealed(session._ciphers.get(session._key),
                                      data)
        if plaintext[12:14] != b"\x80\x00":
            return False
        inst = decode_instruction(plaintext[14:])
    except DatagramDropped:
        return False
    newest = session._receiver.newest_num
    return (inst.ack_num == session._sender.front_num
            and inst.old_num == newest and inst.new_num > newest
            and inst.throwaway_num <= newest)


class CrashLeakTests(SynchronousTestCase):
    """Random damage never raises from receive_datagram, and costs no
    memory per datagram."""

    def mutated(self, rng, sender, receiver_session, now):
        """One datagram for ``receiver_session``, damaged at a random layer
        (CBOR, protobuf, zlib, plaintext, or the sealed bytes)."""
        diff = CBOR_DIFFS[rng.choice(sorted(CBOR_DIFFS))]
        layer = rng.randrange(6)
        if layer == 0 and diff:
            diff = flip(rng, diff)
        inst = usual_inst(receiver_session, diff)
        raw = protobuf(inst, rng.choice(PROTO_ODDITIES)
                       if rng.random() < 0.2 else "plain")
        if layer == 1:
            raw = flip(rng, raw)
        compressed = compress(raw)
        if layer == 2:
            compressed = flip(rng, compressed)
        plaintext = (timestamps(now, rng.choice((0xFFFF, rng.randrange(65536))))
                     + b"\x00" * 7 + bytes([rng.randrange(256)]) + b"\x80\x00"
                     + compressed)
        if layer == 3:
            plaintext = flip(rng, plaintext)[:rng.randrange(len(plaintext) + 1)]
        data = seal_from(sender, plaintext)
        if layer == 4:
            data = flip(rng, data)
        return data

    def test_twenty_thousand_mutations_never_raise(self):
        """20,000 damaged datagrams into one (fast, where built) broker
        session: no exception, every one accounted for."""
        world = World(CONFIGS["broker"], False, 10.0)
        rng = random.Random(20000)
        now = 10.0
        outcomes = 0
        for n in range(20000):
            now += 0.001
            data = self.mutated(rng, world.device, world.broker, now)
            address = DEVICE_ADDRESS if n % 50 else ("192.0.2.10", n)
            world.broker.receive_datagram(data, address, now)
            found = world.broker.pop_events()
            outcomes += len(found)
            if n % 97 == 0:
                for event in found:
                    if type(event) is events.StateReceived:
                        world.broker.confirm_durable(event.num)
        self.assertGreater(outcomes, 1000)
        self.assertGreater(world.broker.latest_remote_num, 0)

    def test_no_memory_growth(self):
        """After a warm-up, 10,000 more receives (taken and refused) grow
        traced memory by no more than noise, and shared objects' reference
        counts stay put."""
        world = World(CONFIGS["broker-unheld"], False, 10.0)
        rng = random.Random(5)
        session = world.broker
        now = [10.0]

        def feed(count):
            for n in range(count):
                now[0] += 0.001
                diff = CBOR_DIFFS[("one_int", "every_scalar", "delete",
                                   "heartbeat", "half_neg_zero", "uint_max",
                                   "bare_int", "invalid_utf8_value")[n % 8]]
                inst = usual_inst(session, diff)
                plaintext = (timestamps(now[0], 0xFFFF) + b"\x00" * 7
                             + b"\x01\x80\x00" + compress(protobuf(inst)))
                data = seal_from(world.device, plaintext)
                if n % 5 == 4:
                    data = flip(rng, data)
                session.receive_datagram(data, DEVICE_ADDRESS, now[0])
                session.pop_events()

        shared = (receiver.UNCHANGED, device_state._NO_VALUES, DeviceState,
                  events.StateReceived, events.DatagramRejected,
                  DropReason.AUTH_FAILED, DropReason.BAD_DIFF, session._key,
                  session._header, session._sender._profile, session,
                  session._link, session._ciphers.get(session._key))
        feed(3000)
        gc.collect()
        counts = [sys.getrefcount(item) for item in shared]
        tracemalloc.start()
        try:
            feed(2000)
            gc.collect()
            first, _ = tracemalloc.get_traced_memory()
            feed(10000)
            gc.collect()
            second, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(second - first, 20000,
                        f"{second - first} bytes more after 10,000 receives")
        self.assertEqual([sys.getrefcount(item) for item in shared], counts)


def flip(rng, data: bytes) -> bytes:
    """``data`` with 1..3 random bytes changed (kept as long)."""
    if not data:
        return data
    damaged = bytearray(data)
    for _ in range(1 + rng.randrange(3)):
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)
