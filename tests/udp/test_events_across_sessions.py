"""Events across device sessions (wire.md 5): a device that starts a new
session carries its unacknowledged events with their indices, so the
broker stores each once even when it had made some durable already."""

import random

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.framing import boot_of
from broker.udp.endpoint import SSPEndpoint
from tests.udp.helpers import Deterministic, FakeTransport, Harness


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


def rekey_unheard_then_reconnect(case, harness, node, address):
    """The node runs unheard for 80 s (past rekey_after: it starts its second
    session), then is heard again from ``address`` until everything is acknowledged."""
    for _ in range(1600):
        node.datagrams(harness.clock.seconds())
        harness.clock.advance(0.05)
    case.assertEqual(node.sessions_started, 2)
    harness.nodes[address] = node
    harness.run(30.0)
    case.assertTrue(node.idle())


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

    def test_events_never_acknowledged_since_boot_are_stored_once_after_a_rekey(self):
        """A device none of whose events was ever acknowledged since it booted carries
        them from index 0 into its next session; its session id says it did not
        reboot, so the broker, which had stored them, does not store them again."""
        self.emit("e0", "e1")
        run_deaf(self.h, 1.0)
        self.assertEqual(stored_events(self.h), ["e0", "e1"])
        self.assertEqual(self.node.state.event_base, 0)   # nothing acknowledged
        self.node.start(self.h.clock.seconds())
        self.emit("e2")
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(stored_events(self.h), ["e0", "e1", "e2"])

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

    def test_old_sessions_unhanded_report_and_new_session_in_one_turn(self):
        """The old session's newest state (not yet handed to the registry) and the new
        session's first datagram arrive in one reactor turn: the old one's report is
        dropped with it, so the carried event counts as not stored, and is stored."""
        self.emit("e0")
        self.h.run(1.0)
        self.assertTrue(self.node.idle())
        self.emit("e1")
        old = []
        for _ in range(100):
            old = self.node.datagrams(self.h.clock.seconds())
            if old:
                break
            self.h.clock.advance(0.001)
        self.assertTrue(old)
        now = self.h.clock.seconds()
        self.node.start(now)                         # rekey: e1 is carried
        new = self.node.datagrams(now)
        self.assertTrue(new)
        address = self.h.address_of(self.node)
        for data, _ in old + new:
            self.h.endpoint.datagramReceived(data, address)
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(stored_events(self.h), ["e0", "e1"])

    def test_a_resumed_session_starts_from_its_record(self):
        """A session resumed after a broker restart compares its reports with the
        record's state: a stored, unacknowledged event is not stored twice, and a key
        the device deleted is deleted."""
        self.node.report({"k": 1, "j": 2}, now=self.h.clock.seconds())
        self.emit("e0")
        run_deaf(self.h, 1.0)
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        self.node.report({"k": None}, now=h2.clock.seconds())
        h2.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(self.node.sessions_started, 1)
        self.assertEqual(stored_events(h2), ["e0"])
        self.assertEqual(dict(h2.registry.device("dev").reported), {"j": 2})


class _Process:
    """A second broker process's endpoint over the same registry."""

    def __init__(self, harness, seed):
        self.harness = harness
        self.endpoint = SSPEndpoint(harness.registry, harness.settings, clock=harness.clock,
                                    random_bytes=Deterministic(seed))
        self.transport = FakeTransport()
        self.endpoint.makeConnection(self.transport)

    def run(self, seconds, dt=0.01):
        for _ in range(int(round(seconds / dt))):
            self.harness.step(dt, via=self)


