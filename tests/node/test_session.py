"""Tests for broker.node.session.NodeSession against a real broker SSPSession, no sockets."""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broker.node.client import node_profile
from broker.node.session import MAX_STATE_BYTES, NodeSession, plain
from broker.registry import DeviceRegistry, MemoryStore
from broker.node.session_ids import SessionIds
from broker.ssp.crypto import CipherCache
from broker.ssp.device_state import DeviceState
from broker.ssp.events import StateReceived
from broker.ssp.framing import BrokerFraming
from broker.ssp.session import SSPSession

from tests.ssp.linksim import RecordingCiphers

SECRET = bytes(range(16))
DEVICE = 77
EMPTY = DeviceState.empty()


class Broker:
    """The broker's side of one session, as a bare SSPSession (acks at once)."""

    def __init__(self, session_id, now, max_assembly_bytes=None):
        self.session = SSPSession(key=SECRET, cipher_provider=CipherCache(8), is_server=True,
                                  local_state=EMPTY, remote_state=EMPTY,
                                  random_bytes=os.urandom, now=now,
                                  framing=BrokerFraming(DEVICE, session_id),
                                  max_assembly_bytes=max_assembly_bytes)
        self.received = []

    def receive(self, data, now):
        self.session.receive_datagram(data, ("127.0.0.2", 1), now)
        for event in self.session.pop_events():
            if type(event) is StateReceived:
                self.received.append(event.state)


