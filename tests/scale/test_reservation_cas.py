"""Two broker processes, one session key: sequence reservations as compare-and-set.

Two SharedRegistry instances on a real redis-server stand for two hosts
behind a UDP balancer, each with an SSP endpoint on a recording transport;
one sans-IO node's datagrams are steered to one or the other, as a
flapping health check does (docs/scaling.md). Every sequence number each
endpoint seals under the session's key is recorded: none may be used twice.
"""

from __future__ import annotations

import collections

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from broker.config import SSPSettings
from broker.node.client import node_profile
from broker.node.session import NodeSession
from broker.node.session_ids import SessionIds
from broker.ssp.crypto import SEQ_MASK, CipherCache, nonce_value_from
from broker.ssp.framing import HEADER_SIZE
from broker.udp.endpoint import SSPEndpoint
from broker.udp.sessions import SEQ_RESERVATION_BLOCK

from tests.udp.helpers import BROKER, Deterministic, FakeTransport

from .support import SingleRedis, TwoRegistries, wait_until

NODE = ("127.0.0.2", 40000)
#: real seconds a phase may take before the test fails.
PHASE = 15.0


class Host:
    """An endpoint on one registry; records the sequence numbers it sends per session id."""

    def __init__(self, registry, seed):
        self.endpoint = SSPEndpoint(registry, SSPSettings(), clock=reactor,
                                    random_bytes=Deterministic(seed))
        self.transport = FakeTransport()
        self.endpoint.makeConnection(self.transport)
        self.sent = collections.defaultdict(list)   # session id -> sequence numbers

    def take(self):
        written, self.transport.written = self.transport.written, []
        for data, _ in written:
            session_id = int.from_bytes(data[9:17], "big")
            self.sent[session_id].append(nonce_value_from(data, HEADER_SIZE)[0] & SEQ_MASK)
        return written


class ReservationCompareAndSetTests(TwoRegistries, SingleRedis, TestCase):
    """No sequence number is sealed twice under one session key by two processes."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        TwoRegistries.setUp(self)
        provisioned = yield self.a.add_device("dev")
        self.number = provisioned.device_number
        yield wait_until(self, lambda: self.b.device("dev") is not None, what="b sees dev")
        self.hosts = {"a": Host(self.a, 1_000_000), "b": Host(self.b, 2_000_000)}
        for host in self.hosts.values():
            self.addCleanup(host.endpoint.stopProtocol)
        wall = iter(range(1, 10_000))
        self.node = NodeSession(self.number, provisioned.secret, BROKER,
                                session_ids=SessionIds(None, random_bytes=Deterministic(7),
                                                       wall_clock=lambda: next(wall)),
                                profile=node_profile(25.0), ciphers=CipherCache(16),
                                random_bytes=Deterministic(5), rekey_after=75.0)
        self.node.start(reactor.seconds())
        self.value = 0

    @defer.inlineCallbacks
    def report_to(self, name, until=None):
        """Report a new value through host ``name`` until it is acknowledged (and ``until``)."""
        host = self.hosts[name]
        self.value += 1
        self.node.report({"v": self.value}, reactor.seconds())
        acked = self.node.acknowledged
        end = reactor.seconds() + PHASE
        while self.node.acknowledged <= acked or (until is not None and not until()):
            if reactor.seconds() > end:
                self.fail(f"no acknowledgement through host {name}")
            now = reactor.seconds()
            for data, _ in self.node.datagrams(now):
                host.endpoint.datagramReceived(data, NODE)
            for data, _ in host.take():
                self.node.receive(data, BROKER, now)
            yield task.deferLater(reactor, 0.01, lambda: None)

    def live(self, name):
        return self.hosts[name].endpoint.session_of(self.number)

    def burn(self, name):
        """Make host ``name``'s session reach the end of its confirmed block
        (as 4096 datagrams would, in a test that lasts seconds)."""
        session = self.live(name).session
        session._link.reserve_seq(session.seq_reservation - 1)

    def assert_no_reuse(self):
        session_id = self.node.session_id
        used = self.hosts["a"].sent[session_id] + self.hosts["b"].sent[session_id]
        reused = sorted(seq for seq, count in collections.Counter(used).items() if count > 1)
        self.assertEqual(reused[:5], [])
        return used

    def record(self, registry):
        return registry.session_record(self.number)

    @defer.inlineCallbacks
    def test_flap_back_to_a_does_not_reuse_b_numbers(self):
        """A whose device flapped to B and back retires its session instead of reusing B's block."""
        yield self.report_to("a")
        session_id = self.node.session_id
        yield wait_until(self, lambda: (self.record(self.b) or self.record(self.a)).session_id
                         == session_id and self.record(self.b) == self.record(self.a),
                         what="b's replica has a's record")
        reserved = self.record(self.a).seq_reservation
        yield self.report_to("b")            # B resumes from reservation R and reserves R+4096
        self.assertEqual(self.hosts["b"].endpoint.counters["sessions_resumed"], 1)
        self.burn("a")
        yield self.report_to("a", until=lambda:
                             self.hosts["a"].endpoint.counters["reservation_conflicts"])
        self.assertEqual(self.hosts["a"].endpoint.counters["reservation_conflicts"], 1)
        self.assertEqual(self.node.session_id, session_id)
        self.assert_no_reuse()
        self.assertGreaterEqual(min(self.hosts["b"].sent[session_id]), reserved)

    @defer.inlineCallbacks
    def test_resume_from_a_lagging_replica_conflicts(self):
        """B resuming from a replica behind A's durable reservation uses none of A's numbers."""
        yield self.report_to("a")
        session_id = self.node.session_id
        yield wait_until(self, lambda: self.record(self.b) == self.record(self.a),
                         what="b's replica has a's record")
        lagging = self.record(self.b)
        first_block = self.live("a").reserved
        self.burn("a")
        yield self.report_to("a", until=lambda: self.live("a").reserved > first_block)
        yield self.report_to("a")            # A uses numbers of its new block
        self.assertGreaterEqual(max(self.hosts["a"].sent[session_id]), first_block)
        # B's replica has not caught up with A's reservation yet.
        self.b._by_number[self.number].session = lagging
        yield self.report_to("b")
        # At least once: B then resumes from Redis's record, and a write of A's
        # still on its way (its last report's record) may move it on once more.
        self.assertGreaterEqual(self.hosts["b"].endpoint.counters["reservation_conflicts"], 1)
        self.assertEqual(self.node.session_id, session_id)
        self.assert_no_reuse()

    @defer.inlineCallbacks
    def test_record_of_an_older_broker_is_compared_from_its_cbor(self):
        """A record written before the plain reservation fields existed (only the CBOR
        record in the hash) is still compared: the script reads the session id and
        reservation from it, and a stale expectation conflicts."""
        import redis
        from broker.registry.provisioning import SessionConflict

        yield self.report_to("a")
        held = self.record(self.a)
        client = redis.Redis.from_url(self.url)
        self.addCleanup(client.close)
        key = self.a._store.device_key(self.number)
        self.assertEqual(client.hdel(key, "ri", "rr"), 2)     # as an older broker left it
        stale = held._replace(seq_reservation=held.seq_reservation + 1)
        yield self.assertFailure(
            self.a.reserve_session(self.number, stale, held.seq_reservation - 1),
            SessionConflict)
        granted = held._replace(seq_reservation=held.seq_reservation + SEQ_RESERVATION_BLOCK)
        yield self.a.reserve_session(self.number, granted, held.seq_reservation)
        self.assertEqual(client.hget(key, "rr"),
                         f"{granted.seq_reservation:016x}".encode())

