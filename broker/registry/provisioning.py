"""Provisioning of DeviceRegistry: devices, their keys, SSP session records
and dashboard tokens (the admin CLI and the UDP endpoint's persistence)."""

import re
from bisect import bisect_left, insort

from twisted.internet import defer
from twisted.python.failure import Failure

from . import errors
from .model import Device, DeviceView, Provisioned, TokenInfo, UpdateResult
from .secrets import ROLES, hash_token, new_device_number, new_secret, new_token

#: device names: letters, digits, ``. _ -``, starting with a letter or digit.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def check_name(name):
    """Raise InvalidName unless ``name`` is a valid device name."""
    if not isinstance(name, str) or not name.isascii() or NAME_RE.match(name) is None:
        raise errors.InvalidName(
            f"invalid device name {name!r}: 1-64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit")
    return name


def _ignore_store_error(failure):
    failure.trap(errors.StoreError)


class SessionConflict(errors.RegistryError):
    """A session record write refused: the stored record is another session's
    (a newer one), holds a higher sequence reservation, or (a reservation)
    is not the one the writer confirmed. Its writer must not use the block."""

    code = "session_conflict"

    def __init__(self, device_number, why):
        super().__init__(f"session record of device {device_number} not written: {why}")


def record_refusal(stored, record):
    """Why a plain record write (reports, marks) must not replace ``stored``, or
    None: it never takes the record from a newer session, nor lowers the
    reservation of its own (wire.md 7: a reservation never goes back)."""
    if stored is None:
        return None
    if stored.session_id > record.session_id:
        return "a newer session holds it"
    if stored.session_id == record.session_id and stored.seq_reservation > record.seq_reservation:
        return "its sequence reservation is higher"
    return None


def reservation_refusal(stored, record, expected):
    """Why the reservation ``record`` must not be made (None: it may).

    ``expected`` is the reservation the writer confirmed (or resumed from)
    for this session; None for a new session's first one, which only a
    record of an older session (or none) lets through. The check of
    ``reserve_session``, in memory here, in the Redis script there."""
    if expected is None:
        # (A record of this session with no reservation: a start that failed.)
        if stored is not None and (stored.session_id > record.session_id or (
                stored.session_id == record.session_id and stored.seq_reservation)):
            return "the session was started already"
        return None
    if stored is None or stored.session_id != record.session_id:
        return "the record is another session's"
    if stored.seq_reservation != expected:
        return f"the stored reservation moved on ({stored.seq_reservation}, not {expected})"
    return None


