"""Commands are written to the session record before they travel: a broker
restart delivers the ones the device had not acknowledged, once, and never
gives a used event index to another command."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import MemoryStore
from broker.registry.errors import StoreError
from broker.udp.convert import decode_state

from .helpers import Harness


class _FailingSessions(MemoryStore):
    """A memory store whose session-record writes fail while ``failing`` is set."""

    failing = False

    def write(self, op, result=None):
        if self.failing and op[0] == "session":
            return defer.fail(StoreError("disk full"))
        return super().write(op, result)


class DurableCommandTests(SynchronousTestCase):

    def setUp(self, store=None, rekey_after=75.0):
        self.h = Harness(self, store=store)
        self.device = self.h.provision("dev")
        self.got = []
        self.node = self.h.node(self.device, on_command=self.got.append,
                                rekey_after=rekey_after)
        self.h.run(1.0)

    def send(self, *commands):
        return self.h.endpoint.send_command(self.device.device_number, *commands)

    def record_commands(self):
        record = self.h.registry.session_record(self.device.device_number)
        return decode_state(record.local_state) if record.local_state else None

    def cut_replies(self):
        """The broker's datagrams are lost from now on (the device still sends)."""
        self.h.deaf = True

    def test_nothing_travels_before_the_record_is_durable(self):
        """While the record write is pending the command is not sent; once durable it is."""
        self.h.store.hold()
        d = self.send("open")
        self.h.run(1.0)
        self.assertNoResult(d)
        self.assertEqual(self.got, [])
        self.h.store.release()
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(self.record_commands().events_since(0), ("open",))
        self.h.run(1.0)
        self.assertEqual(self.got, ["open"])

    def test_unacknowledged_commands_survive_a_restart_once(self):
        """Commands the device never acknowledged arrive after a restart, once, in order,
        followed by newer ones; an acknowledged one is not delivered again."""
        self.successResultOf(self.send("first"))
        self.h.run(1.0)
        self.assertEqual(self.got, ["first"])
        self.cut_replies()
        self.successResultOf(self.send("second", "third"))
        self.h.run(0.5)
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        self.node.report({"v": 1}, h2.clock.seconds())
        h2.run(2.0)
        self.assertEqual(self.got, ["first", "second", "third"])
        self.successResultOf(h2.endpoint.send_command(self.device.device_number, "fourth"))
        h2.run(1.0)
        self.assertEqual(self.got, ["first", "second", "third", "fourth"])
        self.assertEqual(self.node.sessions_started, 1)
        self.assertTrue(self.node.idle())

    def test_numbering_continues_after_a_restart_with_nothing_pending(self):
        """After a restart with every command acknowledged, a new command still arrives:
        the resumed state starts its events where the device's end."""
        for name in ("a", "b"):
            self.successResultOf(self.send(name))
            self.h.run(1.0)
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        self.node.report({"v": 1}, h2.clock.seconds())
        h2.run(1.0)
        self.successResultOf(h2.endpoint.send_command(self.device.device_number, "c"))
        h2.run(1.0)
        self.assertEqual(self.got, ["a", "b", "c"])

    def test_acknowledged_commands_leave_the_record(self):
        """Once the device acknowledged them, the next record keeps no command (only where
        the numbering stands)."""
        self.successResultOf(self.send("x", "y"))
        self.h.run(1.0)
        self.node.report({"v": 2}, self.h.clock.seconds())
        self.h.run(1.0)
        kept = self.record_commands()
        self.assertEqual((kept.event_base, kept.events_since(0)), (2, ()))

    def test_a_new_session_takes_no_command_of_the_old_one(self):
        """A command whose write was pending when the device started a new session is
        answered False (409) and reaches neither the new session nor its record."""
        number = self.device.device_number
        self.h.store.hold()
        old = self.send("old-cmd")
        self.node.start(self.h.clock.seconds())       # a reboot: a new session id
        self.h.step()
        new = self.send("new-cmd")
        self.h.store.release()
        self.assertIs(self.successResultOf(old), False)
        self.assertIs(self.successResultOf(new), True)
        self.h.run(2.0)
        self.assertEqual(self.got, ["new-cmd"])
        record = self.h.registry.session_record(number)
        self.assertNotIn("old-cmd", decode_state(record.local_state).events_since(0))

    def test_unencodable_command_is_refused_and_leaves_the_session_working(self):
        """A command an SSP state cannot carry (text that is not Unicode) raises
        ValueError and is forgotten: the device's reports are still acknowledged and
        later commands still arrive."""
        self.assertRaises(ValueError, self.send, "\ud800")
        self.node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(1.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(self.h.endpoint.counters["store_failures"], 0)
        self.assertIs(self.successResultOf(self.send("ok")), True)
        self.h.run(1.0)
        self.assertEqual(self.got, ["ok"])

    def test_no_session_no_deferred(self):
        """A device without a session here gets None (the caller relays or refuses)."""
        other = self.h.provision("other")
        self.assertIsNone(self.h.endpoint.send_command(other.device_number, "x"))


class FailedCommandWriteTests(SynchronousTestCase):

    def setUp(self):
        self.store = _FailingSessions()
        # The node keeps its session however long the broker is silent.
        DurableCommandTests.setUp(self, store=self.store, rekey_after=1e6)

    send = DurableCommandTests.send

    def test_failed_write_sends_nothing_and_later_commands_still_arrive(self):
        """A command whose record write failed fails its Deferred and is not sent; the next
        command, written fine, arrives with a consistent index."""
        self.store.failing = True
        self.failureResultOf(self.send("lost"), StoreError)
        self.h.run(1.0)
        self.assertEqual(self.got, [])
        self.store.failing = False
        self.successResultOf(self.send("kept"))
        self.h.run(1.0)
        self.assertEqual(self.got, ["kept"])
        self.assertEqual(self.h.endpoint.counters["store_failures"], 1)

    def test_failed_command_is_not_written_back_when_the_session_leaves_memory(self):
        """The record cached after a failed write still names the command; the sequence
        mark written as the session is evicted takes the session's own state instead, so a
        returning device does not get it."""
        self.store.failing = True
        self.failureResultOf(self.send("failed-cmd"), StoreError)
        self.store.failing = False
        address = self.h.address_of(self.node)
        del self.h.nodes[address]
        self.h.run(self.h.settings.offline_after + 5.0, dt=0.5)
        self.assertIsNone(self.h.endpoint.entry_of(self.device.device_number))
        self.h.nodes[address] = self.node
        self.node.report({"back": 1}, self.h.clock.seconds())
        self.h.run(3.0)
        self.assertEqual(self.h.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(self.got, [])


class CommandPropertyTests(SynchronousTestCase):
    """Any interleaving of commands, lost replies and broker restarts (kill -9
    style, over the same store) delivers every queued command exactly once, in
    order."""

    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.one_of(st.tuples(st.just("command"), st.integers(1, 3)),
                              st.tuples(st.just("run"), st.sampled_from([0.05, 0.3, 1.0])),
                              st.tuples(st.just("lose_replies"), st.booleans()),
                              st.tuples(st.just("restart"), st.just(0))),
                    min_size=1, max_size=12))
    def test_exactly_once_in_order(self, steps):
        """Every command whose send succeeded arrives once, in the order sent."""
        h = Harness(self)
        device = h.provision("dev")
        got = []
        node = h.node(device, on_command=got.append, rekey_after=1e6)
        h.run(1.0)
        sent = []
        lost = [False]
        counter = iter(range(10_000))

        def wire(harness):
            write = harness.transport.write
            harness.transport.write = (
                lambda data, addr: None if lost[0] else write(data, addr))
        wire(h)
        for kind, value in steps:
            if kind == "command":
                names = [f"c{next(counter)}" for _ in range(value)]
                d = h.endpoint.send_command(device.device_number, *names)
                if d is not None and self.successResultOf(d):
                    sent.extend(names)
            elif kind == "run":
                h.run(value)
            elif kind == "lose_replies":
                lost[0] = value
            else:
                nodes = h.nodes
                h = h.restart()
                h.nodes = nodes
                wire(h)
                node.report({"after": next(counter)}, h.clock.seconds())
        lost[0] = False
        node.report({"end": True}, h.clock.seconds())
        h.run(5.0, dt=0.05)
        self.assertEqual(got, sent)
        self.assertEqual(node.sessions_started, 1)
