"""The daemon's --logfile: twistd's rotating LogFile, but opened for appending.

Twisted's LogFile opens an existing log "rb+" and seeks to its end once. When
another tool truncates the file (logrotate's ``copytruncate``), it goes on
writing at its old offset, so the log starts with that many NUL bytes, and
its own byte count, which decides the 1 MB rotation, is wrong from then on.
Here every write goes through O_APPEND (the kernel puts it at the file's real
end, whatever happened to the file), the size is read back from the file
before each rotation decision, and a rotation asked for after logrotate has
already moved the file away (``create`` or ``nocreate`` with a SIGUSR1 in
``postrotate``) just opens a fresh file at the path instead of renaming
logrotate's.

The open file is given up only once its successor is open: a new file the
broker may not create (``twistd --uid`` in a root-owned directory) or a
rename logrotate got to first leaves the log where it was, never closed
(Twisted's rotate closes it first, and every later line then fails).
"""

from __future__ import annotations

import errno
import os
import stat

from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.logfile import LogFile


class AppendingLogFile(LogFile):
    """A LogFile whose writes land at the end of the file as it is now, not as it was."""

    log = Logger()

    # Locked as LogFile's own write is (threads may log).
    synchronized = ["rotate", "reopen"]

    #: whether the last attempt to open the path failed (said once, not per line)
    _failing = False

    def _openFile(self) -> None:
        self._file, self.size = self._open_path()
        self.closed = False

    def _open_path(self):
        """The path, opened for appending and created private: (file, size now).

        Opened without blocking: a FIFO with no reader would otherwise hang
        twistd at start, with no word; it is refused instead (ENXIO).
        """
        # Created with no more than defaultMode's bits: never readable by others, even briefly.
        mode = 0o666 if self.defaultMode is None else self.defaultMode
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, mode)
        except OSError as problem:
            if problem.errno == errno.ENXIO and _is_fifo(self.path):
                raise OSError(errno.ENXIO, "a FIFO with no reader (start its reader first)",
                              self.path) from None
            raise
        try:
            os.set_blocking(fd, True)  # a slow reader of a FIFO holds the writer back, as usual
            status = os.fstat(fd)
            if self.defaultMode is not None and stat.S_ISREG(status.st_mode):
                # An existing file is made private too; a device (/dev/null) is left alone.
                try:
                    os.fchmod(fd, self.defaultMode)
                except OSError:
                    pass  # not ours to change: written to as it is, as LogFile does
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "ab", 0), status.st_size  # unbuffered: a crash loses no complete line

    def shouldRotate(self) -> bool:
        """Rotate by the file's real size (another tool may have truncated it)."""
        self.size = os.fstat(self._file.fileno()).st_size
        return super().shouldRotate()

    def reopen(self) -> None:
        """Write to a file opened at the path from now on; if none can be, to the same file."""
        try:
            opened, size = self._open_path()
        except OSError as problem:
            self._cannot("open", problem)
            return
        old, self._file, self.size, self.closed = getattr(self, "_file", None), opened, size, False
        self._failing = False
        if old is not None:
            old.close()

    def rotate(self) -> None:
        """Shift to ``.1``, ``.2``, ...; or, if the file was moved away, reopen the path."""
        if self._moved_away():
            self.reopen()
            return
        if not stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):
            return  # /dev/null or a FIFO: nothing to shift, and not ours to rename
        try:
            self._shift_rotated()
            # Renamed while still open (O_APPEND: no line lost); closed once the next is open.
            os.rename(self.path, f"{self.path}.1")
        except FileNotFoundError:
            pass  # logrotate renamed it first: a new file at the path, as after its SIGUSR1
        except OSError as problem:
            self._cannot("rotate", problem)
            return
        self.reopen()

    def _shift_rotated(self) -> None:
        """``.1`` to ``.2``, ``.2`` to ``.3``, ... (beyond maxRotatedFiles: removed)."""
        for number in reversed(self.listLogs()):
            name = f"{self.path}.{number}"
            if self.maxRotatedFiles is not None and number >= self.maxRotatedFiles:
                os.remove(name)
            else:
                os.rename(name, f"{self.path}.{number + 1}")

    def _cannot(self, action: str, problem: OSError) -> None:
        """Say once (until a reopen works again) that the log stays in the file open now."""
        if self._failing:
            return
        self._failing = True  # first: the warning itself is written through this file
        self.log.warn("--logfile: cannot {action} {path}: {reason}; lines go on to the file "
                      "open before", action=action, path=self.path,
                      reason=problem.strerror or problem)

    def _moved_away(self) -> bool:
        """Whether the path no longer names the file being written (renamed by logrotate)."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell: the rotation below decides (and says if it cannot)
        open_file = os.fstat(self._file.fileno())
        return (named.st_dev, named.st_ino) != (open_file.st_dev, open_file.st_ino)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


threadable.synchronize(AppendingLogFile)
