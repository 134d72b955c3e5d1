"""Tests for broker.ssp.device_state and the diff layout in docs/protocol.md."""

import operator
import os
import re
import struct
import zlib

import cbor2
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import speedups, transportinstruction_pb2
from broker.ssp.device_state import (MAX_DEPTH, DeviceState, encode,
                                      freeze, same, thaw)
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.state import State, is_state_type, replay_diffs

PROTOCOL_MD = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                           "docs", "protocol.md")

EXAMPLE_1 = ("a300a262667765312e322e306474656d70f94d6001000281a1646b696e6464626f"
             "6f74")
EXAMPLE_2 = ("a300a3626677f6636c65648318ff00106474656d701601010282a2616e01646b69"
             "6e6466627574746f6ea2616e02646b696e6466627574746f6e")
EXAMPLE_3 = ("a300a2636c65648318ff00106474656d701601030281a2646b696e6465616c6172"
             "6d656c6576656c22")
EXAMPLE_4 = "a100a16474656d70f94d90"
DROPPED = ["ff", "a000", "80", "a10305", "a1010a", "a100a10101",
           "a100a16174f97e00", "a100a2616101616102", "a2010002816161",
           "a2010502816161"]

SECRET = "ab49f5130ea4aa927c4fbc576d6cf740"
SESSION_KEY = "50c070d27d1bb5f8fdd1a3dfce78cae6"
HEADER = "01000000000000002a000000071234abcd"
SERIALIZED = ("080210001801200028003223a300a262667765312e322e306474656d70f94d6001"
              "000281a1646b696e6464626f6f743a00")
ZLIB = ("789ce360126090605460d06030525eccb02829ad3cd550cf48cf20a52435b7e0a76f"
        "02230353e3c294ecccbc9494a4fcfc122b06001dee0dea")
PLAINTEXT = "03e8ffff00000000000000018000" + ZLIB
WIRE = (HEADER + "00000000000000001f9109486d75edd8fd23f290e5550d91a5147f93655240"
        "92bdf0fe8513ea60672b3e02a593b87f48593b60929e89f2d91df546e4539595ba7d37"
        "76f4b97dd844f410b3ac3a4001661ba894d261921dca28ce1fd0138bb7")


def example_states():
    """The states of docs/protocol.md section 5.2, examples 1 to 4."""
    s1 = (DeviceState.empty().with_values({"fw": "1.2.0", "temp": 21.5})
          .with_events({"kind": "boot"}))
    s2 = (s1.with_values({"fw": None, "led": [255, 0, 16], "temp": 22})
          .with_events({"kind": "button", "n": 1}, {"kind": "button", "n": 2}))
    s3 = s2.subtract(s2).with_events({"kind": "alarm", "level": -3})
    s4 = s2.with_values({"temp": 22.25})
    return s1, s2, s3, s4


try:
    from broker.ssp import _speedups
except ImportError:     # not built: the twin comparisons are skipped
    _speedups = None

