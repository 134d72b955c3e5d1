"""Tests for provisioning writes the store fails: memory is put back as storage holds it."""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import MemoryStore, errors
from .helpers import make_registry


class FailingStore(MemoryStore):
    """A MemoryStore whose writes of the kinds in ``failing`` fail (as a failed commit
    would: nothing of them is applied), and whose reads the test answers by hand."""

    def __init__(self):
        super().__init__()
        self.failing = set()
        self.reads = []

    def write(self, op, result=None):
        if op[0] in self.failing:
            return defer.fail(errors.StoreError("storage failed: disk full"))
        return super().write(op, result)

    def write_state(self, dev, token=None):
        if "state" in self.failing:
            return defer.fail(errors.StoreError("storage failed: disk full"))
        return super().write_state(dev, token)

    def _read(self):
        d = defer.Deferred()
        self.reads.append(d)
        return d

    def admin_changes(self, after):
        return self._read()

    def fetch_tokens(self):
        return self._read()

    def fetch_device(self, number):
        return self._read()


class FailedProvisioningTests(SynchronousTestCase):
    """A provisioning write that is not durable leaves the registry as storage holds it,
    so the failed answer tells the truth and the caller can try again."""

    def setUp(self):
        self.store = FailingStore()
        self.registry, _, _ = make_registry(self.store)
        self.prov = self.successResultOf(self.registry.add_device("a"))

    def test_failed_key_rotation_keeps_the_old_key(self):
        """A rotation storage refused leaves the old secret in force (the device keeps
        working; nobody was shown the new one), and key watchers hear of it again."""
        told = []
        self.registry.watch_keys(told.append)
        self.store.failing.add("secret")
        self.failureResultOf(self.registry.rotate_key("a"), errors.StoreError)
        self.assertEqual(self.registry.secret_for(self.prov.device_number), self.prov.secret)
        self.assertEqual(told, [self.prov.device_number] * 2)

    def test_two_failed_rotations_in_one_commit_keep_the_stored_key(self):
        """Rotations failing together fall back to the last stored secret, not to a
        secret of the failed rotations."""
        self.store.hold()
        first = self.registry.rotate_key("a")
        second = self.registry.rotate_key("a")
        held, self.store._held = self.store._held, None
        for _, d, _ in held:
            d.errback(errors.StoreError("storage failed: disk full"))
        self.failureResultOf(first, errors.StoreError)
        self.failureResultOf(second, errors.StoreError)
        self.assertEqual(self.registry.secret_for(self.prov.device_number), self.prov.secret)

    def test_failed_rotation_after_a_durable_one_keeps_that_one(self):
        """A failed rotation queued after a durable one falls back to the durable one."""
        self.store.hold()
        first = self.registry.rotate_key("a")
        second = self.registry.rotate_key("a")
        (op1, d1, r1), (_, d2, _) = self.store._held
        self.store._held = None
        self.store._apply(op1)
        d1.callback(r1)
        d2.errback(errors.StoreError("storage failed: disk full"))
        rotated = self.successResultOf(first)
        self.failureResultOf(second, errors.StoreError)
        self.assertEqual(self.registry.secret_for(self.prov.device_number), rotated.secret)

    def test_failed_revocation_can_be_tried_again(self):
        """A revocation storage refused leaves the token valid (it still is, on disk and
        after a restart) and revocable again."""
        token_id, text = self.successResultOf(self.registry.add_token("write"))
        self.store.failing.add("token_del")
        self.failureResultOf(self.registry.revoke_token(token_id), errors.StoreError)
        self.assertEqual(self.registry.check_token(text), "write")
        self.store.failing.clear()
        self.successResultOf(self.registry.revoke_token(token_id))
        self.assertIsNone(self.registry.check_token(text))

    def test_failed_token_add_leaves_no_token(self):
        """A token storage refused is not valid (its text was never shown)."""
        self.store.failing.add("token_add")
        self.failureResultOf(self.registry.add_token("write"), errors.StoreError)
        self.assertEqual(self.registry.tokens(), [])

    def test_failed_add_leaves_no_device(self):
        """A device storage refused is gone again (observers and the feed hear it
        removed), so no write to it is acknowledged that storage cannot hold, and the
        name can be added again."""
        seen = []
        self.registry.subscribe(["b"], seen.append)
        cursor = self.registry.cursor
        self.store.failing.add("add")
        self.failureResultOf(self.registry.add_device("b"), errors.StoreError)
        self.assertIsNone(self.registry.device("b"))
        self.assertEqual([v.removed for v in seen], [False, True])
        batch = self.registry.changes_since(cursor)
        self.assertEqual([(v.name, v.removed) for v in batch.devices], [("b", True)])
        self.store.failing.clear()
        self.successResultOf(self.registry.add_device("b"))

    def test_failed_removal_keeps_the_device(self):
        """A removal storage refused leaves the device (storage still holds it, a restart
        would bring it back), with its state, and it can be removed again."""
        self.successResultOf(self.registry.update_reported("a", {"t": 1}))
        self.store.failing.add("remove")
        self.failureResultOf(self.registry.remove_device("a"), errors.StoreError)
        view = self.registry.device("a")
        self.assertEqual(view.reported, {"t": 1})
        self.assertEqual(self.registry.secret_for(self.prov.device_number), self.prov.secret)
        self.assertEqual(self.registry.changes_since(0).devices[-1].name, "a")
        self.assertFalse(self.registry.changes_since(0).devices[-1].removed)
        self.store.failing.clear()
        self.successResultOf(self.registry.remove_device("a"))
        self.assertIsNone(self.registry.device("a"))


