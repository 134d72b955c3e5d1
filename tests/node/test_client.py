"""The node's UDP endpoint: numeric broker addresses, datagrams on its sockets."""

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.node.client import NodeEndpoint, SSPNode, node_profile
from broker.node.session import NodeSession
from broker.node.session_ids import SessionIds
from broker.ssp.framing import HEADER_SIZE, build_header, parse_header
from broker.ssp.profile import FLEET
from tests.helpers import loopback_config, start_broker
from tests.node.test_session import DEVICE, SECRET, Broker
from tests.udp.loopback import wait_until


class AddressTests(SynchronousTestCase):
    """The broker address a node library user gives."""

    def test_host_name_refused_with_the_remedy(self):
        """A host name is refused at once, saying to resolve it: sending
        would otherwise look it up for every datagram."""
        with self.assertRaises(ValueError) as caught:
            NodeEndpoint(("broker.example", 60001), reactor=reactor)
        self.assertIn("'broker.example'", str(caught.exception))
        self.assertIn("resolve", str(caught.exception))

    def test_numeric_addresses_kept(self):
        """IPv4 and IPv6 literals are taken as given."""
        self.assertEqual(NodeEndpoint(("127.0.0.1", 1), reactor=reactor).broker_address,
                         ("127.0.0.1", 1))
        self.assertEqual(NodeEndpoint(("::1", 2), reactor=reactor).broker_address,
                         ("::1", 2))

    def test_link_local_scope_is_kept(self):
        """An IPv6 socket address with a scope (a link-local broker) keeps its
        interface, from a 4-tuple or from the %scope form."""
        self.assertEqual(NodeEndpoint(("fe80::1", 3, 0, 1), reactor=reactor).broker_address,
                         ("fe80::1%1", 3))
        self.assertEqual(NodeEndpoint(("fe80::1%1", 3), reactor=reactor).broker_address,
                         ("fe80::1%1", 3))
        self.assertEqual(NodeEndpoint(("::1", 2, 0, 0), reactor=reactor).broker_address,
                         ("::1", 2))


class TimingTests(SynchronousTestCase):
    """The heartbeat and rekey times a node library user gives."""

    def test_rekey_not_after_a_heartbeat_is_refused(self):
        """rekey_after must exceed the heartbeat (an idle node is acknowledged once a
        heartbeat), else every rekey_after a new session and a state file write follow;
        times must be positive and finite."""
        for heartbeat, rekey_after in ((25.0, 10.0), (25.0, 25.0), (0.0, None),
                                       (float("nan"), None), (25.0, float("inf")),
                                       (float("inf"), None)):
            with self.assertRaises(ValueError) as caught:
                SSPNode(7, bytes(16), ("127.0.0.1", 1), reactor=reactor,
                        heartbeat=heartbeat, rekey_after=rekey_after)
            self.assertIn("heartbeat" if rekey_after is None else "rekey_after",
                          str(caught.exception))
        node = SSPNode(7, bytes(16), ("127.0.0.1", 1), reactor=reactor, heartbeat=2.0)
        self.assertEqual(node.session.rekey_after, 6.0)


class RetryTests(SynchronousTestCase):
    """A node keeps resending a state the broker has not acknowledged, backed off."""

    def test_profile_retries_for_the_whole_session(self):
        """node_profile keeps retrying for rekey_after (three heartbeats by default), not
        for mosh's 10 s; FLEET, which the broker's sessions use, keeps its 10 s."""
        self.assertEqual(node_profile(25.0).active_retry_timeout, 75.0)
        self.assertEqual(node_profile(1.0, 30.0).active_retry_timeout, 30.0)
        self.assertEqual(node_profile(1.0, 2.0).active_retry_timeout,
                         FLEET.active_retry_timeout)
        self.assertEqual(FLEET.active_retry_timeout, 10.0)

    def test_unacknowledged_state_is_resent_past_ten_seconds_of_silence(self):
        """After the broker falls silent, an SSPNode resends its unacknowledged state at
        most backoff_max (plus the ack delay) apart until it rekeys, instead of once a
        heartbeat (25 s) after 10 s without an answer."""
        node = SSPNode(DEVICE, SECRET, ("127.0.0.1", 60001), reactor=reactor,
                       heartbeat=25.0, rekey_after=75.0).session
        now = 100.0
        node.start(now)
        broker = Broker(node.session_id, now)
        for _ in range(50):   # the broker hears the node and answers
            for data, _ in node.datagrams(now):
                broker.receive(data, now)
            for data, _ in broker.session.datagrams_to_send(now):
                node.receive(data, ("127.0.0.1", 60001), now)
            now += 0.01
        self.assertTrue(node.idle())
        first, silent_from = node.session_id, now
        node.emit("lost", now=now)
        sent = []
        while node.session_id == first:
            for _ in node.datagrams(now):
                sent.append(now)
            now = max(now + 0.001, node.next_wakeup())
        self.assertGreaterEqual(now - silent_from, 75.0)   # it rekeyed on time
        gaps = [later - earlier for earlier, later in zip(sent, sent[1:])]
        limit = FLEET.backoff_max + FLEET.ack_delay + 0.01
        self.assertLessEqual(max(gaps), limit)
        self.assertGreater(sent[-1] - silent_from, 75.0 - limit)