class DeviceStateTests(SynchronousTestCase):
    """Values, events and subtract of DeviceState."""

    def test_contract(self):
        """DeviceState offers the whole State contract."""
        self.assertTrue(is_state_type(DeviceState))
        self.assertIsInstance(DeviceState.empty(), State)

    def test_empty_is_a_singleton(self):
        """empty() is one shared object equal to a freshly built empty state."""
        self.assertIs(DeviceState.empty(), DeviceState.empty())
        self.assertEqual(DeviceState(), DeviceState.empty())
        self.assertEqual(DeviceState.empty().event_end, 0)

    def test_merge_and_delete(self):
        """with_values merges, and None deletes a key."""
        state = DeviceState({"a": 1, "b": 2}).with_values({"b": None, "c": 3})
        self.assertEqual(dict(state.values), {"a": 1, "c": 3})

    def test_unchanged_patch_returns_same_state(self):
        """A patch that changes nothing returns the same object (shared)."""
        state = DeviceState({"a": 1})
        self.assertIs(state.with_values({"a": 1, "gone": None}), state)
        self.assertIs(state.with_events(), state)

    def test_values_are_frozen(self):
        """Arrays become tuples and maps read-only, so states can share them."""
        state = DeviceState({"a": [1, {"x": [2]}]})
        value = state.values["a"]
        self.assertEqual(thaw(value), [1, {"x": [2]}])
        self.assertIsInstance(value, tuple)
        self.assertRaises(TypeError, operator.setitem, value[1], "x", 3)
        self.assertRaises(TypeError, operator.setitem, state.values, "b", 1)

    def test_events_share_values(self):
        """Appending events keeps the very same values mapping."""
        state = DeviceState({"a": 1})
        self.assertIs(state.with_events("e")._values, state._values)

    def test_bool_is_not_int(self):
        """Changing 1 to True is a change, and it is carried by the diff."""
        one = DeviceState({"a": 1})
        true = one.with_values({"a": True})
        self.assertNotEqual(one, true)
        self.assertIs(one.apply(true.diff_from(one)).values["a"], True)

    def test_negative_zero_is_a_change(self):
        """-0.0 and 0.0 differ on the wire, so the state changes."""
        zero = DeviceState({"a": 0.0})
        self.assertNotEqual(zero.with_values({"a": -0.0}), zero)

    def test_local_bad_values_raise(self):
        """Values CBOR cannot carry as a device state are refused at once."""
        state = DeviceState.empty()
        self.assertRaises(ValueError, state.with_values, {"a": float("nan")})
        self.assertRaises(ValueError, state.with_values, {"a": 2**64})
        self.assertRaises(TypeError, state.with_values, {"a": {1: 2}})
        self.assertRaises(TypeError, state.with_values, {"a": {1, 2}})
        self.assertRaises(TypeError, state.with_values, {1: "a"})
        self.assertRaises(TypeError, state.with_events, None)
        deep = 0
        for _ in range(MAX_DEPTH + 1):
            deep = [deep]
        self.assertRaises(ValueError, state.with_values, {"a": deep})

    def test_subtract_keeps_absolute_indexes(self):
        """subtract drops acknowledged events; indexes stay absolute."""
        acked = DeviceState.empty().with_events("e0", "e1")
        later = acked.with_events("e2")
        rest = later.subtract(acked)
        self.assertEqual((rest.event_base, rest.events, rest.event_end),
                         (2, ("e2",), 3))
        self.assertEqual(rest.events_since(0), ("e2",))
        self.assertEqual(rest.events_since(3), ())
        self.assertIs(rest.subtract(acked), rest)

    def test_equal_states_have_empty_diff(self):
        """The diff between equal states is empty and applies as no change."""
        state = DeviceState({"a": [1]}, events=["x"])
        self.assertEqual(state.diff_from(DeviceState({"a": [1]}, ["x"])), b"")
        self.assertIs(state.apply(b""), state)

    def test_diff_from_non_ancestor_raises(self):
        """Diffing from a state that is not an ancestor is a programming error."""
        newer = DeviceState.empty().with_events("a", "b")
        older = DeviceState.empty().with_events("a")
        self.assertRaises(ValueError, older.diff_from, newer)
        acked = newer.subtract(newer).with_events("c")
        self.assertRaises(ValueError, acked.diff_from, older)

    def test_events_exactly_once_across_subtract(self):
        """Events reach the receiver once each, in order, despite acks and loss."""
        sender = DeviceState.empty()
        acked_sender = acked_receiver = DeviceState.empty()
        delivered = []
        for round_number in range(6):
            sender = sender.with_events(*[f"{round_number}.{i}"
                                          for i in range(round_number)])
            diff = sender.diff_from(acked_sender)
            if round_number % 2:
                continue  # lost datagram: the next diff carries these too
            received = acked_receiver.apply(diff)
            delivered.extend(received.events_since(acked_receiver.event_end))
            acked_receiver = received.subtract(received)
            acked_sender, sender = sender, sender.subtract(sender)
        expected = [f"{r}.{i}" for r in range(5) for i in range(r)]
        self.assertEqual(delivered, expected)
        self.assertEqual(acked_receiver.event_end, len(expected))


