"""Tests for broker.registry.values: limits and validation."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import errors
from .helpers import make_registry


class LimitTests(SynchronousTestCase):
    """Every violation is a precise error and changes nothing."""

    def setUp(self):
        self.registry, self.store, _ = make_registry(max_state_bytes=256, max_depth=2, max_items=4)
        self.successResultOf(self.registry.add_device("d"))
        self.successResultOf(self.registry.update_reported("d", {"ok": 1}))
        self.before = self.registry.device("d")

    def assertRejected(self, patch, error):
        failure = self.failureResultOf(self.registry.update_reported("d", patch, token="tk"), error)
        self.assertEqual(failure.value.token, "tk")
        self.assertEqual(self.registry.device("d"), self.before)
        return failure.value

    def test_bad_keys(self):
        """Empty, too long, non-text and oddly spelled keys are InvalidKey."""
        for key in ("", "k" * 65, "a b", "-a", "ü", 7, "a/b"):
            self.assertRejected({key: 1}, errors.InvalidKey)
        self.assertRejected({"m": {"bad key": 1}}, errors.InvalidKey)

    def test_bad_values(self):
        """Wrong types, non-finite floats, huge ints, deep or long containers are InvalidValue."""
        for value in (object(), float("nan"), float("inf"), 2 ** 70, {1, 2},
                      [[[1]]], [1, 2, 3, 4, 5], {"a": {"b": {"c": 1}}}):
            self.assertRejected({"v": value}, errors.InvalidValue)

    def test_whole_map_updates_of_ints_are_checked(self):
        """A patch replacing every key of a map holding ints (the fast path) still
        refuses a non-finite float or an out-of-range int, and keeps each value's type."""
        for value in (float("nan"), float("-inf"), 2 ** 64, -(2 ** 64) - 1):
            self.assertRejected({"ok": value}, errors.InvalidValue)
        for value in (2, 2.5, -(2 ** 64), True, 7):
            self.successResultOf(self.registry.update_reported("d", {"ok": value}))
            stored = self.registry.device("d").reported["ok"]
            self.assertEqual((stored, type(stored)), (value, type(value)))

    def test_text_that_is_not_unicode(self):
        """Text with an unpaired surrogate (JSON can escape one) is InvalidValue, top-level
        and nested; other non-ASCII text is kept as sent."""
        for value in ("\ud800", ["ok", "x\udfff"], {"k": "\udbff"}):
            error = self.assertRejected({"v": value}, errors.InvalidValue)
            self.assertIn("surrogate", str(error))
        self.successResultOf(self.registry.update_reported("d", {"t": "21,5 °C ✓"}))
        self.assertEqual(self.registry.device("d").reported["t"], "21,5 °C ✓")

    def test_not_a_map(self):
        """A patch that is not a map is InvalidValue."""
        self.assertRejected([1, 2], errors.InvalidValue)

    def test_state_too_large(self):
        """A patch making the state exceed max_state_bytes is StateTooLarge."""
        self.assertRejected({"big": "x" * 300}, errors.StateTooLarge)
        self.failureResultOf(self.registry.update_desired("d", {"big": "x" * 300}), errors.StateTooLarge)

    def test_state_over_a_lowered_limit_may_shrink(self):
        """A state over max_state_bytes (the limit was lowered since it was stored)
        takes a patch that leaves it smaller or no larger, and still refuses one that
        makes it grow, for reported and desired alike."""
        from broker.registry import DeviceRegistry, RegistrySettings
        registry, store, clock = make_registry(max_state_bytes=1024)
        self.successResultOf(registry.add_device("a"))
        big = {k: k * 200 for k in "abcd"}
        self.successResultOf(registry.update_reported("a", big))
        self.successResultOf(registry.update_desired("a", big))
        again = DeviceRegistry(store, clock=clock, settings=RegistrySettings(max_state_bytes=256))
        for update in (again.update_reported, again.update_desired):
            self.successResultOf(update("a", {"a": None}))                # delete a key
            self.successResultOf(update("a", {"b": "b" * 100}))           # shorten a value
            self.successResultOf(update("a", {"c": "z" * 200}))           # same size
            self.failureResultOf(update("a", {"d": "d" * 201}), errors.StateTooLarge)
            self.failureResultOf(update("a", {"e": 1}), errors.StateTooLarge)
        view = again.device("a")
        for state in (view.reported, view.desired):
            self.assertEqual(dict(state), {"b": "b" * 100, "c": "z" * 200, "d": "d" * 200})

    def test_error_codes(self):
        """Errors carry stable codes for the wire."""
        self.assertEqual(self.assertRejected({"": 1}, errors.InvalidKey).to_json()["error"], "invalid_key")

    def test_accepted_types(self):
        """Scalars of JSON and CBOR, small arrays and maps are accepted."""
        patch = {"i": -5, "f": 1.5, "s": "x", "b": True, "y": b"\x00", "a": [1, "x", None],
                 "m": {"k": [1]}, "u": 2 ** 64 - 1}
        self.successResultOf(self.registry.update_reported("d", patch))
        self.assertEqual(self.registry.device("d").reported["a"], (1, "x", None))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.dictionaries(st.sampled_from("abcde"),
                                    st.one_of(st.none(), st.integers(-10, 10), st.text(max_size=3)),
                                    max_size=4), max_size=8))
    def test_merge_matches_reference(self, patches):
        """Any sequence of flat patches gives the state a plain dict merge gives."""
        registry, _, _ = make_registry()
        self.successResultOf(registry.add_device("p"))
        expected = {}
        for patch in patches:
            self.successResultOf(registry.update_reported("p", patch))
            for k, v in patch.items():
                if v is None:
                    expected.pop(k, None)
                else:
                    expected[k] = v
        self.assertEqual(dict(registry.device("p").reported), expected)

    def test_merged_map_keeps_the_key_limit(self):
        """Patches each within max_keys cannot grow a map past max_keys keys, reported
        or desired: the one going past is InvalidValue and changes nothing."""
        registry, _, _ = make_registry(max_keys=4)
        self.successResultOf(registry.add_device("k"))
        for write in (registry.update_reported, registry.update_desired):
            self.successResultOf(write("k", {"a": 1, "b": 2, "c": 3}))
            before = registry.device("k")
            self.failureResultOf(write("k", {"d": 4, "e": 5}), errors.InvalidValue)
            self.assertEqual(registry.device("k"), before)
            self.successResultOf(write("k", {"a": None, "d": 4, "e": 5}))   # 4 keys: fine

    def test_merged_nested_map_keeps_the_item_limit(self):
        """Merging a nested map cannot grow it past max_items: InvalidValue, no change."""
        self.successResultOf(self.registry.update_reported("d", {"m": {"a": 1, "b": 2, "c": 3}}))
        self.before = self.registry.device("d")
        self.assertRejected({"m": {"d": 4, "e": 5}}, errors.InvalidValue)
        self.successResultOf(self.registry.update_reported("d", {"m": {"a": None, "d": 4}}))
        self.assertEqual(dict(self.registry.device("d").reported["m"]), {"b": 2, "c": 3, "d": 4})

    def test_merge_onto_a_scalar_or_an_oversized_map(self):
        """A map merged onto a scalar replaces it; a map already past max_items (stored
        under a larger limit) may still be merged into if it does not grow."""
        self.successResultOf(self.registry.update_reported("d", {"s": 5}))
        self.successResultOf(self.registry.update_reported("d", {"s": {"a": 1}}))
        self.assertEqual(dict(self.registry.device("d").reported["s"]), {"a": 1})
        registry, store, _ = make_registry(max_items=8)
        self.successResultOf(registry.add_device("o"))
        self.successResultOf(registry.update_reported("o", {"m": dict.fromkeys("abcdef", 1)}))
        smaller, _, _ = make_registry(store, max_items=4)
        self.successResultOf(smaller.update_reported("o", {"m": {"a": 2, "b": None}}))
        self.assertEqual(len(smaller.device("o").reported["m"]), 5)
        self.failureResultOf(smaller.update_reported("o", {"m": {"z": 1}}), errors.InvalidValue)


