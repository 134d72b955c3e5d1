"""Session ids a device never repeats, also across reboots (wire.md 3).

The broker accepts a new session only with an id greater than the device's
current one, so a device must remember the last id it used.  The id is
``epoch << 32 | tick << 20 | random19 << 1 | continues`` (wire.md's ``boot
counter << 32 | random32`` is an example; the broker compares ids, and
reads the low half as the boot's identity, below):

* ``epoch`` is one more than the last stored one, and at least the
  wall-clock second, so even a device that lost its file (or a memory-only
  ``simulate`` run) starts above the ids it used before, unless its clock
  went back.
* ``tick`` is the time within that second in 1/4096 s (244 us), when the
  epoch is the wall-clock second: a process that forgot the ids picked
  earlier in the same second (a second ``simulate`` run, a quick reboot
  without the file) still picks above them.  Processes start far more
  than a tick apart.  An epoch ahead of the clock (a second id within one
  second, or a clock behind: a device without a real-time clock before it
  syncs, a clock set back) is above the last id by itself, and its time
  field is random instead: it still names the boot with 31 random bits.
* ``random19``: 19 random bits.
* ``continues`` (``broker.ssp.framing.CONTINUES_BOOT``): 1 when the device
  starts the session without having rebooted, 0 in a boot's first session.
  The sessions of one boot share the first one's tick and random bits: the
  low half, without this bit, names the boot (``framing.same_boot``).  The
  broker reads both to tell a rebooted device's events, numbered from 0
  again, from events carried over from an earlier session of the same
  boot that never had any acknowledged (docs/protocol.md 5); a boot the
  broker never heard (its first session lost) has another name, so its
  events are never taken for ones stored already.  The low 32 bits are
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
than a process restart.  Ids ahead of the clock (a random time field) of
two processes match with probability 2^-31.  A later session of a boot,
or an id ahead of the clock, has no time in its low half: a forgetful
process picking in the very second of that id's epoch may pick below it,
and is refused until its next rekey (a delay, never a reused id).  Two
boots share a name with probability 2^-31.

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
from broker.ssp.framing import CONTINUES_BOOT, boot_of

_MAX_EPOCH = (1 << 32) - 1
#: The time within a second, in ticks of 1/TICKS_PER_SECOND s (12 bits).
_TICK_BITS = 12
TICKS_PER_SECOND = 1 << _TICK_BITS
#: The low bits of an id below the tick: random ones and the boot bit.
LOW_BITS = 20
_RANDOM_MASK = (1 << (LOW_BITS - 1)) - 1


def next_session_id(last: int, random_bytes=os.urandom, wall_clock=time.time,
                    boot: int | None = None) -> int:
    """An id strictly greater than last: a new epoch, then either a boot's first
    low half (``boot`` None: the tick within the second when the epoch is the
    clock's, else random bits, then 19 random bits, the boot bit clear; never
    zero) or, for a later session of a boot, that boot's low half (``boot``,
    see ``boot_of``) with the boot bit set."""
    wall = wall_clock()
    second = int(wall)
    epoch = max((last >> 32) + 1, second)
    if epoch > _MAX_EPOCH:
        raise ValueError("session id epochs exhausted for this device")
    if boot is not None:
        return (epoch << 32) | boot | CONTINUES_BOOT
    drawn = int.from_bytes(random_bytes(4), "big")
    if epoch == second:
        tick = min(int((wall - second) * TICKS_PER_SECOND), TICKS_PER_SECOND - 1)
    else:
        # Ahead of the clock: the epoch orders the id, so the time field names
        # the boot at random (with the clock behind it would always be 0).
        tick = drawn >> (32 - _TICK_BITS)
    random = drawn & _RANDOM_MASK
    return (epoch << 32) | (tick << LOW_BITS | random << 1 or 2)


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
        #: each device's boot name (its first id's low half) in this process.
        self._boots: dict[int, int] = {}
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
        returned; ``continues``: the device has not rebooted since its last session
        in this process (the id then names the same boot).

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
        boot = self._boots.get(device_number) if continues else None
        session_id = next_session_id(self.last(device_number), self._random_bytes,
                                     self._wall_clock, boot)
        self._boots[device_number] = boot_of(session_id)
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
