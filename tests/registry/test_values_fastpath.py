"""Validator.passes: True only for entries patch() takes as they are."""

import math

from twisted.trial.unittest import SynchronousTestCase

from broker.registry.errors import InvalidKey, InvalidValue
from broker.registry.settings import RegistrySettings
from broker.registry.values import INT_MAX, INT_MIN, Validator

KEYS = ["value", "a", "_x", "9", "a.b:c-d", "", ".a", "-a", "a b", "\u00e9", "x" * 300,
        "value\x00"]
VALUES = [0, 1, -1, INT_MIN, INT_MAX, INT_MIN - 1, INT_MAX + 1, 2**70, 0.0, -0.0, 1.5,
          1e308, math.inf, -math.inf, math.nan, True, False, None, "", "x", "\ud800",
          b"", (), [], {}, {"a": 1}, [1, [2]], 1j, object()]


class PassesTests(SynchronousTestCase):

    def test_passes_only_what_patch_takes_unchanged(self):
        """Every key and value, before and after the key is cached: passes()
        is True only where patch() takes the entry and returns it as it is."""
        rules = Validator(RegistrySettings())
        for cached in (False, True):
            for key in KEYS:
                for value in VALUES:
                    if rules.passes(key, value):
                        self.assertTrue(cached)
                        out = rules.patch({key: value})
                        self.assertEqual(list(out), [key])
                        self.assertIs(out[key], value)
                    elif cached:
                        # (Nothing it refuses is a known key's number.)
                        if type(value) in (int, float, bool) or value is None:
                            try:
                                rules.patch({key: value})
                            except (InvalidKey, InvalidValue):
                                continue
                            self.assertFalse(type(value) is float and value - value == 0.0)
                            self.assertFalse(type(value) is int
                                             and INT_MIN <= value <= INT_MAX)
                for value in (1, None):
                    try:
                        rules.patch({key: value})   # caches a good key
                    except InvalidKey:
                        pass

    def test_unknown_or_not_text_keys(self):
        rules = Validator(RegistrySettings())
        self.assertFalse(rules.passes("value", 1))
        rules.patch({"value": 1})
        self.assertTrue(rules.passes("value", 1))
        for key in (1, b"value", ("value",), None, 1.0):
            self.assertFalse(rules.passes(key, 1))
        self.assertFalse(rules.passes(["value"], 1))   # unhashable: no TypeError

    def test_str_subclass_key_is_not_known(self):
        rules = Validator(RegistrySettings())
        rules.patch({"value": 1})

        class Text(str):
            pass

        self.assertFalse(rules.passes(Text("value"), 1))
