"""Tests for broker.node.backlog: events beyond the SSP state, delivered once and in order
within a diff the broker takes (against a real broker SSPSession, no sockets)."""

import heapq
import random

from twisted.trial.unittest import SynchronousTestCase

from broker.node.backlog import (DIFF_BUDGET, EVENTS_IN_FLIGHT_BYTES, MAX_EVENT_BYTES,
                                 MAX_VALUES_BYTES, Backlog, BacklogFull)
from broker.node.client import node_profile
from broker.node.session import NodeSession
from broker.node.session_ids import SessionIds
from broker.ssp.crypto import CipherCache
from broker.ssp.device_state import DeviceState
from broker.ssp.events import StateReceived
from broker.ssp.framing import BrokerFraming
from broker.ssp.profile import FLEET
from broker.ssp.session import SSPSession
from broker.udp.endpoint import MAX_ASSEMBLY_BYTES

from tests.node.test_session import DEVICE, SECRET, Broker

EMPTY = DeviceState.empty()
ADDRESS = ("127.0.0.1", 60001)


class BacklogTests(SynchronousTestCase):
    """The backlog alone: what moves into a state, and what it refuses."""

    def test_events_join_the_state_only_within_the_budget(self):
        """Events move into the state while their encoded sizes fit the budget, and
        more move once the state's events are acknowledged (its base moves up)."""
        backlog = Backlog()
        size = EVENTS_IN_FLIGHT_BYTES // 4
        backlog.add(["a"] * 10, [size] * 10)
        moved = backlog.take(EMPTY)
        self.assertEqual(len(moved), 4)
        self.assertEqual(len(backlog), 6)
        state = EMPTY.with_events(*moved)
        self.assertEqual(backlog.take(state), [])
        acked = state.subtract(state.with_events())   # all four acknowledged
        self.assertEqual(len(backlog.take(acked)), 4)
        self.assertEqual(len(backlog), 2)

    def test_one_event_moves_when_none_is_in_flight(self):
        """An event larger than the room left moves alone once nothing is in flight,
        so the queue never stalls behind it."""
        backlog = Backlog()
        backlog.add(["small", "large"], [10, EVENTS_IN_FLIGHT_BYTES])
        first = backlog.take(EMPTY)
        self.assertEqual(first, ["small"])
        state = EMPTY.with_events(*first)
        self.assertEqual(backlog.take(state), [])
        self.assertEqual(backlog.take(state.subtract(state)), ["large"])

    def test_full_backlog_refuses_new_events_whole(self):
        """Past max_events, add raises BacklogFull (a ValueError) and holds none of
        the refused events; the ones held before stay."""
        backlog = Backlog(max_events=3)
        backlog.add(["a", "b"], [1, 1])
        with self.assertRaises(BacklogFull) as caught:
            backlog.add(["c", "d"], [1, 1])
        self.assertIsInstance(caught.exception, ValueError)
        self.assertIn("backlog full", str(caught.exception))
        self.assertEqual(len(backlog), 2)
        self.assertEqual(backlog.take(EMPTY), ["a", "b"])


