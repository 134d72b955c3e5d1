"""Session ids a device never repeats, also across reboots (wire.md 3).

The broker accepts a new session only with an id greater than the device's
current one, so a device must remember the last id it used.  The id is
``epoch << 32 | tick << 20 | random19 << 1 | continues`` (wire.md's ``boot
counter << 32 | random32`` is an example; the broker compares ids, and
reads only the lowest bit):

* ``epoch`` is one more than the last stored one, and at least the
  wall-clock second, so even a device that lost its file (or a memory-only
  ``simulate`` run) starts above the ids it used before, unless its clock
  went back.
* ``tick`` is the time within that second in 1/4096 s (244 us), when the
  epoch is the wall-clock second: a process that forgot the ids picked
  earlier in the same second (a second ``simulate`` run, a quick reboot
  without the file) still picks above them.  Processes start far more
  than a tick apart.  An epoch ahead of the clock (a second id within one
  second) is above the last id by itself; its tick is 0, so a forgetful
  pick later in that second is above it too.
* ``random19``: 19 random bits.
* ``continues`` (``broker.ssp.framing.CONTINUES_BOOT``): 1 when the device
  starts the session without having rebooted, 0 in a boot's first session.
  The broker reads it to tell a rebooted device's events, numbered from 0
  again, from a device's events carried over from an earlier session that
  never had any acknowledged (docs/protocol.md 5).  The low 32 bits are
  never all zero (0 becomes 2), so an id is never the epoch alone.

Nonces: one id is one HKDF session key, and every session numbers its
datagrams from 0, so an id must never be used twice for a device.  One
process never repeats its own ids (they increase).  Two processes (a
device without its file, two ``simulate`` runs) can pick the same id only
in the same epoch and tick: two picks within the same 1/4096 s match with
probability 2^-19 (19 random bits), and picks at independent times within
a second with 2^-12 * 2^-19 = 2^-31.  That is why
the time field is coarse (12 bits, not 20 bits of microseconds beside 12
random bits): the bound then holds whatever the clock's resolution and
however closely two processes start, and ordering only needs ticks shorter
than a process restart.  Ids ahead of the clock (tick 0) of two processes
match with probability 2^-19 too.

The new id is written (fsync, then rename) before it is used.  Processes
may share one file (one device each): each write happens under an exclusive
``flock`` of a lock file beside it (``<file>.lock``), after reading the file
again and keeping the greater id of each device, so no process undoes the
ids another one stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from broker.files import make_private_dirs, replace_private_file
from broker.ssp.framing import CONTINUES_BOOT

_MAX_EPOCH = (1 << 32) - 1
#: The time within a second, in ticks of 1/TICKS_PER_SECOND s (12 bits).
TICKS_PER_SECOND = 1 << 12
#: The low bits of an id below the tick: random ones and the boot bit.
LOW_BITS = 20
_RANDOM_MASK = (1 << (LOW_BITS - 1)) - 1


def next_session_id(last: int, random_bytes=os.urandom, wall_clock=time.time,
                    continues: bool = False) -> int:
    """An id strictly greater than last: a new epoch, the tick within the
    second when the epoch is the clock's, 19 random bits and the boot bit
    (``continues``: not the first session since the device booted); the low
    half is never zero."""
    wall = wall_clock()
    second = int(wall)
    epoch = max((last >> 32) + 1, second)
    if epoch > _MAX_EPOCH:
        raise ValueError("session id epochs exhausted for this device")
    tick = 0
    if epoch == second:
        tick = min(int((wall - second) * TICKS_PER_SECOND), TICKS_PER_SECOND - 1)
    random = int.from_bytes(random_bytes(3), "big") & _RANDOM_MASK
    low = tick << LOW_BITS | random << 1 | (CONTINUES_BOOT if continues else 0)
    return (epoch << 32) | (low or 2)


class SessionIds:
    """The last session id of each device, kept in one JSON file (or memory only).

    ``path`` None keeps them in memory: a restarted process then relies on
    the wall clock alone, to 1/4096 s (fine for simulations, not for real
    devices: after the clock is set back, new ids fall below the old ones).
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

    def next(self, device_number: int, continues: bool = False) -> int:
        """A new id for device, strictly above every earlier one, stored before it is
        returned; ``continues``: the device has not rebooted since its last session.

        OSError when it cannot be stored, ValueError when the file holds
        something else or no greater id exists (the id must not be used then).
        """
        if self.path is None:
            return self._pick(device_number, continues)
        with self._locked():
            if self.path.exists():
                for device, session_id in self._read().items():
                    if session_id > self._last.get(device, 0):
                        self._last[device] = session_id   # another process's
            session_id = self._pick(device_number, continues)
            self._write()
        return session_id

    def _pick(self, device_number: int, continues: bool) -> int:
        session_id = next_session_id(self.last(device_number), self._random_bytes,
                                     self._wall_clock, continues)
        self._last[device_number] = session_id
        return session_id

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive flock of ``<file>.lock`` (made private, kept): the file's
        read, merge and replacement are one step for every process sharing it."""
        lock_path = f"{self.path}.lock"
        make_private_dirs(os.path.dirname(lock_path) or ".")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # (releases the lock)

    def _write(self) -> None:
        """Replace the file whole (broker/files.py): the old one or the new one
        survives any failure, and it is never readable by others."""
        data = json.dumps({str(device): session_id
                           for device, session_id in sorted(self._last.items())})
        replace_private_file(self.path, data.encode("utf-8"))