class DecoderReuseTests(SynchronousTestCase):
    """Diffs are decoded by reused CBOR decoders: nothing carries over."""

    def test_shared_values_do_not_leak(self):
        """A value marked shareable (tag 28) is refused, so is a shared
        reference (tag 29) after it, and the reused decoder still takes a
        plain diff."""
        state = DeviceState.empty()
        marked = bytes.fromhex("a100a16161d81c8101")  # {0: {"a": 28([1])}}
        leak = bytes.fromhex("a100a16162d81d00")  # {0: {"b": 29(0)}}
        for diff in (marked, leak):
            with self.assertRaises(DatagramDropped) as caught:
                state.apply(diff)
            self.assertEqual(caught.exception.reason, DropReason.BAD_DIFF)
        plain = bytes.fromhex("a100a161618101")  # {0: {"a": [1]}}
        self.assertEqual(thaw(state.apply(plain).values), {"a": [1]})

    def test_limits_hold_after_a_failure(self):
        """After a refused diff the next ones get the same checks: depth,
        duplicate keys, bytes after the item."""
        state = DeviceState.empty()
        deep = bytes.fromhex("a100a16161") + b"\x81" * 40 + b"\x01"
        for diff in (deep, bytes.fromhex("a100a2616101616102"),
                     bytes.fromhex("a100a1616101") + b"\x00", deep):
            with self.assertRaises(DatagramDropped) as caught:
                state.apply(diff)
            self.assertEqual(caught.exception.reason, DropReason.BAD_DIFF)
        good = bytes.fromhex("a100a1616101")
        self.assertEqual(thaw(state.apply(good).values), {"a": 1})

    def test_wire_equality(self):
        """== is wire equality: 1 is not True, 0.0 is not -0.0, and equal
        values in other objects are equal."""
        make = DeviceState
        self.assertNotEqual(make({"a": 1}), make({"a": True}))
        self.assertNotEqual(make({"a": 0.0}), make({"a": -0.0}))
        self.assertNotEqual(make({"a": [1]}), make({"a": [True]}))
        self.assertNotEqual(make(events=[1]), make(events=[True]))
        self.assertEqual(make({"a": [1, {"b": 2.5}]}, events=["x"]),
                         make({"a": [1, {"b": 2.5}]}, events=["x"]))


