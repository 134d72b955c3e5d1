"""Tests for broker.node.session_ids: session ids never repeat, also across reboots."""

import os
import resource
import signal
import stat
import subprocess
import sys

from hypothesis import assume, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.node.session_ids import (LOW_BITS, TICKS_PER_SECOND, SessionIds,
                                     next_session_id)
from broker.ssp.framing import boot_of, continues_boot, same_boot

RANDOM_MASK = (1 << LOW_BITS) - 2     # the low bits but the boot bit

SECOND = 1_700_000_000
TICK = 1 / TICKS_PER_SECOND


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
        """Thirty-two zero low bits are replaced by 2 (a boot's first session), so an id
        is never 0."""
        value = next_session_id(0, lambda n: bytes(n), lambda: 0)
        self.assertNotEqual(value, 0)
        self.assertEqual(value & 0xFFFFFFFF, 2)
        self.assertFalse(continues_boot(value))

    def test_boot_bit_says_whether_the_device_rebooted(self):
        """The lowest bit is set only for a session that does not follow a boot, whatever
        the random bits; a later session keeps its boot's low half, so it names the
        boot (the broker reads both to number carried events)."""
        for fill in (b"\x00", b"\xff", b"\x5a"):
            first = next_session_id(0, lambda n: fill * n, lambda: SECOND + 0.3)
            later = next_session_id(first, counting_random(), lambda: SECOND + 0.3,
                                    boot=boot_of(first))
            self.assertEqual((continues_boot(first), continues_boot(later)), (False, True))
            self.assertGreater(later, first)
            self.assertTrue(same_boot(first, later))
            self.assertFalse(same_boot(first, first))      # a boot's first continues nothing

    def test_later_pick_in_the_same_second_is_greater(self):
        """A process that forgot every earlier id (last 0) still picks above an id picked
        earlier in the same wall-clock second, whatever the random bits of either."""
        early = next_session_id(0, lambda n: b"\xff" * n, lambda: SECOND + 0.25)
        late = next_session_id(0, lambda n: bytes(n), lambda: SECOND + 0.25 + 2 * TICK)
        self.assertEqual(early >> 32, late >> 32)
        self.assertGreater(late, early)

    @settings(max_examples=200, deadline=None)
    @given(st.floats(0, 1 - 2 * TICK), st.floats(1.01 * TICK, 1),
           st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
    def test_time_orders_ids_within_a_second(self, at, gap, first, second):
        """Of two picks without memory in one second at least a tick (1/4096 s) apart,
        the later one is always the greater."""
        later = min(at + gap, 1 - TICK / 2)
        assume(later - at >= 1.01 * TICK)
        early = next_session_id(0, lambda n: first[:n], lambda: SECOND + at)
        late = next_session_id(0, lambda n: second[:n], lambda: SECOND + later)
        self.assertGreater(late, early)

    def test_same_tick_picks_differ_in_random_bits(self):
        """Picks at the very same instant differ in their random low bits, so two
        processes share an id (a session key) only if their random bits match too."""
        moment = SECOND + 0.5
        ids = {next_session_id(0, lambda n, i=i: i.to_bytes(n, "big"), lambda: moment)
               for i in range(1, 65)}
        self.assertEqual(len(ids), 64)
        self.assertEqual(len({value >> LOW_BITS for value in ids}), 1)
        self.assertEqual({value & RANDOM_MASK for value in ids},
                         {i << 1 for i in range(1, 65)})

    def test_random_part_uses_all_its_bits(self):
        """All 19 random bits come from random_bytes (none lost to the time part or
        to the boot bit)."""
        value = next_session_id(0, lambda n: b"\xff" * n, lambda: SECOND)
        self.assertEqual(value & RANDOM_MASK, RANDOM_MASK)
        self.assertEqual(value & 0xFFFFFFFF, RANDOM_MASK)  # tick 0, a boot's first

    def test_ahead_of_the_clock_orders_by_epoch(self):
        """A second id within one second takes the next epoch (ahead of the clock), above
        the last whatever its bits."""
        last = next_session_id(0, lambda n: b"\xff" * n, lambda: SECOND + 0.9)
        ahead = next_session_id(last, lambda n: b"\xff" * n, lambda: SECOND + 0.95)
        self.assertEqual(ahead >> 32, SECOND + 1)
        self.assertGreater(ahead, last)

    def test_ahead_of_the_clock_the_boot_name_is_random(self):
        """With the clock behind the stored ids (no real-time clock yet, a clock set
        back) the time field is random too, so boot names keep 31 random bits (with
        it always 0, two boots would share a name with probability 2^-19)."""
        names = set()
        last = (SECOND + 100) << 32                    # stored ids ahead of the clock
        for _ in range(64):
            first = next_session_id(last, os.urandom, lambda: SECOND)
            names.add(boot_of(first))
        self.assertEqual(len(names), 64)
        self.assertTrue(any(name >= 1 << 20 for name in names))

    def test_zero_low_bits_at_a_second_boundary_become_two(self):
        """A boot's first pick at the exact start of a second with zero random bits is
        still not the epoch alone (an id's low half is never zero)."""
        self.assertEqual(next_session_id(0, lambda n: bytes(n), lambda: SECOND) & 0xFFFFFFFF, 2)

    def test_epoch_overflow_raises(self):
        """No id once the 32-bit epoch is used up, from the last id or from the clock."""
        self.assertRaises(ValueError, next_session_id, 0xFFFFFFFF << 32, counting_random(),
                          lambda: SECOND)
        self.assertRaises(ValueError, next_session_id, 0, counting_random(),
                          lambda: float(1 << 32))
        self.assertEqual(next_session_id(0xFFFFFFFE << 32, counting_random(),
                                         lambda: SECOND) >> 32, 0xFFFFFFFF)


class SessionIdsTests(SynchronousTestCase):
    """The file that makes a reboot start a strictly newer session."""

    def test_sessions_of_one_process_name_its_boot(self):
        """A process's later sessions of a device continue its boot; the next process
        (a reboot, same file) names another boot, also in a continuing session."""
        path = os.path.join(self.mktemp(), "ids.json")
        first = SessionIds(path, random_bytes=counting_random())
        a1 = first.next(5)
        a2 = first.next(5, continues=True)
        self.assertTrue(same_boot(a1, a2))
        rebooted = SessionIds(path, random_bytes=lambda n: b"\x77" * n)
        b1 = rebooted.next(5)
        b2 = rebooted.next(5, continues=True)
        self.assertLess(a2, b1)
        self.assertTrue(same_boot(b1, b2))
        self.assertFalse(same_boot(a2, b2))    # the broker heard only boot a: all new

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

    def test_short_write_keeps_the_old_file(self):
        """A write the kernel cuts short (a full disk, here a file size limit) raises
        OSError and leaves the previous file whole, never a truncated one in its place."""
        path = os.path.join(self.mktemp(), "ids.json")
        ids = SessionIds(path, wall_clock=lambda: SECOND)
        for device in range(1, 9):
            ids.next(device)
        with open(path, "rb") as handle:
            before = handle.read()
        limit = len(before) // 2
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
            self.assertRaises(OSError, ids.next, 1)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), before)
        self.assertEqual(SessionIds(path).last(8), ids.last(8))

    def test_temporary_file_symlink_is_not_followed(self):
        """A symbolic link where the temporary file goes (planted in a shared directory)
        is replaced, never written through: the file it points to stays as it was."""
        directory = self.mktemp()
        os.mkdir(directory, 0o700)
        victim = os.path.join(directory, "victim")
        with open(victim, "w") as handle:
            handle.write("precious")
        path = os.path.join(directory, "ids.json")
        os.symlink(os.path.abspath(victim), path + ".tmp")
        session_id = SessionIds(path).next(5)
        with open(victim) as handle:
            self.assertEqual(handle.read(), "precious")
        self.assertFalse(os.path.islink(path))
        self.assertEqual(SessionIds(path).last(5), session_id)

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

    def test_memory_only_restart_in_the_same_second(self):
        """A second memory-only instance (a new simulate run) later in the same second
        picks above the first one's id for every device, with random bits of its own."""
        clock = iter([SECOND + 0.1] * 50 + [SECOND + 0.6] * 50)
        first = SessionIds(None, wall_clock=lambda: next(clock))
        before = {device: first.next(device) for device in range(1, 51)}
        second = SessionIds(None, wall_clock=lambda: next(clock))
        for device in range(1, 51):
            self.assertGreater(second.next(device), before[device])

    def test_wrong_content_is_a_clear_error(self):
        """A file of the wrong shape (not device -> id) stops with a message naming it."""
        for content in ('[1]', '{"x": 1}', '{"1": "y"}', '{"1": [2]}'):
            path = self.mktemp()
            with open(path, "w") as handle:
                handle.write(content)
            error = self.assertRaises(ValueError, SessionIds, path)
            self.assertIn(path, str(error))


