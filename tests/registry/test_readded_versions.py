"""A device removed and added again under its name never reuses a version of the removed one.

A version names one state of its device for good (docs/http-api.md): an
ETag, If-Match or long-poll version of the removed device must not name a
state of its successor. So a new device's version starts at the
registry's cursor, whichever way it was added: by the registry itself, by
broker-admin and reloaded, or by broker-admin and loaded at the next start.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import RegistrySettings, open_registry
from broker.registry.admin import AdminDatabase

from .helpers import admin_call, make_registry


class AddedAgainTests(SynchronousTestCase):
    """DeviceRegistry.add_device after remove_device of the same name."""

    def test_new_device_starts_above_the_removed_ones_versions(self):
        """The successor's first version is its cursor, above every version the
        removed device of its name had (they never exceed the cursors)."""
        registry, _, _ = make_registry()
        self.successResultOf(registry.add_device("x"))
        for value in range(5):
            self.successResultOf(registry.update_desired("x", {"v": value}))
        old = registry.device("x").version
        self.successResultOf(registry.remove_device("x"))
        self.successResultOf(registry.add_device("x"))
        new = registry.device("x")
        self.assertGreater(new.version, old)
        self.assertEqual(new.version, new.cursor)
        self.assertEqual([entry[0] for entry in new.history], [new.version])

    def test_first_device_starts_at_its_cursor(self):
        """Devices added to a busy registry start at their cursor, not at 1."""
        registry, _, _ = make_registry()
        self.successResultOf(registry.add_device("a"))
        self.successResultOf(registry.update_reported("a", {"t": 1}))
        self.successResultOf(registry.add_device("b"))
        self.assertEqual((registry.device("a").version, registry.device("b").version), (2, 3))


class AdminAddedAgainTests(TestCase):
    """broker-admin's additions (no cursor of their own) after a removal of the name."""

    def setUp(self):
        self.data_dir = os.path.abspath(os.path.join(self.mktemp(), "data"))
        AdminDatabase(self.data_dir, create=True).close()

    def open(self):
        registry = open_registry(self.data_dir, clock=reactor,
                                 settings=RegistrySettings(reload_interval=0))
        self.addCleanup(registry.stop)
        return registry

    def admin(self, method, *args):
        return admin_call(self.data_dir, method, *args)

    @defer.inlineCallbacks
    def old_device(self, registry):
        """Device "x" with a few versions, removed; returns its last version."""
        yield registry.add_device("x")
        for value in range(4):
            yield registry.update_desired("x", {"v": value})
        version = registry.device("x").version
        yield registry.remove_device("x")
        return version

    @defer.inlineCallbacks
    def test_reloaded_addition_starts_above_the_removed_ones_versions(self):
        """A device broker-admin added while the broker runs gets, when reloaded, a
        version above every version of the removed device of its name."""
        registry = self.open()
        old = yield self.old_device(registry)
        self.admin("add_device", "x")
        yield registry.reload()
        new = registry.device("x")
        self.assertGreater(new.version, old)
        self.assertEqual(new.version, new.cursor)

    @defer.inlineCallbacks
    def test_addition_loaded_at_start_starts_above_the_removed_ones_versions(self):
        """A device broker-admin added while no broker ran gets, at the next start, a
        version at its new cursor, durably (the same after another restart)."""
        registry = self.open()
        old = yield self.old_device(registry)
        yield registry.stop()
        self.admin("add_device", "x")
        registry = self.open()
        new = registry.device("x")
        self.assertGreater(new.version, old)
        self.assertEqual(new.version, new.cursor)
        yield registry.stop()
        again = self.open().device("x")
        self.assertEqual((again.version, again.cursor), (new.version, new.cursor))
