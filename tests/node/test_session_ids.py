"""Tests for broker.node.session_ids: session ids never repeat, also across reboots."""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from broker.node.session_ids import SessionIds, next_session_id


def counting_random():
    state = {"n": 0}

    def random_bytes(n):
        state["n"] += 1
        return state["n"].to_bytes(n, "big")
    return random_bytes


class NextSessionIdTests(SynchronousTestCase):
    """The id rule: a new epoch above the last one (and the wall clock), random low bits."""

    def test_strictly_greater_than_last(self):
        """Every id is above the previous one even when the clock stands still or goes back."""
        last = 0
        clock = iter([100, 100, 50, 50])
        for _ in range(4):
            new = next_session_id(last, counting_random(), lambda: next(clock))
            self.assertGreater(new, last)
            last = new

    def test_epoch_follows_wall_clock(self):
        """A device that lost its file still starts above ids of earlier seconds."""
        self.assertEqual(next_session_id(0, counting_random(), lambda: 1_700_000_000) >> 32,
                         1_700_000_000)

    def test_low_bits_never_zero(self):
        """Thirty-two zero random bits are replaced by 1, so an id is never 0."""
        value = next_session_id(0, lambda n: bytes(n), lambda: 0)
        self.assertNotEqual(value, 0)
        self.assertEqual(value & 0xFFFFFFFF, 1)


class SessionIdsTests(SynchronousTestCase):
    """The file that makes a reboot start a strictly newer session."""

    def test_survives_a_restart(self):
        """Ids handed out by a new instance over the same file are above the old ones."""
        path = os.path.join(self.mktemp(), "ids.json")
        first = SessionIds(path, wall_clock=lambda: 10)
        a = first.next(42)
        b = first.next(42)
        second = SessionIds(path, wall_clock=lambda: 5)  # clock went back after the reboot
        c = second.next(42)
        self.assertLess(a, b)
        self.assertLess(b, c)
        self.assertEqual(second.last(7), 0)

    def test_file_is_private(self):
        """The file is written with mode 0600 in a 0700 directory."""
        directory = self.mktemp()
        path = os.path.join(directory, "ids.json")
        SessionIds(path).next(1)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)

    def test_stale_temporary_file_does_not_loosen_the_mode(self):
        """A leftover world-readable temporary file still yields a 0600 file."""
        directory = self.mktemp()
        os.mkdir(directory, 0o700)
        path = os.path.join(directory, "ids.json")
        with open(path + ".tmp", "w") as stale:
            stale.write("{}")
        os.chmod(path + ".tmp", 0o644)
        SessionIds(path).next(5)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_bad_file_is_a_clear_error(self):
        """A damaged file stops with a message naming it, instead of reusing ids."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("[1, 2")
        error = self.assertRaises(ValueError, SessionIds, path)
        self.assertIn(path, str(error))

    def test_memory_only(self):
        """Without a path ids still increase within the process."""
        ids = SessionIds(None, wall_clock=lambda: 1)
        self.assertLess(ids.next(3), ids.next(3))

    def test_wrong_content_is_a_clear_error(self):
        """A file of the wrong shape (not device -> id) stops with a message naming it."""
        for content in ('[1]', '{"x": 1}', '{"1": "y"}', '{"1": [2]}'):
            path = self.mktemp()
            with open(path, "w") as handle:
                handle.write(content)
            error = self.assertRaises(ValueError, SessionIds, path)
            self.assertIn(path, str(error))
