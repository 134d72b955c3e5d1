"""What the registry's observer table costs a change when dashboards subscribe with globs.

A dashboard connection is one registry subscription holding up to
max_subscriptions patterns; each change must be matched against the
connections, not against every glob of every connection.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from broker.registry import feed
from broker.registry.feed import Subscriptions


class CountingMatchers:
    """Wraps feed._glob_matcher so each call of a compiled matcher is counted."""

    def __init__(self, testcase):
        self.calls = 0
        real = feed._glob_matcher

        def counting(globs):
            match = real(globs)

            def counted(name):
                self.calls += 1
                return match(name)
            return counted
        testcase.patch(feed, "_glob_matcher", counting)


class GlobIndexTests(unittest.SynchronousTestCase):
    """Subscriptions: globs indexed by literal prefix, one matcher per subscription and prefix."""

    def test_change_tests_each_subscription_once_whatever_its_globs(self):
        """A change is matched once per subscription with a glob that could match it, not once per glob."""
        counter = CountingMatchers(self)
        table = Subscriptions()
        heard = []
        for connection in range(10):
            patterns = [f"pump-*-{j}" for j in range(100)] + [f"zz{connection}-{j}-*" for j in range(100)]
            table.add(patterns, heard.append)
        table.notify("pump-1-7", lambda: "view")
        self.assertEqual(heard, ["view"] * 10)
        self.assertEqual(counter.calls, 10)
        table.notify("valve-1", lambda: "view")
        self.assertEqual((len(heard), counter.calls), (10, 10))   # no prefix matches: no matcher runs

    def test_exact_names_need_no_glob_matching(self):
        """An exact-name subscription is found by lookup, and globs of other prefixes are not tried."""
        counter = CountingMatchers(self)
        table = Subscriptions()
        exact = table.add(["pump-1"], lambda view: None)
        table.add([f"zz-{j}-*" for j in range(100)], lambda view: None)
        self.assertEqual(table.matching("pump-1"), [exact])
        self.assertEqual(counter.calls, 0)

    def test_cancel_removes_every_glob_of_a_subscription(self):
        """After cancel() no glob of the subscription matches, and the table stops watching."""
        table = Subscriptions()
        sub = table.add(["a*", "a?", "b[12]", "*x", "exact"], lambda view: None)
        other = table.add(["a*"], lambda view: None)
        self.assertEqual(table.matching("a1"), [sub, other])
        sub.cancel()
        self.assertEqual(table.matching("a1"), [other])
        self.assertEqual(table.matching("b1"), [])
        other.cancel()
        self.assertFalse(table.watching)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.lists(st.from_regex(r"[ab1]{0,2}[*?]?[ab1]{0,2}|[ab]\[[ab1]\]", fullmatch=True)
                             .filter(bool), min_size=1, max_size=6), min_size=1, max_size=4),
           st.from_regex(r"[ab1]{0,4}", fullmatch=True))
    def test_matching_is_fnmatch(self, subscriptions, name):
        """Every subscription with a pattern matching the name (fnmatchcase) is found, once, and no other."""
        table = Subscriptions()
        subs = [table.add(patterns, lambda view: None) for patterns in subscriptions]
        expected = {sub for sub, patterns in zip(subs, subscriptions)
                    if any(fnmatchcase(name, p) for p in patterns)}
        found = table.matching(name)
        self.assertEqual(len(found), len(set(found)))
        self.assertEqual(set(found), expected)