class Catcher(DatagramProtocol):
    """A stand-in broker on loopback that keeps what arrives."""

    def __init__(self):
        self.arrived = defer.Deferred()

    def datagramReceived(self, data, addr):
        if not self.arrived.called:
            self.arrived.callback((data, addr))


class SendTests(TestCase):
    """Datagrams leave through the node's own sockets (real loopback)."""

    timeout = 10

    @defer.inlineCallbacks
    def test_report_reaches_the_broker_from_the_node_socket(self):
        """A report goes out at once, framed for its device, from the port
        the node listens on (so answers come back to it)."""
        catcher = Catcher()
        listening = reactor.listenUDP(0, catcher, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        node = SSPNode(7, bytes(range(16)), ("127.0.0.1", listening.getHost().port),
                       state_path=self.mktemp(), reactor=reactor)
        node.start()
        self.addCleanup(node.stop)
        node.report({"t": 1.5})
        data, addr = yield catcher.arrived
        number, session_id = parse_header(data[:HEADER_SIZE])
        self.assertEqual(number, 7)
        self.assertGreater(session_id, 0)
        self.assertEqual(addr[1], node.endpoint.local_ports()[0])


class RestartTests(TestCase):
    """A node stopped and started again (a device that sleeps) against a real broker."""

    timeout = 60

    @defer.inlineCallbacks
    def test_start_after_stop_works_again(self):
        """After stop() and start() the node hears the broker again: a new session
        (strictly newer id), its reports acknowledged and desired values received."""
        broker = yield start_broker(self, loopback_config(self))
        registry = broker.service.registry
        device = yield registry.add_device("sleeper")
        desired = []
        node = SSPNode(device.device_number, device.secret, ("127.0.0.1", broker.udp_port),
                       state_path=self.mktemp(), reactor=reactor, heartbeat=2.0,
                       on_desired=desired.append)
        node.start()
        self.addCleanup(node.stop)
        node.report({"t": 1})
        yield wait_until(self, lambda: node.session.idle() and node.acknowledged >= 2,
                         what="the first report acknowledged")
        first = node.session_id
        yield node.stop()
        node.start()
        node.report({"t": 2})
        yield wait_until(self, lambda: registry.device("sleeper").reported.get("t") == 2,
                         what="the report after the restart")
        yield wait_until(self, node.session.idle, what="acknowledged after the restart")
        self.assertGreater(node.session_id, first)
        yield registry.update_desired("sleeper", {"led": "on"})
        yield wait_until(self, lambda: {"led": "on"} in desired, what="desired after restart")


class DropCountTests(SynchronousTestCase):
    """Datagrams the node cannot use are dropped and counted, as the broker does."""

    def test_bad_datagrams_are_counted_by_reason(self):
        """Short, foreign-framing, unknown-device and forged datagrams are counted in
        endpoint.drops under the broker's reason names, and none is answered."""
        clock = MemoryReactorClock()
        endpoint = NodeEndpoint(("127.0.0.1", 9), reactor=clock, now=clock.seconds)
        node = NodeSession(7, bytes(range(16)), endpoint.broker_address,
                           session_ids=SessionIds(None), profile=node_profile(1.0),
                           ciphers=endpoint.ciphers, rekey_after=3.0)
        endpoint.add(node)
        sent = endpoint.datagrams_out
        source = ("127.0.0.1", 9)
        endpoint.datagram_received(b"\x01\x02", source)
        endpoint.datagram_received(b"\x09" + bytes(60), source)
        endpoint.datagram_received(build_header(8, 1) + bytes(60), source)
        endpoint.datagram_received(build_header(7, node.session_id) + bytes(60), source)
        self.assertEqual(dict(endpoint.drops), {"short": 1, "unknown_framing": 1,
                                                "unknown_device": 1, "auth_failed": 1})
        self.assertEqual(endpoint.datagrams_out, sent)
