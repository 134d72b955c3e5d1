"""The extension's diff of two device states (speedups: _speedups.diff)
against DeviceState.diff_from.

The send path asks C first for a diff of values only (a node's report);
C answers with the method's very bytes or says nothing (None), and the
method decides. Here every answer is compared with the method's.
"""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import speedups
from broker.ssp.device_state import DeviceState

try:
    from broker.ssp import _speedups
except ImportError:     # not built: the tests skip
    _speedups = None

KEYS = st.sampled_from(["v", "a", "b", "bb", "zz", "é", "temperature", "x" * 30, "k" * 300])
#: Values C writes (integers at the edges of each head and of 64 bits, text
#: and bytes of every head length) and values it leaves to the method.
WRITTEN = st.one_of(
    st.sampled_from([0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
                     2**63 - 1, 2**63, 2**64 - 1, -1, -24, -25, -256, -257, -(2**63)]),
    st.integers(-(2**64), 2**64 - 1),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["y" * 23, "y" * 24, "y" * 255, "y" * 256]),
    st.binary(max_size=30),
    st.floats(allow_nan=False),
    st.floats(allow_nan=False, width=32),
    st.floats(allow_nan=False, width=16),
    # each float form's edges: half's largest, smallest normal and subnormal
    # and just past them, float32's largest, infinities, signed zeros
    st.sampled_from([0.0, -0.0, 1.5, 1.0, 0.1, 65504.0, 65520.0, 65536.0, 2.0**-14,
                     2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-149, 2.0**-150,
                     3.4028234663852886e38, 3.4028235677973366e38, 1e300,
                     float("inf"), float("-inf"), -2.0**-24, 1 + 2.0**-10, 1 + 2.0**-11]))
LEFT = st.one_of(
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["p", "q"]), st.integers(0, 3), max_size=2))
VALUES = st.one_of(WRITTEN, WRITTEN, WRITTEN, LEFT)


@st.composite
def state_pairs(draw):
    """An old state and a newer one: values changed, added, deleted, or the
    same objects kept; events either ending where the old ones end or not."""
    old_values = draw(st.dictionaries(KEYS, VALUES, max_size=6))
    old = DeviceState(old_values)
    patch = draw(st.dictionaries(KEYS, st.one_of(VALUES, st.none()), max_size=6))
    if draw(st.booleans()):
        # equal values rebuilt: the same on the wire, not the same objects
        patch.update({key: value for key, value in old_values.items()
                      if draw(st.booleans())})
    new = old.with_values(patch)
    events = draw(st.sampled_from(["none", "both", "acknowledged", "new"]))
    if events in ("both", "acknowledged"):
        # the same end: no event to carry, whether held or acknowledged
        old = old.with_events({"kind": "x"})
        new = new.with_events({"kind": "x"})
        if events == "acknowledged":
            new = new.subtract(old)
    elif events == "new":
        new = new.with_events({"kind": "y"})
    return old, new