class SharedRegistryTests(SynchronousTestCase):
    """Several processes: another may hold a device's newer session, unseen here."""

    def test_a_stale_session_elsewhere_never_skips_events_numbered_afresh(self):
        """Process A still holds the device's old session (events to index 5); the
        device reboots, process B acknowledges its events 0-2, and its next session
        (a rekey, carrying 3 and 4) lands on A: both are stored, nothing skipped."""
        h = Harness(self, park_after=60.0)
        h.registry.shared = True
        device = h.provision("dev")
        a, b = _Process(h, 10_000_000), _Process(h, 20_000_000)
        node = h.node(device)
        node.emit("e0", "e1", "e2", "e3", "e4", now=h.clock.seconds())
        a.run(1.0)
        self.assertTrue(node.idle())
        rebooted = h.node(device)                    # same address, numbering afresh
        rebooted.emit("r0", "r1", "r2", now=h.clock.seconds())
        b.run(1.0)
        self.assertTrue(rebooted.idle())
        rebooted.emit("r3", "r4", now=h.clock.seconds())
        rebooted.start(h.clock.seconds())
        a.run(2.0)
        self.assertTrue(rebooted.idle())
        stored = stored_events(h)
        for event in ("e0", "e4", "r0", "r2", "r3", "r4"):
            self.assertIn(event, stored)


class RefusedValuesTests(SynchronousTestCase):
    """A report the registry refuses is acknowledged all the same (or the device
    would resend it forever): its events must not go with its values."""

    def test_events_beside_refused_values_are_stored(self):
        """Values over the registry's key limit are refused and counted; the event
        reported with them is stored."""
        h = Harness(self)
        node = h.node(h.provision("dev"))
        # (A device that does not check: NodeSession refuses such values itself.)
        node.session.set_local_state(node.state.with_values({f"k{i}": i for i in range(300)}),
                                     h.clock.seconds())
        node.emit("alarm", now=h.clock.seconds())
        h.run(1.0)
        self.assertTrue(node.idle())
        self.assertEqual(sum(h.endpoint.bridge.refused.values()), 1)
        self.assertEqual(stored_events(h), ["alarm"])


