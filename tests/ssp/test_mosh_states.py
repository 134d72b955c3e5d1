"""Tests for broker.ssp.mosh_states against diffs captured from mosh-server."""

import json
import os

import pyte
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.mosh_states import HostState, Resize, UserStream
from broker.ssp.state import is_state_type

VECTORS = os.path.join(os.path.dirname(__file__), os.pardir,
                       "mosh-datagrams.json")


def load_instructions():
    """(direction, instruction) for every vector that completed one."""
    with open(VECTORS, encoding="utf-8") as f:
        vectors = json.load(f)["vectors"]
    return [(v["dir"], v["instruction"]) for v in vectors if "instruction" in v]


def decoded(state, old):
    """Our decoding of the diff old -> state, in the vectors' JSON form."""
    if isinstance(state, UserStream):
        out, run = [], b""
        for event in state.events[old.event_end - state.event_base:]:
            if isinstance(event, Resize):
                if run:
                    out.append({"keystroke": run.hex()})
                    run = b""
                out.append({"resize": {"width": event.width,
                                       "height": event.height}})
            else:
                run += bytes([event])
        if run:
            out.append({"keystroke": run.hex()})
        return {"UserMessage": out}
    out = []
    if state.echo_ack != old.echo_ack:
        out.append({"echo_ack_num": state.echo_ack})
    if state.size != old.size:
        out.append({"resize": dict(zip(("width", "height"), state.size))})
    if len(state.host_bytes) > len(old.host_bytes):
        out.append({"hostbytes": state.host_bytes[len(old.host_bytes):].hex()})
    return {"HostMessage": out}


def strip_text(diff_decoded):
    """The vectors' decoded diff without the human-readable *_text fields."""
    (name, items), = diff_decoded.items()
    return {name: [{k: v for k, v in item.items() if not k.endswith("_text")}
                   for item in items]}


class VectorTests(SynchronousTestCase):
    """Every captured diff decodes and re-encodes byte for byte."""

    def replay(self):
        """Apply the captured diffs in order; yield (old, new, instruction)."""
        states = {"client_to_server": {0: UserStream.empty()},
                  "server_to_client": {0: HostState.empty()}}
        for direction, instruction in load_instructions():
            held = states[direction]
            # States whose diffs were empty acks are not all captured; they
            # equal the newest state before them.
            old = held.get(instruction["old_num"], held[max(held)])
            new = old.apply(bytes.fromhex(instruction["diff_hex"]))
            held[instruction["new_num"]] = new
            yield old, new, instruction

    def test_reencode_byte_exact(self):
        """diff_from rebuilds each captured diff byte for byte."""
        count = 0
        for old, new, instruction in self.replay():
            self.assertEqual(new.diff_from(old).hex(), instruction["diff_hex"])
            count += 1
        self.assertEqual(count, 9)

    def test_decoded_contents(self):
        """Each diff decodes to what the capture tool decoded."""
        for old, new, instruction in self.replay():
            self.assertEqual(decoded(new, old),
                             strip_text(instruction["diff_decoded"]))

    def test_hostbytes_render_with_pyte(self):
        """The server's screen updates render the echoed command and output."""
        host = {instruction["new_num"]: new
                for _, new, instruction in self.replay()
                if isinstance(new, HostState)}
        screen = pyte.Screen(*host[3].size)
        pyte.ByteStream(screen).feed(host[3].host_bytes)
        lines = [line.rstrip() for line in screen.display]
        self.assertEqual(lines[1:4], ["# echo hello_ssp", "hello_ssp", "#"])
        self.assertEqual((host[4].echo_ack, host[5].echo_ack), (1, 2))


