"""Values across device sessions: a new session's first state is the device's
whole map, so the registry's ``reported`` becomes exactly that map, even for
changes the old session never got acknowledged (or never delivered)."""

from twisted.trial.unittest import SynchronousTestCase

from tests.udp.helpers import Harness
from tests.udp.test_events_across_sessions import stored_events


class ValuesAcrossSessionsTests(SynchronousTestCase):

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")
        self.node = self.h.node(self.device)

    def report(self, values, node=None):
        (node or self.node).report(values, now=self.h.clock.seconds())

    def reported(self):
        """The registry's reported values (arrays as tuples, as it holds them)."""
        return dict(self.h.registry.device("dev").reported)

    def rekey_after_an_outage(self, change):
        """``change`` reported while the device is cut off, then a new session."""
        address = self.h.address_of(self.node)
        del self.h.nodes[address]
        self.report(change)
        self.h.run(1.0)
        self.h.nodes[address] = self.node
        self.node.start(self.h.clock.seconds())
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(self.node.sessions_started, 2)

    def test_a_value_deleted_before_a_rekey_is_deleted(self):
        """A key the device deleted while its old session could not deliver it is
        deleted in the registry by the new session's first state."""
        self.report({"a": 1, "b": 1})
        self.h.run(1.0)
        self.assertEqual(self.reported(), {"a": 1, "b": 1})
        self.rekey_after_an_outage({"a": None, "b": 2})
        self.assertEqual(self.reported(), {"b": 2})

    def test_an_inner_key_removed_before_a_rekey_is_removed(self):
        """A map value replaced by one with fewer keys (not a merge) is the new map in
        the registry after a new session, not the old one merged with it."""
        self.report({"m": {"x": 1, "y": 2}, "n": [1, 2]})
        self.h.run(1.0)
        self.rekey_after_an_outage({"m": {"x": 1}, "n": [1]})
        self.assertEqual(self.reported(), {"m": {"x": 1}, "n": (1,)})

    def test_unchanged_values_are_not_written_again(self):
        """A new session whose first state holds what the registry has changes nothing:
        no new version, no history entry."""
        self.report({"a": 1, "m": {"x": 1}})
        self.h.run(1.0)
        version = self.h.registry.device("dev").version
        self.node.start(self.h.clock.seconds())
        self.h.run(2.0)
        self.assertEqual(self.node.sessions_started, 2)
        self.assertTrue(self.node.idle())
        self.assertEqual(self.h.registry.device("dev").version, version)

    def test_a_rebooted_device_reports_its_whole_state_afresh(self):
        """A rebooted device (a fresh process, from blank) that reports fewer keys than
        before leaves the registry with exactly its keys, and its events all count."""
        self.report({"a": 1, "b": 1})
        self.h.run(1.0)
        rebooted = self.h.node(self.device)
        self.report({"b": 5}, node=rebooted)
        rebooted.emit("r0", now=self.h.clock.seconds())
        self.h.run(2.0)
        self.assertTrue(rebooted.idle())
        self.assertEqual(self.reported(), {"b": 5})
        self.assertEqual(stored_events(self.h), ["r0"])
