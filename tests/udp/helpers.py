"""An SSP endpoint and sans-IO nodes joined by a fake link, on one task.Clock.

No sockets: the endpoint's transport records what it writes and the link
hands datagrams between nodes and endpoint, with time stepped explicitly.
"""

from __future__ import annotations

import collections
import itertools

from twisted.internet.task import Clock

from broker.config import SSPSettings
from broker.node.client import node_profile
from broker.node.session import NodeSession
from broker.node.session_ids import SessionIds
from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.ssp.crypto import CipherCache
from broker.udp.endpoint import SSPEndpoint

START = 1_000.0
BROKER = ("127.0.0.1", 60001)


class FakeTransport:
    """Records the datagrams an endpoint writes (no socket attribute: write() is used).

    ``written``: not yet handed to the nodes; ``sent``: how many ever went to
    each address; ``log``: every datagram ever written, in order.
    """

    def __init__(self):
        self.written = []
        self.sent = collections.Counter()
        self.log = []

    def write(self, data, addr):
        self.written.append((data, addr))
        self.sent[addr] += 1
        self.log.append(data)


class Deterministic:
    """A counter-based random_bytes: reproducible, never repeating."""

    def __init__(self, seed=1):
        self._counter = itertools.count(seed)

    def __call__(self, n):
        value = next(self._counter)
        return (value.to_bytes(8, "big") * (n // 8 + 1))[:n]


class Harness:
    """A registry over a MemoryStore, an endpoint and any number of nodes, on one Clock.

    While ``deaf`` is set the nodes still send, but every datagram of the
    broker is lost (the endpoint keeps its transport's write method from
    the start, so the datagrams are dropped in ``step``).
    """

    deaf = False

    def __init__(self, testcase, store=None, clock=None, **settings):
        self.testcase = testcase
        self.clock = clock or Clock()
        if clock is None:
            self.clock.advance(START)
        self.store = store if store is not None else MemoryStore()
        self.settings = SSPSettings(**settings)
        self.registry = DeviceRegistry(self.store, clock=self.clock,
                                       settings=RegistrySettings(reload_interval=0))
        self.endpoint = SSPEndpoint(self.registry, self.settings, clock=self.clock,
                                    random_bytes=Deterministic(1_000_000))
        self.transport = FakeTransport()
        self.endpoint.makeConnection(self.transport)
        self.nodes = {}          # address -> NodeSession
        self.wall = itertools.count(1)
        self.delivered = 0

    def restart(self):
        """A new registry and endpoint over the same store (the old ones are dropped, as by kill -9)."""
        self.endpoint.stopProtocol()
        return Harness(self.testcase, store=self.store, clock=self.clock,
                       **{name: getattr(self.settings, name) for name in SSPSettings.__slots__})

    def provision(self, name="dev"):
        return self.testcase.successResultOf(self.registry.add_device(name))

    def node(self, provisioned, address=("127.0.0.2", 40000), session_ids=None, **kwargs):
        """A sans-IO node for a provisioned device, started now, sending from address."""
        ids = session_ids or SessionIds(None, random_bytes=Deterministic(7),
                                        wall_clock=lambda: next(self.wall))
        kwargs.setdefault("rekey_after", 75.0)
        node = NodeSession(provisioned.device_number, provisioned.secret, BROKER,
                           session_ids=ids, profile=node_profile(25.0),
                           ciphers=CipherCache(16), random_bytes=Deterministic(5), **kwargs)
        node.start(self.clock.seconds())
        self.nodes[address] = node
        return node

    def move(self, node, address):
        """The node's datagrams come from another address from now on."""
        for old, other in list(self.nodes.items()):
            if other is node:
                del self.nodes[old]
        self.nodes[address] = node

    def address_of(self, node):
        for address, other in self.nodes.items():
            if other is node:
                return address
        raise KeyError(node)

    def step(self, dt=0.01, via=None):
        """Exchange every due datagram once, then advance the clock by dt.

        ``via``: another broker process (its ``endpoint`` and ``transport``)
        the nodes' datagrams reach instead of this one's."""
        endpoint, transport = (self.endpoint, self.transport) if via is None else (
            via.endpoint, via.transport)
        now = self.clock.seconds()
        for address, node in list(self.nodes.items()):
            for data, _ in node.datagrams(now):
                endpoint.datagramReceived(data, address)
        written, transport.written = transport.written, []
        if self.deaf:
            written = []
        for data, address in written:
            node = self.nodes.get(address)
            if node is not None:
                self.delivered += 1
                node.receive(data, BROKER, now)
        self.clock.advance(dt)

    def run(self, seconds, dt=0.01):
        for _ in range(int(round(seconds / dt))):
            self.step(dt)