class UserStreamTests(SynchronousTestCase):
    """mosh's client state: keystrokes and resizes."""

    def test_contract(self):
        """UserStream offers the State contract; empty() is a singleton."""
        self.assertTrue(is_state_type(UserStream))
        self.assertIs(UserStream.empty(), UserStream.empty())

    def test_keystrokes_join(self):
        """Consecutive bytes travel as one Keystroke (ssp-mosh.md 9.4 example)."""
        stream = UserStream.empty().with_keys(b"a").with_keys(b"b")
        self.assertEqual(stream.diff_from(UserStream.empty()).hex(),
                         "0a06120422026162")

    def test_resize_splits_keystrokes(self):
        """A Resize between bytes gives three instructions that apply back."""
        empty = UserStream.empty()
        stream = empty.with_keys(b"x").with_resize(100, 30).with_keys(b"yz")
        diff = stream.diff_from(empty)
        self.assertEqual(diff.hex(), "0a051203220178" "0a061a042864301e"
                         "0a0612042202797a")
        self.assertEqual(empty.apply(diff), stream)
        self.assertEqual(empty.apply(diff).events,
                         (120, Resize(100, 30), 121, 122))

    def test_subtract(self):
        """subtract forgets acknowledged events and keeps positions."""
        acked = UserStream.empty().with_keys(b"ab")
        later = acked.with_keys(b"c").subtract(acked)
        self.assertEqual((later.event_base, later.events), (2, (99,)))
        self.assertEqual(later.diff_from(acked.subtract(acked)).hex(),
                         "0a051203220163")

    def test_equal_states_have_empty_diff(self):
        """No new events means an empty diff, and applying it changes nothing."""
        stream = UserStream.empty().with_keys(b"q")
        self.assertEqual(stream.diff_from(stream), b"")
        self.assertIs(stream.apply(b""), stream)

    def test_not_a_prefix_raises(self):
        """Diffing from a longer stream is a programming error."""
        short = UserStream.empty().with_keys(b"a")
        self.assertRaises(ValueError, short.diff_from, short.with_keys(b"b"))

    def test_unknown_instruction_ignored(self):
        """An instruction with an unknown extension is skipped, as mosh does."""
        # UserMessage { Instruction { field 9: varint 1 } }
        self.assertIs(UserStream.empty().apply(bytes.fromhex("0a024801")),
                      UserStream.empty())

    def test_bad_protobuf_dropped(self):
        """A truncated UserMessage raises DatagramDropped(BAD_DIFF)."""
        with self.assertRaises(DatagramDropped) as caught:
            UserStream.empty().apply(bytes.fromhex("0a0612"))
        self.assertIs(caught.exception.reason, DropReason.BAD_DIFF)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=30))
    def test_random_bytes_only_drop(self, diff):
        """Arbitrary bytes either apply or raise DatagramDropped(BAD_DIFF)."""
        try:
            stream = UserStream.empty().apply(diff)
        except DatagramDropped as dropped:
            self.assertIs(dropped.reason, DropReason.BAD_DIFF)
        else:
            self.assertIsInstance(stream, UserStream)


class HostStateTests(SynchronousTestCase):
    """What a client keeps of the server's terminal state."""

    def test_contract(self):
        """HostState offers the State contract; state 0 is 80x24, echo_ack 0."""
        self.assertTrue(is_state_type(HostState))
        empty = HostState.empty()
        self.assertIs(empty, HostState.empty())
        self.assertEqual((empty.size, empty.echo_ack, empty.host_bytes),
                         ((80, 24), 0, b""))

    def test_order_echoack_resize_hostbytes(self):
        """diff_from emits EchoAck, Resize, then HostBytes, and applies back."""
        empty = HostState.empty()
        state = HostState(b"hi", 100, 40, 7)
        diff = state.diff_from(empty)
        self.assertEqual(diff.hex(), "0a043a024007" "0a061a0428643028"
                         "0a06120422026869")
        self.assertEqual(empty.apply(diff), state)

    def test_subtract_is_noop(self):
        """subtract returns the state itself, as mosh's Complete does."""
        state = HostState(b"x")
        self.assertIs(state.subtract(state), state)

    def test_bad_protobuf_dropped(self):
        """A HostMessage with a bad wire type raises DatagramDropped(BAD_DIFF)."""
        with self.assertRaises(DatagramDropped) as caught:
            HostState.empty().apply(b"\x0f")
        self.assertIs(caught.exception.reason, DropReason.BAD_DIFF)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=30))
    def test_random_bytes_only_drop(self, diff):
        """Arbitrary bytes either apply or raise DatagramDropped(BAD_DIFF)."""
        try:
            state = HostState.empty().apply(diff)
        except DatagramDropped as dropped:
            self.assertIs(dropped.reason, DropReason.BAD_DIFF)
        else:
            self.assertIsInstance(state, HostState)