class UnqueuedReportTests(SynchronousTestCase):
    """A turn's reports that could not even be queued (an exception in the bridge)."""

    def test_events_of_a_report_that_raised_are_stored_by_the_next_session(self):
        """The report is never acknowledged, so the device carries its event into a
        new session after rekey_after; the broker, which never stored it, does not
        take it as stored: it is stored then, once."""
        h = Harness(self)
        node = h.node(h.provision("dev"), rekey_after=3.0)
        node.emit("e0", now=h.clock.seconds())
        h.run(1.0)
        self.assertTrue(node.idle())                 # e1 will be carried from index 1
        registry = h.registry
        real = registry.update_reported_many
        calls = []

        def update_reported_many(updates):
            # Raises inside the bridge's report_many, after it took the state.
            calls.append(len(updates))
            if len(calls) == 1:
                raise RuntimeError("a bug in the bridge")
            return real(updates)
        registry.update_reported_many = update_reported_many
        node.emit("e1", now=h.clock.seconds())
        h.run(6.0, dt=0.05)
        self.assertGreaterEqual(node.sessions_started, 2)   # idle, it rekeys every 3 s
        self.assertTrue(node.idle())
        self.assertEqual(stored_events(h), ["e0", "e1"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class NumberingTests(SynchronousTestCase):
    """Where a new session's first report is compared from (convert.first_report_base)."""

    def test_a_numbering_that_ends_below_the_stored_end_is_afresh(self):
        """Events carried from index 3 but ending at 5, below a stored end of 9, are of
        another numbering (the device rebooted since): all of them count."""
        from broker.ssp.device_state import DeviceState
        from broker.udp.convert import first_report_base, new_events, session_start

        carried = DeviceState(events=["r3", "r4"], event_base=3)
        self.assertEqual(new_events(first_report_base(session_start(9), carried), carried),
                         ["r3", "r4"])
        # Within the stored numbering, those below the end are stored already.
        continuing = DeviceState(events=["e8", "e9"], event_base=8)
        self.assertEqual(new_events(first_report_base(session_start(9), continuing),
                                    continuing), ["e9"])


class SessionWithoutReportTests(SynchronousTestCase):
    """A device's new session that is rebuilt from its record before any state of it
    arrived whole (parked, or resumed after a restart): the record of its start says
    where the stored events end, so its carried events are still stored once."""

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")
        self.node = self.h.node(self.device)
        self.address = self.h.address_of(self.node)
        blobs = random.Random(3)
        # Incompressible events, so that resending them is a long diff.
        self.carried = [blobs.randbytes(300), blobs.randbytes(300)]

    def emit(self, *events):
        self.node.emit(*events, now=self.h.clock.seconds())

    def stored_unacknowledged(self):
        """e0 acknowledged, the carried events stored but their acks lost."""
        self.emit("e0")
        self.h.run(1.0)
        self.assertTrue(self.node.idle())
        self.emit(*self.carried)
        run_deaf(self.h, 1.0)
        self.assertEqual(stored_events(self.h), ["e0"] + self.carried)

    def device_talks(self, seconds, deliver, dt=0.01):
        """Step the node alone for ``seconds``: ``deliver(data)`` says which of its
        datagrams reach the broker; every answer of the broker is lost."""
        for _ in range(int(round(seconds / dt))):
            for data, _ in self.node.datagrams(self.h.clock.seconds()):
                if deliver(data):
                    self.h.endpoint.datagramReceived(data, self.address)
            self.h.transport.written = []
            self.h.clock.advance(dt)

    def test_a_new_session_parked_before_its_first_state_stores_carried_events_once(self):
        """The new session's first state is lost and its next diff, from a state the
        broker never got, is dropped; the session starts without a report, parks, and
        wakes from its record: the carried events are not stored a second time."""
        from broker.udp.park import Parked

        self.stored_unacknowledged()
        self.node.start(self.h.clock.seconds())      # rekey: the two events go along
        self.device_talks(0.05, lambda data: False)  # state 1 is lost
        self.emit("e3")                              # a diff from the assumed state 1
        delivered = []

        def first_only(data):
            delivered.append(data)
            return len(delivered) == 1
        self.device_talks(0.5, first_only)            # the rest is lost
        self.assertTrue(delivered)
        self.assertEqual(self.h.endpoint.drops["unknown_reference"], 1)
        entry = self.h.endpoint.entry_of(self.device.device_number)
        self.assertEqual(entry.session_id, self.node.session_id)
        self.device_talks(1.0, lambda data: False)   # silence: the session parks
        self.assertIs(type(self.h.endpoint.entry_of(self.device.device_number)), Parked)
        self.h.run(40.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(stored_events(self.h), ["e0"] + self.carried + ["e3"])

    def test_events_from_boot_carried_into_a_resumed_session_are_stored_once(self):
        """A rekeyed session carrying events from index 0 (none acknowledged since the
        boot) is resumed from its start record after a restart: the record keeps
        that the device did not reboot, and nothing is stored twice."""
        self.emit(*self.carried)
        run_deaf(self.h, 1.0)
        self.assertEqual(stored_events(self.h), self.carried)
        self.node.start(self.h.clock.seconds())
        self.device_talks(0.05, lambda data: False)  # its first state is lost
        self.emit("e2")
        delivered = []
        self.device_talks(0.5, lambda data: delivered.append(data) or len(delivered) == 1)
        entry = self.h.endpoint.entry_of(self.device.device_number)
        self.assertEqual(entry.session_id, self.node.session_id)
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        h2.run(40.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(stored_events(h2), self.carried + ["e2"])

    def test_a_new_session_resumed_before_its_first_state_stores_carried_events_once(self):
        """Only the first fragment of the new session's first state arrives, then the
        broker restarts: the session resumes from its record, and the carried events
        are not stored a second time."""
        blobs = random.Random(4)
        self.carried = [blobs.randbytes(700) for _ in range(3)]   # two datagrams
        self.stored_unacknowledged()
        self.node.start(self.h.clock.seconds())
        fragments = self.node.datagrams(self.h.clock.seconds())
        self.assertGreater(len(fragments), 1)
        self.h.endpoint.datagramReceived(fragments[0][0], self.address)
        entry = self.h.endpoint.entry_of(self.device.device_number)
        self.assertEqual(entry.session_id, self.node.session_id)
        self.h.transport.written = []
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        h2.run(40.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(stored_events(h2), ["e0"] + self.carried)


class RebootDuringOutageTests(SynchronousTestCase):
    """A device that reboots while the broker cannot hear it, and rekeys before the
    broker ever acknowledged anything of the new boot."""

    def test_events_of_a_boot_never_heard_are_stored(self):
        """The rebooted device's first session goes unheard and it rekeys: its second
        session must not claim to continue a boot the broker never heard (the stored
        end is the old boot's), so the new boot's event 0 is stored, not skipped."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        ids = node._ids                                  # its state file
        ids._random_bytes = lambda n: b"\x5a" * n       # the next boot draws another name
        node.emit("old-0", now=h.clock.seconds())
        h.run(2.0)
        self.assertTrue(node.idle())
        del h.nodes[h.address_of(node)]
        rebooted = h.node(device, session_ids=ids)       # numbering from 0 again
        self.assertNotEqual(boot_of(rebooted.session_id), boot_of(node.session_id))
        rebooted.emit("new-0", "new-1", now=h.clock.seconds())   # ends above the old end
        address = h.address_of(rebooted)
        del h.nodes[address]
        rekey_unheard_then_reconnect(self, h, rebooted, address)
        self.assertEqual(stored_events(h), ["old-0", "new-0", "new-1"])


class RebootFirstSessionWithoutReportTests(SynchronousTestCase):
    """A rebooted device whose boot's first session is heard, but none of its states
    arrives whole, then rekeys: the new boot's events are all new."""

    def test_first_session_heard_without_a_state(self):
        """The boot's first session is installed by one fragment of its first state
        (carrying events 0-6 of the new boot; the old boot's end at 5); the device
        rekeys (same boot, bit set): the broker must not take the old boot's end as
        this boot's, so all seven new events are stored."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        ids = node._ids
        ids._random_bytes = lambda n: b"\x5a" * n      # the next boot draws another name
        node.emit(*[f"old-{i}" for i in range(5)], now=h.clock.seconds())
        h.run(2.0)
        self.assertTrue(node.idle())
        address = h.address_of(node)
        del h.nodes[address]
        rebooted = h.node(device, session_ids=ids)
        del h.nodes[address]
        blobs = random.Random(4)
        new = [blobs.randbytes(700) for _ in range(7)]
        rebooted.emit(*new, now=h.clock.seconds())
        fragments = rebooted.datagrams(h.clock.seconds())
        self.assertGreater(len(fragments), 1)
        h.endpoint.datagramReceived(fragments[0][0], address)   # heard: installed
        self.assertEqual(h.endpoint.entry_of(device.device_number).session_id,
                         rebooted.session_id)
        rekey_unheard_then_reconnect(self, h, rebooted, address)
        self.assertEqual(stored_events(h), [f"old-{i}" for i in range(5)] + new)


class StoredStartRecordTests(SynchronousTestCase):
    """durable_event_end on start records already in the store."""

    def test_a_boot_first_start_record_gives_no_end(self):
        """A start record of a boot's first session that never reported (one an older
        broker wrote carried the previous boot's end) gives a later session of that
        boot no end to skip: its events are all stored."""
        from broker.registry import SessionRecord
        from broker.ssp.device_state import DeviceState
        from broker.ssp.framing import CONTINUES_BOOT
        from broker.udp.convert import encode_state
        from broker.udp.sessions import durable_event_end
        first = (5 << 32) | 0x1234_5670                 # a boot's first id (bit clear)
        later = (6 << 32) | 0x1234_5670 | CONTINUES_BOOT
        old_mark = encode_state(DeviceState(event_base=5))
        record = SessionRecord(first, acked_remote_state=old_mark)
        self.assertEqual(durable_event_end(None, record, later), 0)
        reported = SessionRecord(first, acked_remote_num=3, acked_remote_state=old_mark)
        self.assertEqual(durable_event_end(None, reported, later), 5)   # its own report
