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
"""

from __future__ import annotations

import os
import stat

from twisted.python import threadable
from twisted.python.logfile import LogFile


class AppendingLogFile(LogFile):
    """A LogFile whose writes land at the end of the file as it is now, not as it was."""

    # Our rotate is locked as LogFile's own write and rotate are (threads may log).
    synchronized = ["rotate"]

    def _openFile(self) -> None:
        self.closed = False
        # Created with no more than defaultMode's bits: never readable by others, even briefly.
        mode = 0o666 if self.defaultMode is None else self.defaultMode
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
        self._file = os.fdopen(fd, "ab", 0)  # unbuffered: a crash loses no complete line
        status = os.fstat(fd)
        if self.defaultMode is not None and stat.S_ISREG(status.st_mode):
            # An existing file is made private too; a device (/dev/null) is left alone.
            try:
                os.fchmod(fd, self.defaultMode)
            except OSError:
                pass  # not ours to change: written to as it is, as LogFile does
        self.size = status.st_size

    def shouldRotate(self) -> bool:
        """Rotate by the file's real size (another tool may have truncated it)."""
        self.size = os.fstat(self._file.fileno()).st_size
        return super().shouldRotate()

    def rotate(self) -> None:
        """Shift to ``.1``, ``.2``, ...; or, if the file was moved away, reopen the path."""
        if self._moved_away():
            self.reopen()
        else:
            super().rotate()

    def _moved_away(self) -> bool:
        """Whether the path no longer names the file being written (renamed by logrotate)."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell: LogFile's rotate decides (and gives up quietly)
        open_file = os.fstat(self._file.fileno())
        return (named.st_dev, named.st_ino) != (open_file.st_dev, open_file.st_ino)


threadable.synchronize(AppendingLogFile)
