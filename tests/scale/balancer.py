"""A small UDP load balancer for the host-death tests (docs/scaling.md, section 3).

It stands for an IPVS/Envoy front: every datagram goes to a live backend
chosen by rendezvous hashing of the header's device bytes (wire.md 1,
bytes 1-8), never by source address, so a roaming device keeps its host and
removing a backend moves only that backend's devices. Each client address
gets a relay socket of its own, so backends see one address per client and
their replies go back to it. A backend is removed by ``remove`` (the test
killed it) or when its HTTP ``/healthz`` fails.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import treq
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.web.client import HTTPConnectionPool, ResponseFailed

HOST = "127.0.0.1"
#: what a backend that does not answer its health check raises.
UNHEALTHY = (error.ConnectError, error.TimeoutError, defer.CancelledError, ResponseFailed)


def weight(name: str, device_bytes: bytes) -> bytes:
    """The rendezvous weight of backend ``name`` for one device (largest wins)."""
    return hashlib.blake2b(name.encode() + b"\0" + device_bytes, digest_size=8).digest()


class _Relay(DatagramProtocol):
    """The balancer's socket for one client: out to backends, replies back to the client."""

    def __init__(self, balancer, client):
        self.balancer = balancer
        self.client = client

    def datagramReceived(self, data, addr):
        self.balancer.replied(data, self.client)


class _Front(DatagramProtocol):
    def __init__(self, balancer):
        self.balancer = balancer

    def datagramReceived(self, data, addr):
        self.balancer.received(data, addr)


class DeviceHashBalancer:
    """UDP front on loopback; ``backends`` maps a name to (udp port, health URL)."""

    def __init__(self, reactor, backends: dict, *, health_interval: float = 0.2):
        self.reactor = reactor
        self.backends = dict(backends)
        self.live = set(backends)
        self.removed = {}                 # name -> why
        self.forwarded = Counter()        # name -> datagrams sent to it
        self.dropped = 0
        self._relays = {}
        self._front = None
        self._health = LoopingCall(self.check_health)
        self._health.clock = reactor
        self._health_interval = health_interval
        self._pool = HTTPConnectionPool(reactor, persistent=False)

    def start(self) -> int:
        """Listen; returns the front port."""
        self._front = self.reactor.listenUDP(0, _Front(self), interface=HOST)
        self._health.start(self._health_interval, now=False)
        return self._front.getHost().port

    def stop_health_checks(self):
        """Only ``remove`` takes backends out from now on."""
        if self._health.running:
            self._health.stop()

    def stop(self):
        self.stop_health_checks()
        ports = [self._front] + [relay.transport for relay in self._relays.values()]
        self._relays = {}
        stops = [defer.maybeDeferred(port.stopListening) for port in ports if port is not None]
        stops.append(self._pool.closeCachedConnections())
        return defer.DeferredList(stops)

    def backend_for(self, device_number: int) -> str | None:
        """The live backend a device's datagrams go to."""
        key = device_number.to_bytes(8, "big")
        return max(self.live, key=lambda name: weight(name, key), default=None)

    def remove(self, name: str, why: str = "removed") -> None:
        if name in self.live:
            self.live.discard(name)
            self.removed[name] = why

    # -- datagrams -----------------------------------------------------------------

    def received(self, data: bytes, client) -> None:
        if len(data) < 9 or not self.live:
            self.dropped += 1
            return
        name = self.backend_for(int.from_bytes(data[1:9], "big"))
        relay = self._relays.get(client)
        if relay is None:
            relay = self._relays[client] = _Relay(self, client)
            self.reactor.listenUDP(0, relay, interface=HOST)
        self.forwarded[name] += 1
        relay.transport.write(data, (HOST, self.backends[name][0]))

    def replied(self, data: bytes, client) -> None:
        if self._front is not None:
            self._front.write(data, client)

    # -- health --------------------------------------------------------------------

    def check_health(self):
        """GET /healthz of every live backend; one that fails is removed."""
        checks = [self._check(name) for name in sorted(self.live)]
        return defer.DeferredList(checks, consumeErrors=True)

    @defer.inlineCallbacks
    def _check(self, name):
        url = self.backends[name][1] + "/healthz"
        try:
            response = yield treq.get(url, timeout=1.0, pool=self._pool)
            yield response.content()
            healthy = response.code == 200
        except UNHEALTHY as problem:
            healthy, why = False, f"health check failed: {problem!r}"
        else:
            why = f"health check answered {response.code}"
        if not healthy:
            self.remove(name, why)