class DiffVectorTests(SynchronousTestCase):
    """The byte examples of docs/protocol.md, encoded and decoded exactly."""

    def setUp(self):
        with open(PROTOCOL_MD, encoding="utf-8") as doc:
            self.doc = doc.read()

    def test_examples_encode_exactly(self):
        """Each documented diff is the exact encoding of its state change."""
        s1, s2, s3, s4 = example_states()
        empty = DeviceState.empty()
        for new, old, expected in [(s1, empty, EXAMPLE_1), (s2, s1, EXAMPLE_2),
                                   (s3, empty, EXAMPLE_3), (s4, s2, EXAMPLE_4)]:
            self.assertEqual(new.diff_from(old).hex(), expected)
            self.assertIn(expected, self.doc)

    def test_examples_decode_exactly(self):
        """Each documented diff applied to its old state gives the new state."""
        s1, s2, s3, s4 = example_states()
        self.assertEqual(DeviceState.empty().apply(bytes.fromhex(EXAMPLE_1)), s1)
        self.assertEqual(s1.apply(bytes.fromhex(EXAMPLE_2)), s2)
        self.assertEqual(s2.apply(bytes.fromhex(EXAMPLE_4)), s4)
        resent = DeviceState.empty().apply(bytes.fromhex(EXAMPLE_3))
        self.assertEqual(resent, s3)
        self.assertEqual((resent.event_base, thaw(resent.events)),
                         (3, [{"kind": "alarm", "level": -3}]))

    def test_documented_drops(self):
        """Each diff of the dropped table (every row, read from the doc) raises
        DatagramDropped(BAD_DIFF) on example 1's state, and the table holds at least
        the rows this test names."""
        s1 = example_states()[0]
        section = self.doc.split("### 5.3", 1)[1].split("\n## ", 1)[0]
        rows = re.findall(r"^\| `([0-9a-f]+)` +\|", section, re.MULTILINE)
        self.assertLessEqual(set(DROPPED), set(rows))
        for hex_diff in rows:
            with self.assertRaises(DatagramDropped) as caught:
                s1.apply(bytes.fromhex(hex_diff))
            self.assertIs(caught.exception.reason, DropReason.BAD_DIFF)

    def test_gap_allowed_on_state_zero_only(self):
        """Events may start above 0 on state 0 but not on a state with values."""
        gap = bytes.fromhex("a2010502816161")
        self.assertEqual(DeviceState.empty().apply(gap).event_base, 5)
        self.assertRaises(DatagramDropped, DeviceState({"a": 1}).apply, gap)

    def test_diff_from_state_zero_carries_the_event_base(self):
        """From state 0, a state whose events were all acknowledged still says where
        its numbering stands (keys 1 and 2, no event), so the next event is no gap."""
        sender = DeviceState({"a": 1}).with_events("x", "y")
        sender = sender.subtract(sender)          # both acknowledged: base 2, no events
        self.assertEqual((sender.event_base, sender.event_end), (2, 2))
        diff = sender.diff_from(DeviceState.empty())
        self.assertEqual(diff.hex(), "a300a161610101020280")
        copy = DeviceState.empty().apply(diff)
        self.assertEqual(copy, sender)
        later = sender.with_events("z")
        self.assertEqual(copy.apply(later.diff_from(sender)).events_since(2), ("z",))
        bare = DeviceState(event_base=4).diff_from(DeviceState.empty())
        self.assertEqual(bare.hex(), "a201040280")
        self.assertEqual(DeviceState.empty().apply(bare).event_base, 4)

    def test_depth_limit(self):
        """Nesting past MAX_DEPTH is a bad diff; MAX_DEPTH itself is not."""
        prefix = bytes.fromhex("a100a16161")  # {0: {"a": ...}}
        deep = prefix + b"\x81" * (MAX_DEPTH + 1) + b"\x00"
        self.assertRaises(DatagramDropped, DeviceState.empty().apply, deep)
        fits = prefix + b"\x81" * MAX_DEPTH + b"\x00"
        self.assertEqual(DeviceState.empty().apply(fits).event_end, 0)

    def test_large_diff(self):
        """A diff longer than the decoder's 4096-byte read size round-trips."""
        big = DeviceState.empty().with_values({"blob": bytes(range(256)) * 40,
                                               "text": "x" * 5000})
        diff = big.diff_from(DeviceState.empty())
        self.assertGreater(len(diff), 15000)
        self.assertEqual(DeviceState.empty().apply(diff), big)
        self.assertRaises(DatagramDropped, DeviceState.empty().apply,
                          diff + b"\x00")

    def test_non_canonical_input_accepted(self):
        """A receiver accepts any well-formed encoding of the layout."""
        loose = bytes.fromhex("a100a1617418ff")  # {0: {"t": 255}}, one-byte int
        self.assertEqual(DeviceState.empty().apply(loose).values["t"], 255)

    def test_whole_datagram(self):
        """The documented datagram decodes to example 1 with the documented key."""
        from broker.ssp.framing import parse_header
        from broker.ssp.keys import derive_session_key, format_key
        for text in (HEADER, SESSION_KEY, SERIALIZED, ZLIB, PLAINTEXT, WIRE):
            self.assertIn(text, self.doc)
        wire = bytes.fromhex(WIRE)
        self.assertEqual(parse_header(wire), (42, 30370212813))
        key = derive_session_key(bytes.fromhex(SECRET), 42, 30370212813)
        self.assertEqual(key.hex(), SESSION_KEY)
        self.assertIn(f"`{format_key(bytes.fromhex(SECRET))}`", self.doc)
        nonce = wire[17:25]
        plaintext = AESOCB3(key).decrypt(b"\0" * 4 + nonce, wire[25:], None)
        self.assertEqual(plaintext.hex(), PLAINTEXT)
        timestamp, reply, frag_id, frag_bits = struct.unpack(
            ">HHQH", plaintext[:14])
        self.assertEqual((timestamp, reply, frag_id, frag_bits),
                         (1000, 0xFFFF, 1, 0x8000))
        self.assertEqual(zlib.compress(bytes.fromhex(SERIALIZED)).hex(), ZLIB)
        instruction = transportinstruction_pb2.Instruction.FromString(
            zlib.decompress(plaintext[14:]))
        self.assertEqual((instruction.old_num, instruction.new_num),
                         (0, 1))
        self.assertEqual(instruction.diff.hex(), EXAMPLE_1)


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
).filter(lambda v: v is not None)
patches = st.dictionaries(st.sampled_from("abcde"), st.none() | values,
                          max_size=4)