class NodeBacklogTests(SynchronousTestCase):
    """A node's events through an outage, with a broker session that assembles at most
    what the broker's does."""

    def setUp(self):
        self.now = 100.0
        self.node = NodeSession(DEVICE, SECRET, ADDRESS,
                                session_ids=SessionIds(None, wall_clock=lambda: 1),
                                profile=node_profile(1.0), ciphers=CipherCache(8),
                                rekey_after=2.0)
        self.brokers = {}
        self.delivered = []   # events the brokers received, in order
        self.largest_diff = 0

    def broker(self):
        sid = self.node.session_id
        if sid not in self.brokers:
            self.brokers[sid] = Broker(sid, self.now, max_assembly_bytes=MAX_ASSEMBLY_BYTES)
        return self.brokers[sid]

    def exchange(self, seconds, deliver=True, dt=0.01):
        """Run both ends for ``seconds``; collects delivered events, checks their order."""
        for _ in range(int(seconds / dt)):
            for data, _ in self.node.datagrams(self.now):
                if deliver:
                    broker = self.broker()
                    broker.receive(data, self.now)
                    for state in broker.received:
                        self.assertLessEqual(state.event_base, len(self.delivered))  # no gap
                        self.delivered.extend(state.events_since(len(self.delivered)))
                    broker.received.clear()
            session = self.node.session
            diff = self.node.state.diff_from(session.acknowledged_state)
            self.largest_diff = max(self.largest_diff, len(diff))
            if deliver:
                for data, _ in self.broker().session.datagrams_to_send(self.now):
                    self.node.receive(data, ADDRESS, self.now)
            self.now += dt
            if deliver and self.node.idle():
                return

    def test_events_held_through_an_outage_arrive_once_in_order(self):
        """8,000 events emitted while the broker is out of reach (new sessions start
        meanwhile) all reach it once it is back, exactly once and in order, each state
        within the diff budget, and so does a report made after them."""
        self.node.start(self.now)
        self.node.report({"first": 1}, self.now)
        self.exchange(2.0)
        self.assertTrue(self.node.idle())
        chance = random.Random(7)
        emitted = [chance.randbytes(12).hex() for _ in range(8000)]
        for event in emitted:
            self.node.emit(event, now=self.now)
        first = self.node.session_id
        self.exchange(5.0, deliver=False)
        self.assertGreater(self.node.session_id, first)   # carried across rekeys
        self.node.report({"after": 2}, self.now)
        self.exchange(60.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(self.delivered, emitted)
        self.assertEqual(dict(self.broker().session.latest_remote_state.values),
                         {"first": 1, "after": 2})
        self.assertLessEqual(self.largest_diff, DIFF_BUDGET)

    def test_full_backlog_refuses_events_and_delivers_the_others(self):
        """Past max_backlog events waiting, emit raises BacklogFull and appends none of
        its events; every event taken is still delivered once, in order."""
        node = self.node = NodeSession(DEVICE, SECRET, ADDRESS,
                                       session_ids=SessionIds(None, wall_clock=lambda: 1),
                                       profile=node_profile(1.0), ciphers=CipherCache(8),
                                       rekey_after=2.0, max_backlog=3)
        node.start(self.now)
        # Two fit in flight, three wait.
        big = [f"{n}" + "x" * (EVENTS_IN_FLIGHT_BYTES // 2 - 16) for n in range(5)]
        node.emit(big[0], big[1], now=self.now)
        node.emit(*big[2:], now=self.now)
        self.assertEqual(node.backlog, 3)
        self.assertRaises(BacklogFull, node.emit, "refused", now=self.now)
        self.assertRaises(BacklogFull, node.emit, "one more", now=self.now)
        self.assertEqual(node.backlog, 3)
        self.exchange(10.0)
        self.assertTrue(node.idle())
        self.assertEqual(self.delivered, big)

    def test_values_over_the_limit_are_refused_and_later_reports_go(self):
        """A report whose values together exceed MAX_VALUES_BYTES encoded raises
        ValueError and changes nothing; a report after it is delivered (with a broker
        whose registry takes that much: max_state_bytes above the node's own limit)."""
        self.node = NodeSession(DEVICE, SECRET, ADDRESS,
                                session_ids=SessionIds(None, wall_clock=lambda: 1),
                                profile=node_profile(1.0), ciphers=CipherCache(8),
                                rekey_after=2.0, max_state_bytes=4 * MAX_VALUES_BYTES)
        self.node.start(self.now)
        self.node.report({"small": 1}, self.now)
        with self.assertRaises(ValueError) as caught:
            self.node.report({"big": bytes(100_000)}, self.now)
        self.assertIn(str(MAX_VALUES_BYTES), str(caught.exception))
        self.node.report({"half": "x" * (MAX_VALUES_BYTES // 2)}, self.now)
        self.assertRaises(ValueError, self.node.report,
                          {"more": "x" * (MAX_VALUES_BYTES // 2)}, self.now)
        self.node.report({"later": 2}, self.now)
        self.exchange(5.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(set(self.broker().session.latest_remote_state.values),
                         {"small", "half", "later"})

    def test_event_over_the_limit_is_refused_with_the_values_beside_it(self):
        """An event larger than an SSP state may carry raises ValueError from emit, and
        from update with values, which then are not reported either."""
        self.node.start(self.now)
        big = "x" * (MAX_EVENT_BYTES + 1)
        self.assertRaises(ValueError, self.node.emit, big, now=self.now)
        self.assertRaises(ValueError, self.node.update, {"t": 1}, [big], self.now)
        self.assertEqual(dict(self.node.state.values), {})
        self.assertEqual(self.node.backlog, 0)
        self.assertEqual(self.node.state.event_end, 0)


class LossyLinkTests(SynchronousTestCase):
    """A bulk of events over a link that loses datagrams both ways, in virtual time."""

    def deliver(self, loss, seed, events, limit):
        """Run a node (default heartbeat and rekey) and a broker session with the fleet
        profile, acknowledging a state once durable as the broker does, over a link
        losing ``loss`` of datagrams (seeded); returns the virtual seconds taken."""
        chance = random.Random(seed)
        start = now = 100.0
        node = NodeSession(DEVICE, SECRET, ADDRESS,
                           session_ids=SessionIds(None, wall_clock=lambda: 1),
                           profile=node_profile(), ciphers=CipherCache(8),
                           rekey_after=3 * FLEET.ack_interval, random_bytes=chance.randbytes)
        brokers, delivered, in_flight = {}, [], []   # in_flight: (arrival, order, to, data)

        def broker():
            sid = node.session_id
            if sid not in brokers:
                brokers[sid] = SSPSession(
                    key=SECRET, cipher_provider=CipherCache(8), is_server=True,
                    local_state=EMPTY, remote_state=EMPTY, random_bytes=chance.randbytes,
                    now=now, profile=FLEET, framing=BrokerFraming(DEVICE, sid),
                    ack_requires_confirm=True, max_assembly_bytes=MAX_ASSEMBLY_BYTES)
            return brokers[sid]

        def post(to, data):
            if chance.random() >= loss:
                heapq.heappush(in_flight, (now + 0.005, chance.random(), to, data))

        node.start(now)
        for event in events:
            node.emit(event, now=now)
        while len(delivered) < len(events) and now - start < limit:
            for data, _ in node.datagrams(now):
                post("broker", data)
            for data, _ in broker().datagrams_to_send(now):
                post("node", data)
            wakeups = [node.next_wakeup(), broker().next_wakeup()]
            if in_flight:
                wakeups.append(in_flight[0][0])
            # (Past the wake-up a little: node.next_wakeup() may name the rekey time
            # a rounding error before datagrams() agrees that it has come.)
            now = max(now + 0.0001, min(w for w in wakeups if w is not None))
            while in_flight and in_flight[0][0] <= now:
                _, _, to, data = heapq.heappop(in_flight)
                if to == "node":
                    node.receive(data, ADDRESS, now)
                    continue
                session = broker()
                session.receive_datagram(data, ("127.0.0.2", 1), now)
                for found in session.pop_events():
                    if type(found) is StateReceived:
                        self.assertLessEqual(found.state.event_base, len(delivered))
                        delivered.extend(found.state.events_since(len(delivered)))
                        session.confirm_durable(found.num)
        self.assertEqual(delivered, events)   # all of them, once, in order
        return now - start

    def test_bulk_of_events_crosses_a_lossy_link(self):
        """500 events of ~120 bytes emitted at once all arrive through a link losing 20%
        of datagrams within 45 s for every seed tried (a few seconds, or one heartbeat
        more when a new session's first exchange is lost): states stay a few datagrams
        long, where 16 KiB states took minutes."""
        for seed in range(4):
            chance = random.Random(100 + seed)
            events = [{"i": i, "pad": chance.randbytes(50).hex()} for i in range(500)]
            took = self.deliver(0.2, seed, events, limit=300.0)
            self.assertLess(took, 45.0, f"seed {seed}")
