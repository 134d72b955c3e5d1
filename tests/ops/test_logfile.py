"""The --logfile under outside rotation: logrotate's copytruncate, create and nocreate (broker.logfile).

A daemon's log is written through O_APPEND, so a truncation by another tool
leaves no hole of NUL bytes, the 1 MB rotation counts the file's real size,
the file stays 0600, and SIGUSR1 after logrotate moved the file reopens it.
A new file that cannot be opened, or a rename logrotate got to first, leaves
the log writing where it was; a FIFO with no reader is refused, not waited on.
"""

import errno
import io
import os
import signal
import stat
import sys
from pathlib import Path

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from broker.config import LogSettings
from broker.logfile import AppendingLogFile
from broker.logs import LogControl, ObserverFactory
from broker.tap import REFUSED, _observer


def private(path) -> bool:
    """Whether the file at path has mode 0600 exactly."""
    return os.stat(path).st_mode & 0o777 == 0o600


def fail_if_blocked(test, seconds=10):
    """Turn a call that blocks (an open waiting for a FIFO's reader) into a failure, not a hung run."""
    def expire(number, frame):
        raise test.failureException(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    test.addCleanup(signal.signal, signal.SIGALRM, previous)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    test.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)


class DaemonLogTests(SynchronousTestCase):
    """What twistd --logfile gets from the broker's ObserverFactory."""

    def setUp(self):
        # The factory installs a process-wide SIGUSR1 handler.
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.path = self.mktemp()
        self.factory = ObserverFactory(LogSettings(level="info", format="text"), LogControl("info"),
                                       self.path)
        self.queued = []
        self.factory.call_from_thread = self.queued.append
        self.log = Logger(namespace="t", observer=self.factory())

    def sigusr1(self):
        """Deliver SIGUSR1 to the handler and run what it hands to the reactor thread."""
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        while self.queued:
            self.queued.pop(0)()

    def test_copytruncate_leaves_no_nul_bytes(self):
        """After logrotate's copytruncate, the next line is written at offset 0, not after a hole of NULs."""
        self.log.info("a line before the rotation, long enough to leave a visible hole")
        Path(self.path + ".1").write_bytes(Path(self.path).read_bytes())
        os.truncate(self.path, 0)
        self.log.info("after the truncation")
        content = Path(self.path).read_bytes()
        self.assertNotIn(b"\0", content)
        self.assertIn(b"after the truncation", content.splitlines()[0])
        self.assertIn(b"before the rotation", Path(self.path + ".1").read_bytes())
        self.assertTrue(private(self.path))

    def test_create_then_sigusr1_reopens(self):
        """logrotate's create + SIGUSR1: new lines go to the new file, logrotate's .1 keeps the old ones, no .2."""
        self.log.info("old line")
        os.rename(self.path, self.path + ".1")
        Path(self.path).touch(0o640)
        self.log.info("late line, still to the moved file")
        self.sigusr1()
        self.log.info("new line")
        self.assertEqual(Path(self.path).read_text().count("\n"), 1)
        self.assertIn("new line", Path(self.path).read_text())
        old = Path(self.path + ".1").read_text()
        self.assertIn("old line", old)
        self.assertIn("late line", old)
        self.assertFalse(os.path.exists(self.path + ".2"))
        self.assertTrue(private(self.path))

    def test_nocreate_then_sigusr1_creates_private_file(self):
        """logrotate's nocreate + SIGUSR1: the broker creates the log again, 0600, and writes there."""
        self.log.info("old line")
        os.rename(self.path, self.path + ".1")
        self.sigusr1()
        self.log.info("new line")
        self.assertIn("new line", Path(self.path).read_text())
        self.assertNotIn("new line", Path(self.path + ".1").read_text())
        self.assertTrue(private(self.path))

    def test_sigusr1_alone_still_rotates(self):
        """Without an outside tool, SIGUSR1 shifts the log to .1 and then .2, as twistd's own does."""
        self.log.info("first")
        self.sigusr1()
        self.log.info("second")
        self.sigusr1()
        self.log.info("third")
        self.assertIn("first", Path(self.path + ".2").read_text())
        self.assertIn("second", Path(self.path + ".1").read_text())
        self.assertIn("third", Path(self.path).read_text())
        for suffix in ("", ".1", ".2"):
            self.assertTrue(private(self.path + suffix), suffix)


