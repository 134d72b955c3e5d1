"""Changes broker-admin made in the database, applied to a running registry.

``broker-admin`` writes the SQLite file directly and appends to its admin
log; the registry reads that log (polled, or at once on ``reload()``)
through the store's writer thread, so datagrams naming unknown devices
never make the broker read the disk.
"""

from twisted.internet import defer

from . import errors
from .model import Device, DeviceView
from .secrets import TokenTable


class AdminReload:
    """DeviceRegistry's admin-reload half (a mixin: see registry.py)."""

    __slots__ = ()

    @defer.inlineCallbacks
    def reload(self):
        """Apply devices and tokens another process (broker-admin) changed in the store."""
        if self._polling:
            return
        self._polling = True
        try:
            entries = yield self._store.admin_changes(self._admin_seq)
            for seq, op, name, number in entries:
                yield self._apply_admin(op, name, number)
                self._admin_seq = max(self._admin_seq, seq)
        except errors.StoreError:
            self.log.failure("reading admin changes failed")
        finally:
            self._polling = False

    @defer.inlineCallbacks
    def _apply_admin(self, op, name, number):
        self.counters["admin_" + op] += 1
        if op == "token":
            # A token added or revoked here while the table was read is not in
            # what was read (its write is queued after the read): read again.
            while True:
                changes = self._token_changes
                rows = yield self._store.fetch_tokens()
                if changes == self._token_changes:
                    break
            self._tokens = TokenTable.from_rows(rows)
            return
        dev = self._by_number.get(number)
        if op == "device_remove":
            if dev is not None and dev.name == name:
                yield self._remove(dev)
            elif dev is None:
                # Added and removed since this registry loaded the store: no
                # client heard of it. broker-admin's tombstone would get a
                # cursor at the next start, above the name's next device.
                yield self._store.write(("drop_pending", number))
            return
        row = yield self._store.fetch_device(number)
        if row is None:
            return
        if op == "device_key" and dev is not None:
            pending = self._rotations.get(number)
            if pending is not None:
                # A rotation made here after the read is written after the
                # admin's: its secret stays; the admin's is the stored one
                # to fall back on should it fail.
                pending[0] = row.secret
                return
            dev.secret = row.secret
            self._keys_changed(number)
        elif op == "device_add" and dev is None and row.name not in self._by_name:
            dev = Device(row.name, row.number, row.secret, row.version)
            if row.state is not None:
                dev.restore_state(row.state)
            self._insert(dev)
            dev.cursor = 0
            # broker-admin cannot know the cursor: the version starts here, as
            # add_device's, above every version of the name's former devices.
            dev.version = max(dev.version, self.cursor)
            self._bump(dev, "created", None, self._clock.seconds())
            self._persist(dev, None)
            self._subs.notify(dev.name, lambda: DeviceView.of(dev))
