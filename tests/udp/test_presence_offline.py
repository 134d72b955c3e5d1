"""A device going offline while the registry's store fails (single-process registry).

The endpoint's presence wheel calls the registry once per flip, with no
timer of its own per device; a store failure of that write must neither
leave the device shown online nor be logged as an unexpected error.
The Redis registry's retry of the write is tested against a real
redis-server in tests/scale/test_redis_failures.py.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import MemoryStore
from broker.registry.errors import StoreError

from .helpers import Harness


class _FailingFlips(MemoryStore):
    """A memory store whose device state writes fail while ``failing`` (a full disk)."""

    failing = False

    def write(self, op, result=None):
        if self.failing and op[0] == "state":
            return defer.fail(StoreError("disk full"))
        return super().write(op, result)


class OfflineWriteFailureTests(SynchronousTestCase):
    """The offline flip of a device whose store write fails."""

    def silent(self, h, device):
        """The device's node, online, then gone quiet past offline_after."""
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        self.assertTrue(h.registry.device("dev").online)
        del h.nodes[h.address_of(node)]
        return node

    def test_offline_flip_whose_write_fails_shows_offline_and_is_only_warned(self):
        """A failed offline write leaves the registry showing the device offline (and
        a restart over the store too), logged as a warning, not as an error."""
        store = _FailingFlips()
        h = Harness(self, store=store, offline_after=30.0)
        device = h.provision("dev")
        self.silent(h, device)
        store.failing = True
        h.run(31.0, dt=0.5)
        self.assertEqual(h.endpoint.counters["went_offline"], 1)
        self.assertFalse(h.registry.device("dev").online)
        self.assertEqual(h.registry.online_count, 0)
        self.assertEqual(self.flushLoggedErrors(StoreError), [])
        store.failing = False
        self.assertFalse(h.restart().registry.device("dev").online)

    def test_device_back_after_a_failed_offline_write_is_online(self):
        """A device that comes back after its offline write failed is shown online,
        and its online write reaches the store once it works again."""
        store = _FailingFlips()
        h = Harness(self, store=store, offline_after=30.0)
        device = h.provision("dev")
        node = self.silent(h, device)
        store.failing = True
        h.run(31.0, dt=0.5)
        store.failing = False
        h.nodes[("127.0.0.2", 40000)] = node
        node.report({"v": 2}, h.clock.seconds())
        h.run(2.0)
        self.assertTrue(h.registry.device("dev").online)
        row = store.devices[device.device_number]
        self.assertEqual(row.version, h.registry.device("dev").version)
        self.assertEqual(dict(h.registry.device("dev").reported), {"v": 2})