#: A process handing out ids for one device over a shared file (argv: path, device, count).
_WRITER = """
import sys
from broker.node.session_ids import SessionIds
ids = SessionIds(sys.argv[1])
for _ in range(int(sys.argv[3])):
    last = ids.next(int(sys.argv[2]))
print(last)
"""


class SharedFileTests(SynchronousTestCase):
    """One --state file shared by several processes (one device each)."""

    def test_ids_of_another_process_are_not_lost(self):
        """A device's last id stored by one process survives another process, which
        read the file before it, storing its own device's id."""
        path = os.path.join(self.mktemp(), "ids.json")
        first = SessionIds(path)
        second = SessionIds(path)
        used = first.next(1)
        other = second.next(2)
        again = SessionIds(path)
        self.assertEqual((again.last(1), again.last(2)), (used, other))

    def test_one_device_in_two_processes_still_increases(self):
        """An id handed out after another process stored one for the same device is
        above it, even when the clock stands still."""
        path = os.path.join(self.mktemp(), "ids.json")
        first = SessionIds(path, wall_clock=lambda: 10)
        second = SessionIds(path, wall_clock=lambda: 10)
        used = first.next(1)
        self.assertGreater(second.next(1), used)

    def test_lock_file_is_private(self):
        """The lock file beside the ids (taken for each write) is mode 0600."""
        path = os.path.join(self.mktemp(), "ids.json")
        SessionIds(path).next(1)
        self.assertEqual(stat.S_IMODE(os.stat(path + ".lock").st_mode), 0o600)

    def test_processes_writing_at_once_keep_every_device(self):
        """Two processes storing ids for their own devices at the same time leave
        each device's last id in the file."""
        path = os.path.join(os.path.abspath(self.mktemp()), "ids.json")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        writers = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(device), "40"],
                                    cwd=root, stdout=subprocess.PIPE)
                   for device in (1, 2)]
        last = [int(writer.communicate(timeout=60)[0]) for writer in writers]
        for writer in writers:
            self.assertEqual(writer.returncode, 0)
        ids = SessionIds(path)
        self.assertEqual([ids.last(1), ids.last(2)], last)