class AppendingLogFileTests(SynchronousTestCase):
    """The file object itself: size-based rotation and permissions."""

    def open(self, rotate_length=100):
        path = self.mktemp()
        log_file = AppendingLogFile.fromFullPath(path, rotateLength=rotate_length,
                                                 defaultMode=0o600)
        self.addCleanup(lambda: log_file.closed or log_file.close())
        return path, log_file

    def test_size_rotation_counts_real_size(self):
        """After an outside truncation, rotation waits until the file itself reaches rotateLength."""
        path, log_file = self.open(rotate_length=100)
        log_file.write("a" * 89 + "\n")
        os.truncate(path, 0)
        log_file.write("b" * 19 + "\n")
        log_file.write("c" * 19 + "\n")
        self.assertFalse(os.path.exists(path + ".1"), "rotated a 20-byte file")
        log_file.write("d" * 69 + "\n")
        log_file.write("e\n")
        rotated = "b" * 19 + "\n" + "c" * 19 + "\n" + "d" * 69 + "\n"
        self.assertEqual(Path(path + ".1").read_text(), rotated)
        self.assertEqual(Path(path).read_text(), "e\n")

    def test_size_rotation_counts_lines_of_other_writers(self):
        """Bytes appended by another process count toward rotateLength too."""
        path, log_file = self.open(rotate_length=100)
        log_file.write("ours\n")
        with open(path, "ab") as other:
            other.write(b"x" * 100)
        log_file.write("next\n")
        self.assertTrue(os.path.exists(path + ".1"))
        self.assertEqual(Path(path).read_text(), "next\n")

    def test_existing_world_readable_file_made_private(self):
        """An existing 0644 log is made 0600 and appended to, its earlier lines kept."""
        path = self.mktemp()
        Path(path).write_text("earlier\n")
        os.chmod(path, 0o644)
        log_file = AppendingLogFile.fromFullPath(path, defaultMode=0o600)
        self.addCleanup(log_file.close)
        log_file.write("later\n")
        self.assertTrue(private(path))
        self.assertEqual(Path(path).read_text(), "earlier\nlater\n")

    def test_new_file_private_whatever_the_umask(self):
        """A log created under umask 0 is 0600 all the same, and so is the one a rotation opens."""
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        path, log_file = self.open()
        self.assertTrue(private(path))
        log_file.rotate()
        self.assertTrue(private(path))
        self.assertTrue(private(path + ".1"))

    def test_device_mode_left_alone(self):
        """A --logfile that is not a regular file (a FIFO here, /dev/null in life) keeps its mode."""
        path = self.mktemp()
        os.mkfifo(path, 0o644)
        os.chmod(path, 0o644)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(os.close, reader)
        log_file = AppendingLogFile.fromFullPath(path, defaultMode=0o600)
        self.addCleanup(log_file.close)
        log_file.write("through the pipe\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)
        self.assertEqual(os.read(reader, 100), b"through the pipe\n")


class FailedRotationTests(SynchronousTestCase):
    """A rotation or reopen that cannot be done leaves the log writing to the file it has open."""

    def setUp(self):
        self.warnings = []
        self.patch(AppendingLogFile, "log", Logger(observer=self.warnings.append))

    def open(self, path, rotate_length=100, **kwargs):
        log_file = AppendingLogFile.fromFullPath(path, rotateLength=rotate_length,
                                                 defaultMode=0o600, **kwargs)
        self.addCleanup(lambda: log_file.closed or log_file.close())
        return log_file

    def test_reopen_that_fails_keeps_old_file(self):
        """After nocreate moved the log, a SIGUSR1 reopen that fails keeps writing to the moved file, said once."""
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "twistd.log")
        log_file = self.open(path, rotate_length=None)
        log_file.write("before\n")
        moved = self.mktemp()
        os.rename(path, moved)          # logrotate nocreate, to another directory
        os.rmdir(directory)             # and nowhere to create the new file (as for twistd --uid)
        log_file.rotate()               # SIGUSR1
        log_file.write("after\n")
        log_file.rotate()
        log_file.write("after again\n")
        self.assertEqual(Path(moved).read_text(), "before\nafter\nafter again\n")
        self.assertEqual(len(self.warnings), 1, [formatEvent(e) for e in self.warnings])
        self.assertIn(path, formatEvent(self.warnings[0]))
        os.mkdir(directory)             # the directory is back: the next SIGUSR1 opens the path
        log_file.rotate()
        log_file.write("new file\n")
        self.assertEqual(Path(path).read_text(), "new file\n")
        self.assertTrue(private(path))

    def test_logrotate_rename_racing_size_rotation(self):
        """logrotate renaming the log just before the 1 MB rotation's own rename loses no line and kills nothing."""
        path = os.path.abspath(self.mktemp())
        log_file = self.open(path)
        real_rename = os.rename

        def logrotate_first(source, target):
            if source == path:
                real_rename(path, path + "-20250101")
            real_rename(source, target)
        self.patch(os, "rename", logrotate_first)
        log_file.write("a" * 120 + "\n")      # over rotateLength: the next write rotates
        log_file.write("rotating now\n")
        self.patch(os, "rename", real_rename)
        log_file.write("later line\n")
        self.assertEqual(Path(path + "-20250101").read_text(), "a" * 120 + "\n")
        self.assertEqual(Path(path).read_text(), "rotating now\nlater line\n")
        self.assertFalse(os.path.exists(path + ".1"))
        self.assertTrue(private(path))

    def test_rotation_that_cannot_rename_keeps_writing(self):
        """A size rotation whose renames fail (a directory where an old log is to go) keeps the file open, said once."""
        path = os.path.abspath(self.mktemp())
        log_file = self.open(path, maxRotatedFiles=1)
        os.mkdir(path + ".1")
        Path(path + ".1", "in-the-way").touch()
        log_file.write("a" * 120 + "\n")
        log_file.write("b\n")
        log_file.write("c\n")
        self.assertEqual(Path(path).read_text(), "a" * 120 + "\nb\nc\n")
        self.assertEqual(len(self.warnings), 1, [formatEvent(e) for e in self.warnings])
        self.assertIn("cannot rotate", formatEvent(self.warnings[0]))