class Provisioning:
    """DeviceRegistry's provisioning half (a mixin: see registry.py)."""

    __slots__ = ()

    # -- the device index (SharedRegistry uses these too) --------------------

    def _free_number(self, name):
        """An unused device number for a new device ``name``; raises InvalidName or DeviceExists."""
        check_name(name)
        if name in self._by_name:
            raise errors.DeviceExists(name)
        number = new_device_number(self._random_bytes)
        while number in self._by_number:
            number = new_device_number(self._random_bytes)
        return number

    def _insert(self, dev):
        self._by_name[dev.name] = dev
        self._by_number[dev.number] = dev
        insort(self._names, dev.name)
        self.online_count += dev.online

    def _forget(self, dev):
        """Drop ``dev`` from the indexes and the feed (its tombstone is the caller's)."""
        del self._by_name[dev.name]
        del self._by_number[dev.number]
        i = bisect_left(self._names, dev.name)
        if i < len(self._names) and self._names[i] == dev.name:
            del self._names[i]
        self.online_count -= dev.online
        if dev.cursor > 0:
            self._feed.stale()
        dev.cursor = 0

    def _removed(self, tomb):
        """Tell observers and key watchers that the device of ``tomb`` is gone."""
        self._subs.notify(tomb.name, lambda: tomb)
        self._keys_changed(tomb.device_number)

    # -- devices ---------------------------------------------------------------

    def add_device(self, name):
        """Provision a device: Deferred[Provisioned] (number and secret) once durable."""
        try:
            number = self._free_number(name)
        except (errors.InvalidName, errors.DeviceExists) as e:
            return defer.fail(e)
        # Its versions start above every cursor, so above every version of a
        # device of the same name removed before (restart.py: versions never
        # exceed cursors): an ETag of that one never names a state of this one.
        dev = Device(name, number, new_secret(self._random_bytes), self.cursor)
        self._insert(dev)
        self._bump(dev, "created", None, self._clock.seconds())
        d = self._store.write(("add", number, name, dev.secret, dev.version, dev.cursor, dev.state()),
                              Provisioned(name, number, dev.secret))
        self._subs.notify(name, lambda: DeviceView.of(dev))
        return d.addErrback(self._add_failed, dev)

    def _add_failed(self, failure, dev):
        """Storage does not hold a new device: remove it again (its tombstone tells
        observers and the feed), or the registry would acknowledge writes to it that
        no restart could restore."""
        if self._by_number.get(dev.number) is dev:
            self._remove(dev).addErrback(_ignore_store_error)
        return failure

    def remove_device(self, name):
        """Remove a device, its state and session; Deferred once durable."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        return self._remove(dev).addErrback(self._remove_failed, dev)

    def _remove_failed(self, failure, dev):
        """Storage still holds a device whose removal failed: put it back (a restart
        would), at a version above its tombstone's, so it can be removed again."""
        if dev.name not in self._by_name and dev.number not in self._by_number:
            self._insert(dev)
            dev.version += 1                       # the tombstone's version
            self._bump(dev, "created", None, self._clock.seconds())
            self._store.write_state(dev).addErrback(_ignore_store_error)
            self._subs.notify(dev.name, lambda: DeviceView.of(dev))
        return failure

    def _remove(self, dev):
        self._forget(dev)
        self.cursor += 1
        tomb = DeviceView.tombstone(dev.name, dev.number, dev.version + 1, self.cursor)
        self._feed.append(tomb, False)
        d = self._store.write(("remove", dev.number, dev.name, tomb.version, tomb.cursor),
                              UpdateResult(dev.name, tomb.version, tomb.cursor))
        self._removed(tomb)
        return d

    def rotate_key(self, name):
        """Give a device a new secret (live sessions end): Deferred[Provisioned] once durable."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        # The last stored secret, kept while rotations are pending, to fall back
        # on if they fail: a secret nobody was shown must not stay in force.
        pending = self._rotations.setdefault(dev.number, [dev.secret, 0])
        pending[1] += 1
        dev.secret = secret = new_secret(self._random_bytes)
        d = self._store.write(("secret", dev.number, secret),
                              Provisioned(name, dev.number, secret))
        self._keys_changed(dev.number)
        return d.addBoth(self._rotated, dev, secret, pending)

    def _rotated(self, result, dev, secret, pending):
        """A rotation is durable (its secret is the stored one) or failed (the device
        falls back to the stored secret unless a later rotation is pending)."""
        pending[1] -= 1
        if not pending[1] and self._rotations.get(dev.number) is pending:
            del self._rotations[dev.number]
        if not isinstance(result, Failure):
            pending[0] = secret
        elif dev.secret is secret and self._by_number.get(dev.number) is dev:
            dev.secret = pending[0]
            self._keys_changed(dev.number)      # sessions keyed with the new secret end
        return result

    # -- SSP session persistence ----------------------------------------------

    def session_record(self, device_number):
        """The saved SessionRecord of a device, or None."""
        dev = self._by_number.get(device_number)
        return None if dev is None else dev.session

    def save_session(self, device_number, record):
        """Keep a SessionRecord; Deferred once durable."""
        dev = self._by_number.get(device_number)
        if dev is None:
            return defer.fail(errors.UnknownDevice(device_number))
        refusal = record_refusal(dev.session, record)
        if refusal is not None:
            return defer.fail(SessionConflict(device_number, refusal))
        dev.session = record
        return self._store.write(("session", device_number, record), record)

    def reserve_session(self, device_number, record, expected):
        """Write ``record`` (a higher sequence reservation of its session) only if
        the stored record is this session's with reservation ``expected`` (None:
        a new session, no record of it yet); SessionConflict if not. One
        process per data directory: the check is in memory, in call order.
        A write the store failed leaves the previous record in memory, so
        the same reservation can be asked again."""
        dev = self._by_number.get(device_number)
        if dev is None:
            return defer.fail(errors.UnknownDevice(device_number))
        previous = dev.session
        refusal = reservation_refusal(previous, record, expected)
        if refusal is not None:
            return defer.fail(SessionConflict(device_number, refusal))
        dev.session = record

        def failed(failure):
            current = dev.session
            if current is record:
                dev.session = previous
            elif (current is not None and current.session_id == record.session_id
                  and current.seq_reservation == record.seq_reservation):
                # A plain record written meanwhile carries it too (the endpoint's
                # report records carry the reservation on its way): not
                # confirmed, so not kept either, or the endpoint's next ask,
                # from the one it confirmed, would conflict with itself. Its
                # content stays.
                same = previous is not None and previous.session_id == record.session_id
                dev.session = current._replace(
                    seq_reservation=previous.seq_reservation if same else 0)
            return failure
        return self._store.write(("session", device_number, record), record).addErrback(failed)

    # -- access tokens -----------------------------------------------------------

    def _new_token(self, role):
        """Make and keep a token in memory: ``(token_id, text, digest, created_at)``.

        Raises InvalidValue for an unknown role."""
        if role not in ROLES:
            raise errors.InvalidValue(f"token role must be one of {', '.join(ROLES)}")
        token_id, text = new_token(self._random_bytes)
        while token_id in self._tokens:
            token_id, text = new_token(self._random_bytes)
        digest = hash_token(text)
        now = self._clock.seconds()
        self._tokens.add(token_id, digest, role, now)
        self._token_changes += 1
        return token_id, text, digest, now

    def add_token(self, role):
        """A new dashboard token: Deferred[(token_id, token_text)] once durable; the text is shown once."""
        try:
            token_id, text, digest, now = self._new_token(role)
        except errors.InvalidValue as e:
            return defer.fail(e)
        d = self._store.write(("token_add", token_id, digest, role, now), (token_id, text))
        return d.addErrback(self._token_add_failed, token_id)

    def _token_add_failed(self, failure, token_id):
        """A token storage does not hold is not valid either (its text was never shown)."""
        if self._tokens.remove(token_id):
            self._token_changes += 1
        return failure

    def check_token(self, token_text):
        """The role (``read`` or ``write``) of a valid token, or None."""
        return self._tokens.check(token_text)

    def revoke_token(self, token_id):
        """Forget a token; Deferred once durable."""
        entry = self._tokens.get(token_id)
        if entry is None:
            return defer.fail(errors.UnknownToken(f"unknown token {token_id!r}"))
        self._tokens.remove(token_id)
        self._token_changes += 1
        return self._store.write(("token_del", token_id), token_id).addErrback(
            self._revoke_failed, token_id, entry)

    def _revoke_failed(self, failure, token_id, entry):
        """Storage still holds a token whose revocation failed: it stays valid (as it
        would after a restart), so revoking it again is possible."""
        if token_id not in self._tokens:
            self._tokens.add(token_id, *entry)
            self._token_changes += 1
        return failure

    def tokens(self):
        """Every token as TokenInfo (id, role, creation time), never its text."""
        return [TokenInfo(tid, role, created) for tid, (_, role, created) in self._tokens.items()]
