"""Kept Redis writes merged while they wait (broker.registry.shared_retry)."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.registry.shared_retry import _compose, coalesce
from broker.registry.shared_writes import _Op
from broker.registry.values import merge_value

_KEYS = st.sampled_from("abc")
_PATCHES = st.recursive(
    st.dictionaries(_KEYS, st.one_of(st.none(), st.integers(0, 3)), max_size=3),
    lambda inner: st.dictionaries(_KEYS, st.one_of(st.none(), st.integers(0, 3), inner),
                                  max_size=3),
    max_leaves=8)


def _apply(target, patch):
    """RFC 7386 on plain dicts, the registry's merge (null deletes, maps merge)."""
    return dict(merge_value(target, patch))


def _kept(kind, patch=None, events=()):
    op = _Op(kind, patch, tuple(events))
    op.d = None
    return op


class ComposeTests(SynchronousTestCase):
    """One patch for two, only where RFC 7386 can say it."""

    @settings(max_examples=200, deadline=None)
    @given(_PATCHES, _PATCHES, _PATCHES)
    def test_composed_patch_does_what_the_two_do(self, target, first, second):
        """Where a composed patch exists, applying it equals applying both in turn."""
        composed = _compose(first, second)
        if composed is not None:
            self.assertEqual(_apply(target, composed), _apply(_apply(target, first), second))

    def test_no_patch_where_a_map_merges_into_a_deleted_or_replaced_key(self):
        """A map merged into a key the first patch deleted or set to a number has no
        single-patch form: None."""
        self.assertIsNone(_compose({"m": None}, {"m": {"b": 1}}))
        self.assertIsNone(_compose({"m": 5}, {"m": {"b": 1}}))
        self.assertEqual(_compose({"m": {"a": 1}}, {"m": {"b": 2}, "t": 3}),
                         {"m": {"a": 1, "b": 2}, "t": 3})


class CoalesceTests(SynchronousTestCase):
    """Adjacent kept reports become one; the newest session record stays."""

    def test_adjacent_reports_merge_and_the_newest_record_stays(self):
        """Reports merge across a dropped older record; the newest record stays; a
        report that cannot be composed, or one more event than a write may carry,
        starts a new write."""
        ops = [_kept("reported", {"t": 1}, ["a"]), _kept("session"),
               _kept("reported", {"t": 2, "m": {"x": 1}}, ["b"]), _kept("session"),
               _kept("reported", {"m": None}, ["c"]), _kept("reported", {"m": {"y": 1}}, ["d"]),
               _kept("reported", {"u": 1}, ["e", "f"]), _kept("reported", {"u": 2}, ["g"])]
        out = coalesce(ops, max_events=3)
        self.assertEqual([op.kind for op in out],
                         ["reported", "session", "reported", "reported", "reported"])
        self.assertIs(out[1], ops[3])
        self.assertEqual([(op.patch, op.events) for op in out if op.kind == "reported"],
                         [({"t": 2, "m": {"x": 1}}, ("a", "b")), ({"m": None}, ("c",)),
                          ({"m": {"y": 1}, "u": 1}, ("d", "e", "f")), ({"u": 2}, ("g",))])
        self.assertTrue(all(op.d is None for op in out))