class FifoLogTests(SynchronousTestCase):
    """A --logfile that is a FIFO: written to while read, refused when nothing reads it."""

    def fifo(self):
        path = os.path.abspath(self.mktemp())
        os.mkfifo(path, 0o600)
        return path

    def test_fifo_without_reader_refused_at_once(self):
        """Opening a FIFO nothing reads fails at once with ENXIO and a message naming the FIFO, not a hang."""
        path = self.fifo()
        fail_if_blocked(self)
        problem = self.assertRaises(OSError, AppendingLogFile.fromFullPath, path, defaultMode=0o600)
        self.assertEqual((problem.errno, problem.filename), (errno.ENXIO, path))
        self.assertIn("FIFO with no reader", problem.strerror)

    def test_twistd_refuses_fifo_in_one_line(self):
        """twistd broker --logfile FIFO with no reader exits 2 with one line naming the path."""
        path = self.fifo()
        factory = ObserverFactory(LogSettings(level="info", format="text"), LogControl("info"), path)
        self.patch(sys, "stderr", io.StringIO())
        fail_if_blocked(self)
        exit = self.assertRaises(SystemExit, _observer, factory)
        self.assertEqual(exit.code, REFUSED)
        self.assertEqual(sys.stderr.getvalue(), f"twistd broker: --logfile: cannot open {path!r}: "
                                                "a FIFO with no reader (start its reader first)\n")

    def test_rotation_leaves_fifo_in_place(self):
        """SIGUSR1 on a FIFO log neither renames the FIFO nor puts a regular file in its place."""
        path = self.fifo()
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(os.close, reader)
        log_file = AppendingLogFile.fromFullPath(path, defaultMode=0o600)
        self.addCleanup(log_file.close)
        log_file.rotate()
        log_file.write("still through the pipe\n")
        self.assertTrue(stat.S_ISFIFO(os.stat(path).st_mode))
        self.assertFalse(os.path.exists(path + ".1"))
        self.assertEqual(os.read(reader, 100), b"still through the pipe\n")
