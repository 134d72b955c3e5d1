"""The shortcuts of a device state's diff and comparison: the same answers as
the long way, over values of every kind, added, changed and deleted keys."""

import itertools

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.device_state import DeviceState, same

VALUES = [0, 1, 2**64 - 1, -(2**64), True, False, 1.0, 0.0, -0.0, "1", b"1", (1,),
          {"a": 1}, {"a": True}]
_MISSING = object()


def changed_the_long_way(mine, old):
    """The merge patch from ``old`` values to ``mine``: every key compared with same()."""
    changed = {}
    for key, value in mine.items():
        previous = old.get(key, _MISSING)
        if previous is _MISSING or not same(previous, value):
            changed[key] = value
    for key in old:
        if key not in mine:
            changed[key] = None
    return changed


class ChangedSinceTests(SynchronousTestCase):

    def test_pairs_of_values(self):
        """Each pair of kinds for one key (1 is not True nor 1.0, 0.0 is not -0.0):
        the diff and the changed map of the long way, in its order."""
        for a, b in itertools.product(VALUES, repeat=2):
            old = DeviceState({"k": a, "same": 5})
            new = old.with_values({"k": b})
            expected = changed_the_long_way(new._values, old._values)
            got = new._changed_since(old._values)
            self.assertEqual(list(got.items()), list(expected.items()), (a, b))
            for key in got:
                self.assertTrue(same(got[key], expected[key]))
            rebuilt = old.apply(new.diff_from(old))
            self.assertEqual(rebuilt, new)

    def test_equal_ints_as_other_objects(self):
        old = DeviceState({"k": int("1" + "0" * 18)})
        new = DeviceState({"k": int("1" + "0" * 18)})
        self.assertIsNot(old._values["k"], new._values["k"])
        self.assertEqual(new._changed_since(old._values), {})
        self.assertEqual(new.diff_from(old), b"")

    def test_added_and_deleted_keys_together(self):
        """As many keys added as deleted (same count): the deletions still go."""
        cases = [({"a": 1, "b": 2}, {"a": 1, "c": 2}),
                 ({"a": 1, "b": 2}, {"c": 1, "d": 2}),
                 ({"a": 1}, {"a": 1, "b": 2}),
                 ({"a": 1, "b": 2, "c": 3}, {"d": 4}),
                 ({}, {"a": 1}), ({"a": 1}, {}),
                 ({"a": 1, "b": 2}, {"b": 2.0, "z": 3})]
        for before, after in cases:
            old, new = DeviceState(before), DeviceState(after)
            expected = changed_the_long_way(new._values, old._values)
            self.assertEqual(list(new._changed_since(old._values).items()),
                             list(expected.items()))
            self.assertEqual(old.apply(new.diff_from(old)), new)


class EqualityTests(SynchronousTestCase):

    def test_equality_as_before(self):
        """Values first, then events: any difference is inequality."""
        base = DeviceState({"a": 1})
        self.assertEqual(base, DeviceState({"a": 1}))
        self.assertNotEqual(base, DeviceState({"a": True}))
        self.assertNotEqual(base, DeviceState({"a": 1.0}))
        self.assertNotEqual(DeviceState({"a": 0.0}), DeviceState({"a": -0.0}))
        self.assertNotEqual(base, base.with_events(1))
        self.assertNotEqual(base.with_events(1), base.with_events(True))
        self.assertEqual(base.with_events(1), base.with_events(1))
        self.assertNotEqual(DeviceState({"a": 1}, event_base=3), base)
        self.assertNotEqual(base, {"a": 1})
        self.assertIs(base.__eq__({"a": 1}), NotImplemented)