steps = st.lists(st.tuples(patches, st.lists(values, max_size=3)),
                 min_size=1, max_size=8)


def build_chain(operations):
    """The states reached by applying each (patch, events) step in turn."""
    chain = [DeviceState.empty()]
    for patch, events in operations:
        chain.append(chain[-1].with_values(patch).with_events(*events))
    return chain


class DeviceStatePropertyTests(SynchronousTestCase):
    """Properties over random state histories (hypothesis)."""

    @settings(max_examples=60, deadline=None)
    @given(steps, st.data())
    def test_diff_applies_to_ancestor(self, operations, data):
        """apply(b.diff_from(a)) on an ancestor a gives exactly b."""
        chain = build_chain(operations)
        i = data.draw(st.integers(0, len(chain) - 1))
        j = data.draw(st.integers(i, len(chain) - 1))
        a, b = chain[i], chain[j]
        diff = b.diff_from(a)
        self.assertEqual(a.apply(diff), b)
        self.assertEqual(diff == b"", a == b)
        if diff:
            body = cbor2.loads(diff)
            # Deterministic: exactly cbor2's canonical encoding of itself.
            self.assertEqual(cbor2.dumps(body, canonical=True), diff)
            carried = list(body.get(2, []))
            self.assertEqual(carried, thaw(b.events_since(a.event_end)))

    @settings(max_examples=60, deadline=None)
    @given(steps, st.data())
    def test_diff_applies_after_subtract(self, operations, data):
        """Sender and receiver may subtract different acked ancestors."""
        chain = build_chain(operations)
        i = data.draw(st.integers(0, len(chain) - 1))
        j = data.draw(st.integers(i, len(chain) - 1))
        acked_sender = chain[data.draw(st.integers(0, i))]
        acked_receiver = chain[data.draw(st.integers(0, i))]
        a_sender = chain[i].subtract(acked_sender)
        b_sender = chain[j].subtract(acked_sender)
        a_receiver = chain[i].subtract(acked_receiver)
        result = a_receiver.apply(b_sender.diff_from(a_sender))
        self.assertEqual(result, chain[j].subtract(acked_receiver))

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=40))
    def test_random_bytes_only_drop(self, diff):
        """Arbitrary bytes either apply or raise DatagramDropped(BAD_DIFF)."""
        try:
            state = DeviceState({"k": 1}, ["e"]).apply(diff)
        except DatagramDropped as dropped:
            self.assertIs(dropped.reason, DropReason.BAD_DIFF)
        else:
            self.assertIsInstance(state, DeviceState)

    @settings(max_examples=150, deadline=None)
    @given(st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.floats() | st.text(max_size=3) | st.binary(max_size=3),
        lambda inner: st.lists(inner, max_size=3)
        | st.dictionaries(st.integers(0, 3) | st.text(max_size=2), inner,
                          max_size=3),
        max_leaves=8))
    def test_random_cbor_only_drops(self, item):
        """Well-formed CBOR of any shape applies or raises BAD_DIFF only."""
        try:
            diff = cbor2.dumps(item)
        except (cbor2.CBOREncodeError, OverflowError, ValueError):
            return
        try:
            state = DeviceState.empty().with_events("e").apply(diff)
        except DatagramDropped as dropped:
            self.assertIs(dropped.reason, DropReason.BAD_DIFF)
        else:
            self.assertIsInstance(state, DeviceState)

    @settings(max_examples=100, deadline=None)
    @given(values, values)
    def test_same_means_same_bytes(self, a, b):
        """Two values compare the same exactly when they encode alike."""
        a, b = freeze(a), freeze(b)
        self.assertEqual(same(a, b), encode(a) == encode(b))
        self.assertTrue(same(a, freeze(thaw(a))))

    def test_replay_diffs(self):
        """Replaying a chain of diffs from state 0 rebuilds the last state."""
        chain = build_chain([({"a": 1}, ["x"]), ({"a": None, "b": [2]}, [])])
        diffs = [new.diff_from(old) for old, new in zip(chain, chain[1:])]
        self.assertEqual(replay_diffs(DeviceState.empty(), diffs), chain[-1])