class NodeSessionTests(SynchronousTestCase):
    """The device side: reports, desired values, commands, rekeying."""

    def setUp(self):
        self.now = 100.0
        self.desired = []
        self.commands = []
        self.node = NodeSession(DEVICE, SECRET, ("127.0.0.1", 60001),
                                session_ids=SessionIds(None, wall_clock=lambda: 1),
                                profile=node_profile(25.0), ciphers=CipherCache(8),
                                rekey_after=60.0, on_desired=self.desired.append,
                                on_command=self.commands.append)
        self.brokers = {}

    def broker(self):
        sid = self.node.session_id
        if sid not in self.brokers:
            self.brokers[sid] = Broker(sid, self.now)
        return self.brokers[sid]

    def exchange(self, seconds=1.0, dt=0.01, deliver=True):
        for _ in range(int(seconds / dt)):
            for data, _ in self.node.datagrams(self.now):
                if deliver:
                    self.broker().receive(data, self.now)
            if deliver:
                for data, _ in self.broker().session.datagrams_to_send(self.now):
                    self.node.receive(data, ("127.0.0.1", 60001), self.now)
            self.now += dt

    def test_report_before_start_is_carried(self):
        """Values reported before the first session are its first state."""
        self.node.report({"t": 1}, self.now)
        self.node.start(self.now)
        self.exchange()
        self.assertEqual(dict(self.broker().received[-1].values), {"t": 1})
        self.assertTrue(self.node.idle())

    def test_desired_callback_only_on_change(self):
        """on_desired fires for each new desired map, not for resends of the same one."""
        self.node.start(self.now)
        self.exchange()
        broker = self.broker().session
        broker.set_local_state(EMPTY.with_values({"led": "on"}), self.now)
        self.exchange()
        broker.set_local_state(EMPTY.with_values({"led": "on", "x": 1}).with_values({"x": None}),
                               self.now)
        self.exchange()
        self.assertEqual(self.desired, [{"led": "on"}])
        self.assertEqual(self.node.desired, {"led": "on"})

    def test_desired_change_of_type_is_a_change(self):
        """A desired value that changes type but is equal in Python (1 to true, true
        to 1.0, 0 to false) reaches on_desired, and node.desired shows the new type."""
        self.node.start(self.now)
        self.exchange()
        broker = self.broker().session
        for value in (1, True, 1.0, 0, False):
            broker.set_local_state(EMPTY.with_values({"x": value}), self.now)
            self.exchange()
        self.assertEqual([type(seen["x"]) for seen in self.desired],
                         [int, bool, float, int, bool])
        self.assertIs(self.node.desired["x"], False)

    def test_commands_once_and_after_a_reset(self):
        """Commands are delivered once; a broker that starts its state anew is followed."""
        self.node.start(self.now)
        self.exchange()
        broker = self.broker().session
        state = EMPTY.with_events("a", "b")
        broker.set_local_state(state, self.now)
        self.exchange()
        broker.set_local_state(broker.local_state.with_events("c"), self.now)
        self.exchange()
        self.assertEqual(self.commands, ["a", "b", "c"])
        # A state whose events end before what was delivered: numbering started anew.
        self.node._deliver(EMPTY.with_events("d"))
        self.assertEqual(self.commands, ["a", "b", "c", "d"])

    def test_silent_broker_means_new_session(self):
        """After rekey_after seconds without the broker, a strictly newer session starts,
        carrying the values and events not yet acknowledged."""
        self.node.start(self.now)
        self.exchange()
        first = self.node.session_id
        self.node.report({"v": 2}, self.now)
        self.node.emit("lost?", now=self.now)
        self.exchange(seconds=61.0, dt=0.5, deliver=False)
        self.assertGreater(self.node.session_id, first)
        self.assertEqual(self.node.sessions_started, 2)
        self.exchange(seconds=30.0, dt=0.1)  # its first datagram was lost: next heartbeat
        received = self.broker().received[-1]
        self.assertEqual(dict(received.values), {"v": 2})
        self.assertEqual(received.events, ("lost?",))

    def test_broker_that_answers_but_never_acknowledges_means_new_session(self):
        """wire.md 3: no ack for rekey_after seconds starts a newer session, even while
        the broker's heartbeats keep arriving (a report it never made durable)."""
        self.node.start(self.now)
        self.exchange()
        first = self.node.session_id
        acked = self.node.acknowledged
        # The broker's side of the session now holds every ack (never durable)
        # but keeps sending its heartbeats (mosh's 3 s).
        stuck = SSPSession(key=SECRET, cipher_provider=CipherCache(8), is_server=True,
                           local_state=EMPTY, remote_state=EMPTY, random_bytes=os.urandom,
                           now=self.now, framing=BrokerFraming(DEVICE, first),
                           ack_requires_confirm=True)
        self.brokers[first] = broker = Broker(first, self.now)
        broker.session = stuck
        self.node.report({"v": 3}, self.now)
        self.exchange(seconds=59.0, dt=0.5)
        self.assertEqual(self.node.session_id, first)
        self.assertEqual(self.node.acknowledged, acked)
        self.assertLess(self.now - self.node.session.last_heard, 5.0)  # heard all along
        self.exchange(seconds=3.0, dt=0.5)
        self.assertGreater(self.node.session_id, first)
        self.exchange(seconds=2.0)
        self.assertEqual(dict(self.broker().received[-1].values), {"v": 3})
        self.assertTrue(self.node.idle())

    def test_failing_application_callbacks_lose_nothing(self):
        """An on_desired or on_command that raises is logged; the other commands of the
        same state are still delivered once, in order, and the acknowledgement counts."""
        calls = []

        def on_desired(values):
            calls.append(("desired", values))
            raise RuntimeError("application bug")

        def on_command(command):
            calls.append(("command", command))
            if command == "a":
                raise RuntimeError("application bug")

        self.node.on_desired, self.node.on_command = on_desired, on_command
        self.node.start(self.now)
        self.exchange()
        self.node.report({"t": 1}, self.now)
        broker = self.broker().session
        broker.set_local_state(EMPTY.with_values({"led": "on"}).with_events("a", "b"), self.now)
        self.exchange()
        self.assertEqual(calls, [("desired", {"led": "on"}), ("command", "a"),
                                 ("command", "b")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(self.node.acknowledged, 2)
        broker.set_local_state(broker.local_state.with_events("c"), self.now)
        self.exchange()
        self.assertEqual(calls[-1], ("command", "c"))
        self.assertEqual(len(calls), 4)

    def test_unsendable_text_is_refused_at_report_time(self):
        """Text that is not Unicode (an unpaired surrogate) is refused by report and emit;
        the session keeps sending what it had (it is not left unable to send)."""
        self.node.start(self.now)
        self.exchange()
        self.node.report({"ok": 1}, self.now)
        self.assertRaises(ValueError, self.node.report, {"t": "\ud800"}, self.now)
        self.assertRaises(ValueError, self.node.report, {"\udc00": 1}, self.now)
        self.assertRaises(ValueError, self.node.emit, ["\ud800"], now=self.now)
        self.exchange()
        self.assertEqual(dict(self.broker().received[-1].values), {"ok": 1})
        self.assertTrue(self.node.idle())

    def test_next_wakeup_includes_rekey(self):
        """With nothing to send, the next wake-up is the rekey deadline."""
        self.node.start(self.now)
        self.exchange()
        wakeup = self.node.next_wakeup()
        self.assertIsNotNone(wakeup)
        self.assertLessEqual(wakeup, self.node.session.last_heard + 60.0)


class FailingIds:
    """Session ids whose store can be made to fail (a full or read-only disk)."""

    def __init__(self):
        self.ids = SessionIds(None, wall_clock=lambda: 1)
        self.failing = False

    def next(self, device_number, continues=False):
        if self.failing:
            raise OSError(28, "No space left on device")
        return self.ids.next(device_number, continues)


class RekeyFailureTests(SynchronousTestCase):
    """A new session whose id cannot be stored is not started; the old one goes on."""

    def test_unstorable_id_keeps_the_old_session(self):
        """When the id store fails, the node keeps its session and sending, waits
        rekey_after before trying again (no busy loop), then rekeys once it can."""
        ids = FailingIds()
        node = NodeSession(DEVICE, SECRET, ("127.0.0.1", 60001), session_ids=ids,
                           profile=node_profile(25.0, 60.0), ciphers=CipherCache(8),
                           rekey_after=60.0)
        now = 100.0
        node.start(now)
        broker = Broker(node.session_id, now)
        for _ in range(100):
            for data, _ in node.datagrams(now):
                broker.receive(data, now)
            for data, _ in broker.session.datagrams_to_send(now):
                node.receive(data, ("127.0.0.1", 60001), now)
            now += 0.01
        first = node.session_id
        ids.failing = True
        node.report({"v": 1}, now)
        sent = 0
        now += 61.0  # the broker stays silent past rekey_after
        sent += len(node.datagrams(now))
        self.assertEqual(node.session_id, first)
        self.assertEqual(node.sessions_started, 1)
        self.assertGreaterEqual(node.next_wakeup(), now + 1.0)
        for _ in range(30):
            now = max(now + 1.0, node.next_wakeup())
            sent += len(node.datagrams(now))
        self.assertEqual(node.session_id, first)
        self.assertGreater(sent, 0)
        ids.failing = False
        for _ in range(10):
            if node.session_id != first:
                break
            now = max(now + 0.01, node.next_wakeup())
            node.datagrams(now)
        self.assertGreater(node.session_id, first)
        self.assertEqual(node.sessions_started, 2)
        self.assertEqual(dict(node.state.values), {"v": 1})


class ExhaustedIdsTests(SynchronousTestCase):
    """A rekey when no greater session id exists (a state file holding the last epoch)."""

    def test_no_new_id_keeps_the_old_session(self):
        """When no new id can be made (ValueError: epochs exhausted), the node keeps
        its session and sending, and tries again rekey_after later, instead of raising
        out of its timer."""
        path = os.path.join(self.mktemp(), "ids.json")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as handle:
            handle.write(f'{{"{DEVICE}": {((1 << 32) - 2) << 32}}}')
        node = NodeSession(DEVICE, SECRET, ("127.0.0.1", 60001),
                           session_ids=SessionIds(path, wall_clock=lambda: 1000.0),
                           profile=node_profile(1.0), ciphers=CipherCache(8),
                           rekey_after=3.0)
        node.start(0.0)
        first = node.session_id
        node.report({"v": 1}, 0.0)
        sent = len(node.datagrams(0.0))
        sent += len(node.datagrams(5.0))   # rekey due: no id above the last epoch
        self.assertEqual(node.session_id, first)
        self.assertEqual(node.sessions_started, 1)
        sent += len(node.datagrams(8.0))   # and again, rekey_after later
        self.assertEqual(node.session_id, first)
        self.assertGreater(sent, 0)
        self.assertEqual(dict(node.state.values), {"v": 1})


class RebootNonceTests(SynchronousTestCase):
    """A rebooted device never seals under a (key, nonce) it used before."""

    def test_reboot_and_rekey_never_reuse_a_nonce(self):
        """Boots over one state file, and a rekey within a boot, each seal
        under a new session key, so no (key, nonce) pair repeats although
        every session numbers its datagrams from 0."""
        path = os.path.join(self.mktemp(), "ids.json")
        ciphers = RecordingCiphers()
        used_ids = []
        for boot in range(2):
            # The clock stands still: only the state file keeps ids apart.
            node = NodeSession(DEVICE, SECRET, ("127.0.0.1", 60001),
                               session_ids=SessionIds(path, wall_clock=lambda: 1),
                               profile=node_profile(25.0), ciphers=ciphers,
                               rekey_after=60.0)
            node.report({"boot": boot}, 100.0)
            node.start(100.0)
            for step in range(71):  # the broker stays silent: a rekey at 160 s
                node.datagrams(100.0 + step)
                if node.session_id not in used_ids:
                    used_ids.append(node.session_id)
            self.assertEqual(node.sessions_started, 2)
        self.assertEqual(len(set(used_ids)), 4)
        self.assertEqual(used_ids, sorted(used_ids))
        # Nonces alone do repeat (each session counts from 0): keys differ.
        self.assertLess(len({nonce for _, nonce in ciphers.sealed}), len(ciphers.sealed))
        self.assertEqual(len({key for key, _ in ciphers.sealed}), 4)
        self.assertEqual(len(ciphers.sealed), len(set(ciphers.sealed)))


class RegistryRulesTests(SynchronousTestCase):
    """What the registry would refuse never joins the node's state: the registry refuses a
    report whole, with every other value and event in it, and the device never hears."""

    def setUp(self):
        self.node = self.make_node()
        self.node.report({"ok": 0}, 100.0)

    def make_node(self, **options):
        return NodeSession(DEVICE, SECRET, ("127.0.0.1", 60001),
                           session_ids=SessionIds(None, wall_clock=lambda: 1),
                           profile=node_profile(25.0), ciphers=CipherCache(8),
                           rekey_after=60.0, **options)

    def assertRefused(self, values, events, named):
        """update(values, events) raises ValueError naming ``named``; nothing changed."""
        before = self.node.state
        error = self.assertRaises(ValueError, self.node.update, values, events, 100.0)
        self.assertIn(named, str(error))
        self.assertIs(self.node.state, before)
        self.assertEqual(self.node.backlog, 0)

    def test_keys_outside_the_registry_rule_are_refused_by_name(self):
        """A key the registry refuses (a space, empty, a leading dot, too long, inside a
        nested map) raises ValueError naming it, and the values and events beside it
        are not taken either."""
        long_key = "k" * 65
        for values, named in (({"temp C": 21.5}, "'temp C'"), ({"": 1}, "empty key"),
                              ({".x": 1}, "'.x'"), ({long_key: 1}, long_key[:20]),
                              ({"m": {"a b": 1}}, "'a b'")):
            self.assertRefused({"good": 1, **values}, ["event"], named)
        self.assertEqual(dict(self.node.state.values), {"ok": 0})

    def test_values_of_kinds_the_registry_refuses_are_refused(self):
        """Infinity, nesting deeper than the registry's 4, more than its 64 items in a
        list, or more than its 256 keys raise ValueError; a value within them is taken."""
        self.assertRefused({"t": float("inf")}, (), "finite")
        self.assertRefused({"t": [[[[[1]]]]]}, (), "deeper")
        self.assertRefused({"t": list(range(65))}, (), "64 items")
        self.node.report({"t": [[[[1]]]], "u": list(range(64))}, 100.0)
        self.assertEqual(self.node.state.values["u"], tuple(range(64)))
        self.node.report({f"k{i}": i for i in range(253)}, 100.0)   # 256 keys in all
        self.assertRefused({"one_more": 1}, (), "256 keys")

    def test_events_the_registry_refuses_are_refused(self):
        """An event with a key the registry refuses, nested too deep, or larger than
        max_state_bytes as the registry counts it raises ValueError; the values beside
        it are not taken."""
        self.assertRefused({"t": 1}, [{"kind": "boot", "bad key": 1}], "'bad key'")
        self.assertRefused({"t": 1}, [[[[[["deep"]]]]]], "deeper")
        self.assertRefused({"t": 1}, ["x" * MAX_STATE_BYTES], str(MAX_STATE_BYTES))
        self.node.emit("x" * (MAX_STATE_BYTES - 100), now=100.0)
        self.assertEqual(self.node.state.event_end, 1)

    def test_values_over_max_state_bytes_are_refused(self):
        """All values together over max_state_bytes (the registry's default, 8192) as
        the registry counts them raise ValueError naming the limit; a node given the
        broker's larger limit takes them."""
        self.node.report({"a": "x" * 5000}, 100.0)
        self.assertRefused({"b": "y" * 5000}, (), "8192")
        self.assertRefused({"a": "x" * 4000, "b": "y" * 4200}, (), "8192")
        self.assertEqual(set(self.node.state.values), {"ok", "a"})
        self.node.report({"a": None, "b": "y" * 5000}, 100.0)   # room made in the same report
        self.node.report({"b": "y" * 4000, "c": "z" * 4000}, 100.0)
        self.assertEqual(set(self.node.state.values), {"ok", "b", "c"})
        larger = self.make_node(max_state_bytes=16000)
        larger.report({"a": "x" * 5000, "b": "y" * 5000}, 100.0)
        self.assertEqual(set(larger.state.values), {"a", "b"})

    def test_the_whole_map_the_node_sends_is_taken_by_the_registry(self):
        """After good and refused reports alike, the node's whole map (what a new
        session's first state carries) is taken by a real registry, with its events."""
        registry = DeviceRegistry(MemoryStore(), clock=Clock())
        self.successResultOf(registry.add_device("sensor"))
        self.node.report({"humidity": 40}, 100.0)
        for values in ({"temp C": 21.5}, {"nested": {"a:b": 1, "c d": 2}},
                       {"big": "z" * 9000}):
            self.assertRaises(ValueError, self.node.report, values, 100.0)
        self.assertRaises(ValueError, self.node.emit, {"x y": 1}, now=100.0)
        self.node.update({"pressure": 1013, "nested": {"a:b": 1}}, [{"kind": "boot"}], 100.0)
        state = self.node.state
        self.successResultOf(registry.update_reported(
            "sensor", plain(state.values), [plain(event) for event in state.events]))
        self.assertEqual(dict(registry.device("sensor").reported),
                         {"ok": 0, "humidity": 40, "pressure": 1013, "nested": {"a:b": 1}})


class FirstAnswerLostTests(SynchronousTestCase):
    """A session whose broker never answers its first state."""

    def test_first_state_is_resent_before_the_heartbeat(self):
        """With the broker's first answer lost, the node resends its first state on
        its retransmission timeout (backed off), several times in the first 20 s,
        not only with its 25 s heartbeat."""
        node = NodeSession(DEVICE, SECRET, ("127.0.0.1", 60001),
                           session_ids=SessionIds(None, wall_clock=lambda: 1_700_000_000.0),
                           profile=node_profile(25.0, 75.0), ciphers=CipherCache(8),
                           rekey_after=75.0)
        now = 100.0
        node.start(now)
        node.report({"v": 1}, now)
        sent = []
        while now < 120.0:
            sent += [now for _ in node.datagrams(now)]
            now = round(now + 0.05, 2)
        self.assertEqual(node.sessions_started, 1)
        self.assertGreaterEqual(len(sent), 3)
        self.assertLess(sent[1] - sent[0], 10.0)


class ValuesSizeAfterEventsTests(SynchronousTestCase):
    """The node's count of its values, as the registry counts them, survives events."""

    def node(self):
        return NodeSession(DEVICE, SECRET, ("127.0.0.1", 60001),
                           session_ids=SessionIds(None, wall_clock=lambda: 1_700_000_000.0),
                           profile=node_profile(25.0), ciphers=CipherCache(8), rekey_after=60.0)

    def test_small_report_after_a_large_event_is_taken(self):
        """After an event close to max_state_bytes, a small report is taken: the event's
        size does not stand in for the values' (it did, refusing a valid report)."""
        node = self.node()
        node.emit({"blob": "x" * 8170}, now=1.0)
        node.report({"temp": 21}, 2.0)
        self.assertEqual(node.state.values["temp"], 21)

    def test_values_over_the_limit_after_a_small_event_are_refused(self):
        """After a small event, values that together exceed max_state_bytes are still
        refused at the node (the registry would refuse the whole report)."""
        node = self.node()
        node.report({"a": "x" * 5000}, 1.0)
        node.emit({"n": 1}, now=2.0)
        self.assertRaises(ValueError, node.report, {"b": "y" * 5000}, 3.0)
        self.assertNotIn("b", node.state.values)
