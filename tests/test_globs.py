"""broker/globs.py: device-name globs in a bounded cache of our own."""

from fnmatch import fnmatchcase

from twisted.trial.unittest import SynchronousTestCase

from broker.globs import glob_match


class GlobMatchTests(SynchronousTestCase):
    """Matches as fnmatchcase does, with a cache that stays small."""

    def test_same_answers_as_fnmatchcase(self):
        """Whole-name, case-sensitive matching with * ? [] and [!]."""
        names = ["porch", "porch-2", "Porch", "shed", "p", "pump-[1]", ""]
        for pattern in ("porch*", "p?rch", "[ps]*", "[!p]*", "*-[0-9]", "pump-[[]1]", "*"):
            for name in names:
                self.assertEqual(glob_match(pattern)(name) is not None,
                                 fnmatchcase(name, pattern), (pattern, name))

    def test_cache_is_bounded(self):
        """A client sending a new pattern with every request cannot grow it past 1,024."""
        for n in range(3000):
            glob_match(f"client-{n}-*")
        self.assertLessEqual(glob_match.cache_info().currsize, 1024)
