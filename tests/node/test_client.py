"""The node's UDP endpoint: numeric broker addresses, datagrams on its sockets."""

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.node.client import NodeEndpoint, SSPNode
from broker.ssp.framing import HEADER_SIZE, parse_header


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
