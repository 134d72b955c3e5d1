"""The diff map's keys and CBOR tags (docs/protocol.md, sections 5 and 5.1)."""

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.device_state import DeviceState, thaw
from broker.ssp.errors import DatagramDropped, DropReason

#: Tags cbor2 decodes by itself into plain values (or a type we refuse),
#: and some it does not know: none may appear in a diff.
TAGS = (0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 256, 258,
        260, 261, 1004, 4000, 55800)


def tagged(tag, content: bytes) -> bytes:
    """``content`` (encoded) under ``tag``."""
    head = cbor2.dumps(tag)
    return bytes([0xC0 | (head[0] & 0x1F)]) + head[1:] + content


class DiffKeyTests(SynchronousTestCase):
    """The diff map's keys are the integers 0, 1 and 2, nothing equal to them."""

    def assertBadDiff(self, diff, state=None):
        state = state or DeviceState.empty()
        with self.assertRaises(DatagramDropped) as caught:
            state.apply(diff)
        self.assertEqual(caught.exception.reason, DropReason.BAD_DIFF)

    def test_float_zero_is_not_the_values_key(self):
        """{0.0: {"a": 1}} is not a diff: its key is a float."""
        self.assertBadDiff(bytes.fromhex("a1f90000a1616101"))

    def test_false_is_not_the_values_key(self):
        """{false: {"a": 1}} is not a diff: false is not the integer 0."""
        self.assertBadDiff(bytes.fromhex("a1f4a1616101"))

    def test_true_is_not_the_first_event_key(self):
        """{true: 0, 2: ["a"]} is not a diff: true is not the integer 1."""
        self.assertBadDiff(bytes.fromhex("a2f50002816161"))

    def test_float_event_keys_are_refused(self):
        """{1.0: 0, 2.0: ["a"]} is not a diff, although 1.0 == 1 in Python."""
        self.assertBadDiff(bytes.fromhex("a2f93c0000f9400081" "6161"))

    def test_integer_keys_still_apply(self):
        """The same diffs with integer keys apply."""
        state = DeviceState.empty().apply(bytes.fromhex("a100a1616101"))
        self.assertEqual(thaw(state.values), {"a": 1})
        state = state.apply(bytes.fromhex("a20100028161" "61"))
        self.assertEqual(state.events, ("a",))


class DiffTagTests(SynchronousTestCase):
    """No tags in a diff but the self-describe tag 55799, which is ignored."""

    def assertBadDiff(self, diff):
        with self.assertRaises(DatagramDropped) as caught:
            DeviceState.empty().apply(diff)
        self.assertEqual(caught.exception.reason, DropReason.BAD_DIFF)

    def test_tagged_key_is_refused(self):
        """{28(0): {"a": 1}} is not a diff (cbor2 alone would read the key as 0)."""
        self.assertBadDiff(bytes.fromhex("a1d81c00a1616101"))

    def test_every_tag_is_refused_on_a_key(self):
        """A diff key under any tag but 55799 is refused."""
        for tag in TAGS:
            self.assertBadDiff(b"\xa1" + tagged(tag, b"\x00")
                               + bytes.fromhex("a1616101"))

    def test_every_tag_is_refused_in_a_value_and_an_event(self):
        """A value or an event under any tag but 55799 is refused (a bignum
        tag 2 would otherwise read as the integer 1)."""
        for tag in TAGS:
            self.assertBadDiff(bytes.fromhex("a100a16161")
                               + tagged(tag, b"\x41\x01"))
            self.assertBadDiff(bytes.fromhex("a201000281")
                               + tagged(tag, b"\x41\x01"))

    def test_self_describe_tag_is_ignored(self):
        """The self-describe tag 55799, on the whole diff or on a value,
        changes nothing."""
        diff = bytes.fromhex("a100a2616101616202")
        expected = DeviceState.empty().apply(diff)
        self.assertEqual(DeviceState.empty().apply(tagged(55799, diff)),
                         expected)
        inner = bytes.fromhex("a100a26161016162") + tagged(55799, b"\x02")
        self.assertEqual(DeviceState.empty().apply(inner), expected)
