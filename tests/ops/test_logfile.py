"""The --logfile under outside rotation: logrotate's copytruncate, create and nocreate (broker.logfile).

A daemon's log is written through O_APPEND, so a truncation by another tool
leaves no hole of NUL bytes, the 1 MB rotation counts the file's real size,
the file stays 0600, and SIGUSR1 after logrotate moved the file reopens it.
"""

import os
import signal
from pathlib import Path

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from broker.config import LogSettings
from broker.logfile import AppendingLogFile
from broker.logs import LogControl, ObserverFactory


def private(path) -> bool:
    """Whether the file at path has mode 0600 exactly."""
    return os.stat(path).st_mode & 0o777 == 0o600


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
