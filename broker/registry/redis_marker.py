"""The Redis data set a data directory last served: the interlock against an emptied Redis.

A running process notices Redis losing its data (the data set's marker
``{p}:incarnation`` changes or vanishes, redis_store.py). A process that
STARTS on an emptied Redis cannot see that from Redis alone: it would set
a new marker and serve an empty registry. So each broker (and broker-admin
when it writes) remembers in its data directory the marker it adopted for
that Redis URL and key prefix, and refuses to start when Redis holds no
marker or another one (``MarkerMismatch``, one line: what probably
happened, and the two remedies). ``broker-admin redis adopt-new`` is the
deliberate way to start serving a new data set (docs/scaling.md).

One small JSON file per Redis URL and key prefix (the URL redacted, so no
password is written), 0600 in the 0700 data directory, replaced
atomically: a temporary file in the same directory, fsync, rename. Workers
of one supervisor share the data directory; starting together on an empty
Redis they adopt the same marker (``ADOPT`` is SET NX), so they write the
same file and none refuses another.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
from contextlib import contextmanager

from broker.files import make_private_dirs, replace_private_file

from .errors import StoreError
from .redis_connection import redacted

#: the explicit command that makes a data directory serve Redis's data set now.
ADOPT_NEW = "broker-admin redis adopt-new"


class MarkerMismatch(StoreError):
    """Redis holds no data set marker, or another one, than the one the data
    directory remembers: starting would serve an emptied (or another) registry."""


class OlderCopy(StoreError):
    """Redis holds the remembered data set, but at a change sequence below one
    this data directory saw it at: an older copy, which ``broker-admin redis
    restored`` must be told about before a broker serves it."""


#: the command that tells the data set it was put back to an older copy.
RESTORED = "broker-admin redis restored"


def spelt_out(command, data_dir):
    """``command`` as the operator must type it: with the data directory absolute, since
    broker-admin would take a relative data_dir from its own working directory, not the
    broker's (the unit's WorkingDirectory)."""
    return f"`{command} --config CONFIG --data-dir {shlex.quote(data_dir)}`"


class RememberedMarker:
    """The marker a data directory remembers for one Redis URL and key prefix."""

    def __init__(self, data_dir, url, key_prefix):
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.url = redacted(url)
        self.key_prefix = key_prefix
        digest = hashlib.sha256(f"{self.url}\0{key_prefix}".encode()).hexdigest()[:16]
        self.path = os.path.join(self.data_dir, f"redis-marker-{digest}.json")

    @classmethod
    def for_options(cls, data_dir, options):
        """The remembered marker of ``options`` (a RedisOptions) in ``data_dir``."""
        return cls(data_dir, options.url, options.key_prefix)

    def read(self):
        """The remembered marker, or None (never recorded). StoreError if unreadable."""
        return self._read()[0]

    def sequence_seen(self, marker):
        """The highest change sequence recorded for the data set ``marker``, or None."""
        remembered, sequence = self._read()
        return sequence if remembered == marker else None

    def _read(self):
        """(marker or None, sequence seen or None)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                body = json.load(handle)
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read the remembered Redis data set marker {self.path!r}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        marker = body.get("marker") if isinstance(body, dict) else None
        if not isinstance(marker, str) or not marker:
            raise StoreError(f"the remembered Redis data set marker {self.path!r} is damaged; "
                             f"run {spelt_out(ADOPT_NEW, self.data_dir)} (CONFIG: the "
                             "broker's config file) only if Redis holds the right data set")
        sequence = body.get("sequence")
        if type(sequence) is not int or sequence < 0:
            sequence = None  # written before sequences were, or damaged: no check
        return marker, sequence

    def record(self, marker, sequence=None):
        """Remember ``marker``, and ``sequence`` as the highest change sequence seen
        in it (atomically; the directory made 0700 if missing)."""
        fields = {"url": self.url, "key_prefix": self.key_prefix, "marker": marker}
        if sequence is not None:
            fields["sequence"] = sequence
        body = json.dumps(fields, sort_keys=True) + "\n"
        try:
            replace_private_file(self.path, body.encode("utf-8"))
        except OSError as e:
            raise StoreError(f"cannot record the Redis data set marker in {self.path!r}: "
                             f"{e.strerror or e}") from None

    def check(self, found, key, remembered):
        """Raise MarkerMismatch unless ``found`` (Redis's marker at ``key``, None if
        absent) is ``remembered`` (read before Redis was asked) or that is None."""
        if remembered is None or found == remembered:
            return
        if found is None:
            what = (f"has no data set marker {key}, but data directory {self.data_dir} last "
                    f"served the data set marked {remembered} there: Redis was probably "
                    "emptied (FLUSHALL, a restart without persistence, a replacement server "
                    "or a failed restore) and every device would be unknown")
        else:
            what = (f"holds the data set marked {found} ({key}), but data directory "
                    f"{self.data_dir} last served the one marked {remembered} there: Redis was "
                    "probably emptied and a new data set started on it since, or this is "
                    "another Redis")
        raise MarkerMismatch(
            f"Redis at {self.url} (key prefix {self.key_prefix}) {what}; refusing to start. "
            "Restore Redis from its persistence (AOF/RDB) or a backup, or, to serve the data "
            f"set Redis holds now (a new one if it is empty) deliberately, run, as the "
            f"broker's user, {spelt_out(ADOPT_NEW, self.data_dir)} (CONFIG: this broker's "
            "config file; docs/scaling.md)")

    def raise_sequence(self, marker, sequence):
        """Remember ``sequence`` as seen in the data set ``marker`` unless a higher
        one is remembered already (a sibling process may have recorded it)."""
        with self._exclusive():
            seen = self.sequence_seen(marker)
            if seen is None or sequence > seen:
                self.record(marker, sequence)

    @contextmanager
    def _exclusive(self):
        """Hold the marker's lock file (flock) from the read to the replace:
        sibling workers that stop together must not write a lower sequence over
        a higher one (that would only weaken the check, but silently)."""
        lock_path = self.path[:-len(".json")] + ".lock"
        try:
            make_private_dirs(self.data_dir)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open the Redis data set marker's lock {lock_path!r}: "
                             f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)   # held for one small file's replace
            yield
        finally:
            os.close(fd)                     # closing releases the flock

    def check_sequence(self, marker, found, seen, key):
        """Raise OlderCopy if Redis's change sequence ``found`` (at ``key``) is below
        ``seen``, the one this data directory saw in the data set ``marker`` (read
        before Redis was: a sibling recording meanwhile is no older copy)."""
        if seen is None or found >= seen:
            return
        raise OlderCopy(
            f"Redis at {self.url} (key prefix {self.key_prefix}) holds the data set marked "
            f"{marker} at change {found} ({key}), but data directory {self.data_dir} saw it "
            f"at change {seen}: Redis was put back to an older copy (a restore, a replica "
            "promoted behind its primary, or a restart that lost writes), and devices went on "
            "past it; refusing to start. With every broker stopped, run, as the broker's "
            f"user, {spelt_out(RESTORED, self.data_dir)} (CONFIG: this broker's config "
            "file; docs/scaling.md), then start again")