class SharedTablesTests(SynchronousTestCase):
    """The registry's shared key tables stay bounded and let go of what no device uses."""

    def test_key_shapes_start_over_when_full(self):
        """A device whose key names keep changing cannot grow the shapes table past
        its limit: when full it starts over, and shapes are still shared after."""
        from broker.registry.model import KeyShapes

        shapes = KeyShapes(limit=8)
        for n in range(50):
            keys = (f"k{n}",)
            self.assertEqual(shapes.intern(keys), keys)
            self.assertLessEqual(len(shapes), 8)
            self.assertEqual(shapes.positions(keys), {f"k{n}": 0})
        first = shapes.intern(("a", "b"))
        self.assertIs(shapes.intern(("a", "b")), first)

    def test_key_name_cache_starts_over_when_full(self):
        """New key names past the cache's size start it over instead of growing it."""
        from broker.registry import values

        from broker.registry import RegistrySettings

        validator = values.Validator(RegistrySettings())
        self.patch(values, "KEY_CACHE_SIZE", 16)
        for n in range(100):
            self.assertEqual(validator.key(f"name{n}"), f"name{n}")
            self.assertLessEqual(len(validator._keys), 16)


class JsonEqualTests(SynchronousTestCase):
    """json_equal: equality of two values as JSON sees them (the delta's test)."""

    def test_numbers_compare_by_value(self):
        """An int and a float of the same value are equal, exactly (no rounding of
        large integers); different values are not."""
        from broker.registry.values import json_equal
        for a, b in ((22, 22.0), (0, -0.0), (-(2 ** 63), float(-(2 ** 63)))):
            self.assertTrue(json_equal(a, b), (a, b))
            self.assertTrue(json_equal(b, a), (b, a))
        for a, b in ((22, 22.5), (2 ** 53 + 1, float(2 ** 53)), (1, "1")):
            self.assertFalse(json_equal(a, b), (a, b))

    def test_booleans_are_never_numbers(self):
        """true is not 1 nor 1.0, false is not 0, at any depth."""
        from broker.registry.values import json_equal
        for a, b in ((True, 1), (True, 1.0), (False, 0), ((True,), (1,)), ({"x": False}, {"x": 0})):
            self.assertFalse(json_equal(a, b), (a, b))
            self.assertFalse(json_equal(b, a), (b, a))
        self.assertTrue(json_equal(True, True))

    def test_containers_compare_item_by_item(self):
        """Maps are equal with the same keys and equal values, arrays with equal items
        in order; an array is not a map, bytes are not text."""
        from broker.registry.values import FrozenMap, json_equal
        self.assertTrue(json_equal(FrozenMap({"a": (1, 2.0), "b": FrozenMap({"c": 3})}),
                                   {"a": (1.0, 2), "b": {"c": 3.0}}))
        for a, b in (({"a": 1}, {"a": 1, "b": 2}), ((1, 2), (2, 1)), ((1,), (1, 1)),
                     ((), {}), (b"x", "x"), (None, 0)):
            self.assertFalse(json_equal(a, b), (a, b))
            self.assertFalse(json_equal(b, a), (b, a))

    def test_strict_test_keeps_types_apart(self):
        """same_value, which says whether a value changed, still tells 1 from 1.0."""
        from broker.registry.values import same_value
        self.assertFalse(same_value(1, 1.0))
        self.assertTrue(same_value((1, {"a": 2.0}), (1, {"a": 2.0})))
