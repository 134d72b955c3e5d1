"""Events across device sessions (wire.md 5): a device that starts a new
session carries its unacknowledged events with their indices, so the
broker stores each once even when it had made some durable already."""

from twisted.trial.unittest import SynchronousTestCase

from tests.udp.helpers import Harness


def stored_events(harness, name="dev"):
    """The events the registry stored for the device, in order (its history)."""
    view = harness.registry.device(name)
    return [event for entry in view.history if entry[3] in ("reported", "events")
            for event in (entry[4].get("events", ()) if hasattr(entry[4], "get")
                          else entry[4])]


def run_deaf(harness, seconds, dt=0.01):
    """The node's datagrams reach the broker; every answer of the broker is lost."""
    for _ in range(int(round(seconds / dt))):
        now = harness.clock.seconds()
        for address, node in list(harness.nodes.items()):
            for data, _ in node.datagrams(now):
                harness.endpoint.datagramReceived(data, address)
        harness.transport.written = []
        harness.clock.advance(dt)


class EventsAcrossSessionsTests(SynchronousTestCase):

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")
        self.node = self.h.node(self.device)

    def emit(self, *events):
        self.node.emit(*events, now=self.h.clock.seconds())

    def test_new_session_after_lost_acks_stores_each_event_once(self):
        """Events the broker made durable, whose acknowledgements were lost, are carried
        into the device's next session and not stored a second time."""
        self.emit("e0", "e1")
        self.h.run(1.0)
        self.assertTrue(self.node.idle())
        self.emit("e2", "e3")
        run_deaf(self.h, 1.0)
        self.assertEqual(stored_events(self.h), ["e0", "e1", "e2", "e3"])
        self.assertFalse(self.node.idle())           # it never heard the acks
        self.node.start(self.h.clock.seconds())      # rekey: e2, e3 go along
        self.emit("e4")
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(self.node.sessions_started, 2)
        self.assertEqual(stored_events(self.h), ["e0", "e1", "e2", "e3", "e4"])

    def test_carried_events_the_broker_lacks_are_stored(self):
        """Carried events the broker never received are stored, once, after those it had."""
        self.emit("e0")
        self.h.run(1.0)
        address = self.h.address_of(self.node)
        del self.h.nodes[address]                    # the device is cut off entirely
        self.emit("e1", "e2")
        self.h.run(1.0)
        self.h.nodes[address] = self.node
        self.node.start(self.h.clock.seconds())
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(stored_events(self.h), ["e0", "e1", "e2"])

    def test_a_rebooted_device_numbering_afresh_loses_nothing(self):
        """A device that rebooted numbers its events from 0 again: all of them are new."""
        self.emit("e0", "e1", "e2")
        self.h.run(1.0)
        rebooted = self.h.node(self.device)           # same address, a fresh process
        rebooted.emit("r0", now=self.h.clock.seconds())
        self.h.run(2.0)
        self.assertTrue(rebooted.idle())
        self.assertEqual(stored_events(self.h), ["e0", "e1", "e2", "r0"])

    def test_after_a_broker_restart_the_record_tells_where_events_end(self):
        """With the old session gone from memory (a broker restart), the durable session
        record says which carried events are stored already."""
        self.emit("e0")
        self.h.run(1.0)
        self.emit("e1")
        run_deaf(self.h, 1.0)
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        self.node.start(h2.clock.seconds())
        h2.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(stored_events(h2), ["e0", "e1"])

    def test_a_parked_old_session_is_read_from_its_record(self):
        """When the old session was parked (idle, all durable), its record says where the
        stored events end."""
        from broker.udp.park import Parked

        self.emit("e0")
        self.h.run(1.0)
        self.emit("e1")
        run_deaf(self.h, 1.0)
        address = self.h.address_of(self.node)
        del self.h.nodes[address]                    # silent: the broker parks the session
        self.h.run(2.0)
        self.assertIs(type(self.h.endpoint._table.get(self.device.device_number)), Parked)
        self.h.nodes[address] = self.node
        self.node.start(self.h.clock.seconds())
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(stored_events(self.h), ["e0", "e1"])
