"""Small private files replaced whole, and the private directories they live in.

Why one way to write them: a crash, a full disk or a short write must leave
the old file or the new one, never a truncated one, and a file that holds
ids or secrets must never be readable by others, not even for a moment.

Why one way to make directories: ``os.makedirs(mode=0o700)`` applies the
mode to the last directory only; the parents it makes get ``0777 & ~umask``,
world-writable under umask 000, where another user could swap the private
directory for one of their own before the next start.
"""

from __future__ import annotations

import errno
import os
import tempfile

__all__ = ["make_private_dirs", "replace_private_file"]


def make_private_dirs(path: str | os.PathLike) -> None:
    """Make ``path`` and each missing parent, every one of them 0700 (existing
    ones are left as they are). The path is followed as the system follows it
    (``link/..`` is the link target's parent), not simplified as text."""
    path = os.fspath(path)
    try:
        os.mkdir(path, 0o700)
    except FileNotFoundError:
        parent = os.path.dirname(path.rstrip(os.sep))
        if not parent or parent == path:
            raise
        make_private_dirs(parent)
        make_private_dirs(path)
        return
    except FileExistsError:
        if not os.path.isdir(path):            # a file in the way: say so
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                     path) from None
        return
    os.chmod(path, 0o700)                      # mkdir's mode is masked by the umask


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
    make_private_dirs(directory)
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