#: Values of a state and of a patch: numbers at their edges and past them,
#: zeros of both signs, an infinity, and values that are not numbers.
_NUMBERISH = st.sampled_from([0, 1, -1, 2**64 - 1, 2**64, -(2**64), -(2**64) - 1, 0.0, -0.0,
                              1.0, 2.5, float("inf"), True, False, "1", b"1", (1,), None])


class WithNumbersTests(SynchronousTestCase):
    """with_numbers: with_values's state for a reading, or None."""

    @settings(max_examples=2000, deadline=None)
    @given(st.dictionaries(st.sampled_from("abc"), _NUMBERISH.filter(lambda v: v is not None)
                           .filter(lambda v: not (type(v) is int and not -(2**64) <= v < 2**64)),
                           max_size=3),
           st.dictionaries(st.sampled_from("abcd"), _NUMBERISH, max_size=3))
    def test_with_values_state_or_none(self, values, patch):
        state = DeviceState(values)
        quick = state._numbers_merged(patch)     # the Python code, the reference
        if _speedups is not None and speedups.fast_send is not None:
            # the compiled twin: the same state (or None), made the same way
            twin = _speedups.with_numbers(state, patch)
            self.assertEqual(twin is None, quick is None)
            self.assertEqual(twin is state, quick is state)
            if twin is not None:
                self.assertEqual(repr(twin), repr(quick))
                self.assertIs(type(twin), DeviceState)
        if all(type(v) in (int, float) and v - v == 0 and -(2**64) <= v < 2**64
               and type(values.get(k)) in (int, float) for k, v in patch.items()):
            self.assertIsNotNone(quick)
        if quick is None:
            return
        slow = state.with_values(patch)
        self.assertEqual(quick is state, slow is state)
        self.assertEqual(encode(dict(quick.values)), encode(dict(slow.values)))
        self.assertEqual([type(v) for v in quick.values.values()],
                         [type(v) for v in slow.values.values()])

    def test_keys_and_kinds_refused(self):
        state = DeviceState({"a": 1, "t": "x"})
        for patch in ({"b": 1}, {"t": 1}, {"a": "1"}, {"a": None}, {"a": True},
                      {"a": float("nan")}, {"a": 2**64}, {"a": -(2**64) - 1}, {1: 1}):
            self.assertIsNone(state.with_numbers(patch), patch)
            self.assertIsNone(state._numbers_merged(patch), patch)

    def test_compiled_shares_the_events(self):
        """A new state keeps the very events of the old (as _make does)."""
        state = DeviceState({"a": 1}, ["e"], event_base=3)
        new = state.with_numbers({"a": -(2**64)})
        self.assertEqual(new.values, {"a": -(2**64)})
        self.assertIs(new.events_since(0), state.events_since(0))
        self.assertEqual(new.event_end, 4)