class ReloadRaceTests(SynchronousTestCase):
    """An admin reload answered after the registry's own provisioning changes does not
    undo them (its read predates them)."""

    def setUp(self):
        self.store = FailingStore()
        self.registry, _, _ = make_registry(self.store)
        self.prov = self.successResultOf(self.registry.add_device("a"))

    def answer(self, value):
        self.store.reads.pop(0).callback(value)

    def test_revocation_during_a_token_reload_stays(self):
        """A token revoked while a reload reads the token table stays revoked."""
        token_id, text = self.successResultOf(self.registry.add_token("write"))
        rows = [(token_id,) + self.registry._tokens.get(token_id)]
        reload = self.registry.reload()
        self.answer([(1, "token", None, None)])
        self.successResultOf(self.registry.revoke_token(token_id))
        self.answer(rows)                 # read before the revocation was written
        if self.store.reads:              # read again: the table as it is now
            self.answer([(tid,) + rest for tid, rest in self.store.tokens.items()])
        self.successResultOf(reload)
        self.assertIsNone(self.registry.check_token(text))

    def test_token_added_during_a_token_reload_stays(self):
        """A token added while a reload reads the token table stays valid."""
        reload = self.registry.reload()
        self.answer([(1, "token", None, None)])
        _, text = self.successResultOf(self.registry.add_token("read"))
        self.answer([])
        if self.store.reads:
            self.answer([(tid,) + rest for tid, rest in self.store.tokens.items()])
        self.successResultOf(reload)
        self.assertEqual(self.registry.check_token(text), "read")

    def test_rotation_during_a_key_reload_stays(self):
        """A key rotated by the registry while a reload reads the admin's key keeps the
        registry's (written after the admin's, it is the one storage ends with)."""
        number = self.prov.device_number
        row = self.store.devices[number]
        admin_row = type(row)(row.number, row.name, b"A" * 16, row.version, row.cursor, row.state)
        reload = self.registry.reload()
        self.answer([(1, "device_key", "a", number)])
        rotated = self.successResultOf(self.registry.rotate_key("a"))
        self.store.hold()                 # the rotation's write is still pending
        again = self.registry.rotate_key("a")
        self.answer(admin_row)
        self.successResultOf(reload)
        self.assertNotEqual(self.registry.secret_for(number), b"A" * 16)
        self.store.release()
        self.assertNotEqual(self.successResultOf(again).secret, rotated.secret)
        self.assertEqual(self.registry.secret_for(number), self.store.devices[number].secret)
