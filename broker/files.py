"""Small private files replaced whole: a device's session ids, a data set's marker.

Why one way to write them: a crash, a full disk or a short write must leave
the old file or the new one, never a truncated one, and a file that holds
ids or secrets must never be readable by others, not even for a moment.
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["replace_private_file"]


def replace_private_file(path: str | os.PathLike, data: bytes) -> None:
    """Make ``data`` the content of ``path``, atomically.

    A new file beside it (``mkstemp``: mode 0600, a random name opened with
    O_EXCL, so no planted link is followed) is written whole and fsynced,
    then renamed over ``path``, and the directory is fsynced so that the
    rename survives a power loss.  The directory is made (0700) if missing.
    Raises OSError; the old file is then as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                     dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)     # a file object writes it all, or raises
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