class DiffValuesTests(SynchronousTestCase):

    def setUp(self):
        if _speedups is None or speedups.fast_send is None:
            raise self.skipTest(speedups.unavailable_reason or "not built")

    @settings(max_examples=3000, deadline=None)
    @given(state_pairs())
    def test_the_methods_bytes_or_nothing(self, pair):
        """Whatever the values (integers at every head's edge and past 64
        bits, text, bytes, floats, arrays, maps, deletions), C's answer is
        the method's bytes, or None."""
        old, new = pair
        answer = _speedups.diff(new, old)
        if answer is not None:
            self.assertEqual(answer, new.diff_from(old))

    @settings(max_examples=1000, deadline=None)
    @given(st.dictionaries(KEYS, WRITTEN, max_size=6),
           st.dictionaries(KEYS, st.one_of(WRITTEN, st.none()), min_size=1, max_size=6))
    def test_values_it_writes_are_taken(self, old_values, patch):
        """A report of values C writes (no array nor map) is never left to
        the method, at most 64-bit integers aside."""
        old = DeviceState(old_values)
        new = old.with_values(patch)
        answer = _speedups.diff(new, old)
        if all(-(2**63) <= value < 2**64 for value in new.values.values()
               if type(value) is int):
            self.assertIsNotNone(answer)
        if answer is not None:
            self.assertEqual(answer, new.diff_from(old))

    def test_canonical_order(self):
        """More than one change: encoded keys by length, then bytewise; a
        deletion is null."""
        old = DeviceState({"x": 1, "keep": 2})
        new = DeviceState({"bb": 1, "a": 2, "ccc": 3, "b": 4, "é": 5, "zz": 6, "keep": 2})
        self.assertEqual(_speedups.diff(new, old),
                         bytes.fromhex("a100a76161026162046178f662626201627a7a0662c3a905"
                                       "6363636303"))
        self.assertEqual(_speedups.diff(new, old), new.diff_from(old))

    def test_one_reading(self):
        """The usual report: one integer changed."""
        old = DeviceState({"value": 1, "name": "n", "t": 2.5})
        new = old.with_values({"value": 70000})
        self.assertEqual(_speedups.diff(new, old), b"\xa1\x00\xa1\x65value\x1a\x00\x01\x11\x70")

    def test_equal_states(self):
        """The same state, or equal values: the empty diff."""
        old = DeviceState({"v": 1, "f": -0.0})
        self.assertEqual(_speedups.diff(old, old), b"")
        self.assertEqual(_speedups.diff(DeviceState({"v": 1, "f": -0.0}), old), b"")

    def test_floats_in_their_shortest_form(self):
        """A float as cbor2's canonical form writes it: binary16 where that
        keeps the value, else binary32, else binary64; a zero's sign is a
        change."""
        old = DeviceState({"f": 0.0})
        for value, encoded in [(1.5, "f93e00"), (-0.0, "f98000"), (65504.0, "f97bff"),
                               (2.0**-24, "f90001"), (float("inf"), "f97c00"),
                               (65520.0, "fa477ff000"), (0.1, "fb3fb999999999999a")]:
            new = old.with_values({"f": value})
            self.assertEqual(_speedups.diff(new, old), bytes.fromhex("a100a16166" + encoded))
            self.assertEqual(_speedups.diff(new, old), new.diff_from(old))

    def test_left_to_the_method(self):
        """Events to carry, an integer below -2**63, an array: None."""
        old = DeviceState({"v": 1, "f": 0.0})
        self.assertIsNone(_speedups.diff(old.with_events("e"), old))
        self.assertIsNone(_speedups.diff(old.with_values({"v": -(2**63) - 1}), old))
        self.assertIsNone(_speedups.diff(old.with_values({"v": [1]}), old))
        # an older state (the method raises: not an ancestor)
        newer = old.with_events("e")
        self.assertIsNone(_speedups.diff(old, newer.subtract(newer)))

    def test_type_change_is_a_change(self):
        """1 then True: equal in Python, not on the wire."""
        old = DeviceState({"v": 1})
        new = DeviceState({"v": True})
        self.assertEqual(_speedups.diff(new, old), b"\xa1\x00\xa1\x61v\xf5")
        self.assertEqual(_speedups.diff(new, old), new.diff_from(old))

    def test_other_types_are_left(self):
        """Anything but two DeviceStates: None."""
        self.assertIsNone(_speedups.diff("a", DeviceState()))
        self.assertIsNone(_speedups.diff(DeviceState(), object()))

    def test_every_half_and_its_neighbours(self):
        """Every binary16 value and the doubles next to it (each side) are
        written as cbor2 writes them."""
        import math
        import struct
        old = DeviceState({"f": "none"})
        for bits in range(0x10000):
            (half,) = struct.unpack(">e", bits.to_bytes(2, "big"))
            if half != half:
                continue    # NaN: no state holds one
            for value in (half, math.nextafter(half, math.inf), math.nextafter(half, -math.inf)):
                new = old.with_values({"f": value})
                self.assertEqual(_speedups.diff(new, old), new.diff_from(old), (bits, value))

    def test_no_leak(self):
        """Each compiled function called many times: no memory kept (each
        result, new dict, new state and bytes freed)."""
        import gc
        import tracemalloc
        old = DeviceState({"v": 1, "f": 0.5, "t": "x" * 40})
        new = old.with_values({"v": 2**40, "f": -1.5, "t": "y" * 40})

        def run(times):
            for number in range(times):
                _speedups.diff(new, old)
                _speedups.with_numbers(old, {"v": number, "f": 0.25})
                _speedups.with_numbers(old, {"v": "not a number"})
                _speedups.values_patch(old, new)
                _speedups.state_record(new)
        run(1000)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            run(20000)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertLess(grown, 64 * 1024)
