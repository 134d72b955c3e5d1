"""Provisioning of a SharedRegistry: devices, keys and tokens, decided by Redis.

Each is one script (unique names, numbers and the cursor are checked
there); the change reaches every process, this one included, through the
change stream.
"""

import cbor2
from twisted.internet import defer

from . import errors
from .database import encode_state
from .history import History
from .model import Device, Provisioned, UpdateResult
from .secrets import new_secret


class SharedProvisioning:
    """SharedRegistry's provisioning half (a mixin: see shared.py)."""

    __slots__ = ()

    def add_device(self, name):
        """Provision a device in Redis: Deferred[Provisioned] once applied here."""
        try:
            number = self._free_number(name)
        except (errors.InvalidName, errors.DeviceExists) as e:
            return defer.fail(e)
        dev = Device(name, number, new_secret(self._random_bytes), 1)
        if self.settings.history_size:
            # Version and cursor 0: the change's own, filled in as it is applied
            # (History.with_cursors): the ADD script makes both the new cursor.
            dev.history = History.of(((0, 0, self._clock.seconds(), "created", None),))
        store = self._store
        keys = [store.device_key(number), store.keys_names, store.key_seq, store.key_feed]
        args = [name, number, dev.secret, encode_state(dev.state()), self.origin,
                store.options.stream_length]

        def replied(reply):
            status, cursor, _ = reply
            if status == "exists":
                raise errors.DeviceExists(name)
            if status == "taken":
                return self.add_device(name)
            d = defer.Deferred()
            self._wait(cursor, d, Provisioned(name, number, dev.secret))
            return d
        return store.write(("add", "add", keys, args)).addCallback(replied)

    def remove_device(self, name):
        """Remove a device everywhere; Deferred once applied here."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        store = self._store
        keys = [store.device_key(dev.number), store.keys_names, store.key_seq, store.key_feed,
                store.key_tombs, store.key_horizon]
        args = [dev.number, self.origin, store.options.stream_length,
                self.settings.feed_retention or 1]

        def replied(reply):
            status, cursor, version = reply
            if status != "ok":
                raise errors.UnknownDevice(name)
            d = defer.Deferred()
            self._wait(cursor, d, UpdateResult(name, version, cursor))
            return d
        return store.write(("remove", "remove", keys, args)).addCallback(replied)

    def rotate_key(self, name):
        """A new secret for a device, everywhere; Deferred[Provisioned] once in Redis."""
        dev = self._by_name.get(name)
        if dev is None:
            return defer.fail(errors.UnknownDevice(name))
        secret = new_secret(self._random_bytes)
        store = self._store

        def replied(reply):
            if reply[0] != "ok":
                raise errors.UnknownDevice(name)
            dev.secret = secret
            self._keys_changed(dev.number)
            return Provisioned(name, dev.number, secret)
        return store.write(("secret", "secret",
                            [store.device_key(dev.number), store.key_seq, store.key_feed],
                            [dev.number, secret, self.origin, store.options.stream_length])
                           ).addCallback(replied)

    def _tokens_call(self, kind, *args):
        store = self._store
        return store.write((kind, "tokens", [store.key_tokens, store.key_seq, store.key_feed],
                            [*args, self.origin, store.options.stream_length]))

    def add_token(self, role):
        """A new dashboard token, valid on every broker once Redis has it."""
        try:
            token_id, text, digest, now = self._new_token(role)
        except errors.InvalidValue as e:
            return defer.fail(e)
        return self._tokens_call("token_add", "add", token_id,
                                 cbor2.dumps([digest, role, now])).addCallback(
            lambda _: (token_id, text))

    def revoke_token(self, token_id):
        """Forget a token everywhere."""
        if not self._tokens.remove(token_id):
            return defer.fail(errors.UnknownToken(f"unknown token {token_id!r}"))
        return self._tokens_call("token_del", "del", token_id, b"").addCallback(lambda _: token_id)
