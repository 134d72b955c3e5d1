"""Session ids a device never repeats, also across reboots (wire.md 3).

The broker accepts a new session only with an id greater than the device's
current one, so a device must remember the last id it used.  An id is
``(epoch << 32) | random32``: the epoch is one more than the last stored
one, and at least the wall-clock second, so even a device that lost its
file starts above the ids it used before (unless its clock went back).
The new id is written (fsync, then rename) before it is used.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

_U32 = 0xFFFFFFFF
_MAX_EPOCH = (1 << 32) - 1


def next_session_id(last: int, random_bytes=os.urandom, wall_clock=time.time) -> int:
    """An id strictly greater than last: a new epoch and 32 random bits (never zero)."""
    epoch = max((last >> 32) + 1, int(wall_clock()))
    if epoch > _MAX_EPOCH:
        raise ValueError("session id epochs exhausted for this device")
    low = int.from_bytes(random_bytes(4), "big") or 1
    return (epoch << 32) | low


class SessionIds:
    """The last session id of each device, kept in one JSON file (or memory only).

    ``path`` None keeps them in memory: a restarted process then relies on
    the wall clock alone (fine for simulations, not for real devices).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, random_bytes=os.urandom,
                 wall_clock=time.time) -> None:
        self.path = Path(path) if path is not None else None
        self._random_bytes = random_bytes
        self._wall_clock = wall_clock
        self._last: dict[int, int] = {}
        if self.path is not None and self.path.exists():
            self._last = self._read()

    def _read(self) -> dict[int, int]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as problem:
            raise ValueError(f"{self.path}: cannot read session ids: {problem}") from None
        shape = f"{self.path}: expected a JSON object of device number -> last session id"
        if not isinstance(data, dict):
            raise ValueError(shape)
        try:
            return {int(device): int(session_id) for device, session_id in data.items()}
        except (TypeError, ValueError):
            raise ValueError(shape) from None

    def last(self, device_number: int) -> int:
        """The last id used for device (0 if none)."""
        return self._last.get(device_number, 0)

    def next(self, device_number: int) -> int:
        """A new id for device, strictly above every earlier one, stored before it is returned."""
        session_id = next_session_id(self.last(device_number), self._random_bytes,
                                     self._wall_clock)
        self._last[device_number] = session_id
        if self.path is not None:
            self._write()
        return session_id

    def _write(self) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({str(device): session_id
                           for device, session_id in sorted(self._last.items())})
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a stale temporary file may be looser
            os.write(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
