"""Host death behind a load balancer: two broker hosts on one Redis, real sockets.

Each "host" is a supervisor in the test's reactor running one real broker
process (``python -m broker.worker``) on its own loopback ports; the
balancer (balancer.py) hashes each datagram's device bytes over the live
hosts; the devices are real SSP nodes (broker.node) reporting a counter
through the balancer. Host A's broker is killed with SIGKILL (and its
supervisor stopped: the host is gone), with one of its devices silenced at
the same moment. The test's own registry only watches: it holds no lease,
so whatever is marked offline was marked by the surviving broker.
"""

import os

from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from broker.config import load_config
from broker.node.client import SSPNode
from broker.registry.shared import open_shared_registry
from broker.workers import SupervisorService
from tests.helpers import http_json

from .balancer import DeviceHashBalancer
from .support import SingleRedis, redis_options, wait_until, write_worker_config

#: devices per host (nodes in all: twice this).
DEVICES_PER_HOST = 3
#: the brokers' presence lease (seconds): short, to bound the test.
LEASE_TTL = 5.0
LEASE_CHECK_INTERVAL = 0.5
#: the nodes: heartbeat, and silence after which they start a new session.
HEARTBEAT = 0.5
REKEY_AFTER = 2.0
#: seconds between two reports of every node.
REPORT_EVERY = 0.25


class HostDeathTests(SingleRedis, TestCase):
    """A dead host's devices move to the survivor; its silent ones go offline."""

    timeout = 150

    def write_config(self, url):
        return write_worker_config(
            self, url, workers=1, ssp="device_heartbeat = 1.0\noffline_after = 120.0",
            registry=f"redis_lease_ttl = {LEASE_TTL}\n"
                     f"redis_lease_check_interval = {LEASE_CHECK_INTERVAL}")

    def start_host(self, url):
        path = self.write_config(url)
        host = SupervisorService(load_config(path), path, reactor=reactor,
                                 environ=dict(os.environ, SSP_WORKER_REPORT_DEVICES="1"))
        host.startService()
        self.addCleanup(lambda: host.stopService() if host.running else None)
        return host

    @defer.inlineCallbacks
    def setUp(self):
        url = self.start_redis()
        self.registry = open_shared_registry(redis_options(self, url), reactor=reactor,
                                             lease_ttl=0)
        self.registry.start()
        self.addCleanup(self.registry.stop)
        _, token = yield self.registry.add_token("read")
        self.headers = {b"authorization": [b"Bearer " + token.encode()]}
        self.hosts = {"a": self.start_host(url), "b": self.start_host(url)}
        yield defer.gatherResults([host.ready for host in self.hosts.values()])
        self.balancer = DeviceHashBalancer(reactor, {
            name: (host.udp_port, f"http://127.0.0.1:{host.http_port}")
            for name, host in self.hosts.items()})
        front = self.balancer.start()
        self.addCleanup(self.balancer.stop)
        # Provision until the balancer sends DEVICES_PER_HOST devices to each host.
        self.devices = {"a": [], "b": []}
        for i in range(64):
            device = yield self.registry.add_device(f"dev-{i:02d}")
            chosen = self.devices[self.balancer.backend_for(device.device_number)]
            if len(chosen) < DEVICES_PER_HOST:
                chosen.append(device)
            if min(map(len, self.devices.values())) == DEVICES_PER_HOST:
                break
        self.assertEqual(sorted(map(len, self.devices.values())), [DEVICES_PER_HOST] * 2)
        self.nodes = {}
        for device in self.devices["a"] + self.devices["b"]:
            node = SSPNode(device.device_number, device.secret, ("127.0.0.1", front),
                           heartbeat=HEARTBEAT, rekey_after=REKEY_AFTER)
            node.start()
            self.addCleanup(node.stop)
            self.nodes[device.name] = node
        self.seq = dict.fromkeys(self.nodes, 0)
        self.acked = dict.fromkeys(self.nodes, 0)
        self.reporting = set(self.nodes)
        self.reports = LoopingCall(self.report_all)
        self.reports.start(REPORT_EVERY)
        self.addCleanup(lambda: self.reports.running and self.reports.stop())

    def report_all(self):
        """Each reporting node: note what is acknowledged, then report the next counter."""
        for name in sorted(self.reporting):
            self.note_acked(name)
            self.seq[name] += 1
            self.nodes[name].report({"seq": self.seq[name]})

    def note_acked(self, name):
        if self.nodes[name].session.idle():
            self.acked[name] = self.seq[name]

    def held_by(self, host):
        worker = self.hosts[host].workers.get(0)
        return set(worker.status.get("devices") or ()) if worker is not None else set()

    def numbers(self, devices):
        return {device.device_number for device in devices}

    @defer.inlineCallbacks
    def via_b(self, name):
        """The device as broker B's HTTP API shows it."""
        code, _, body = yield http_json(self, "GET", f"http://127.0.0.1:{self.hosts['b'].http_port}"
                                        f"/api/v1/devices/{name}", headers=self.headers)
        self.assertEqual(code, 200, body)
        return body

    @defer.inlineCallbacks
    def kill_host_a(self):
        """Host A dies (SIGKILL, its supervisor gone) and one of A's devices falls
        silent at the same moment; returns what was acknowledged by then."""
        self.reporting.discard(self.silent)
        for name in self.nodes:
            self.note_acked(name)
        acked = dict(self.acked)
        yield self.nodes[self.silent].stop()
        self.cursor_at_kill = self.registry.cursor
        host_a = self.hosts["a"]
        worker = host_a.workers[0]
        host_a.signal_worker(0, "KILL")
        stopped = host_a.stopService()
        yield worker.ended
        yield stopped
        return acked

    @defer.inlineCallbacks
    def before_and_after(self, move):
        """The scenario: all devices on their hosts, A dies, ``move()`` gets A's
        devices to B; then what every test asserts."""
        self.silent = self.devices["a"][0].name
        moved = [device.name for device in self.devices["a"][1:]]
        yield wait_until(self, lambda: min(self.acked.values()) >= 2, what="first reports acked")
        yield wait_until(self, lambda: self.held_by("a") == self.numbers(self.devices["a"])
                         and self.held_by("b") == self.numbers(self.devices["b"]),
                         what="each host holding its devices' sessions")
        self.assertTrue(all(self.registry.device(name).online for name in self.nodes))
        self.assertEqual({node.session.sessions_started for node in self.nodes.values()}, {1})
        acked_at_kill = yield self.kill_host_a()

        # Nothing A acknowledged is lost: it is all in Redis.
        for name, seq in acked_at_kill.items():
            yield wait_until(self, lambda: self.registry.device(name).reported.get("seq", 0) >= seq,
                             timeout=10, what=f"{name}'s acknowledged seq={seq} in Redis")

        yield move(moved)
        yield wait_until(self, lambda: all(self.acked[name] >= acked_at_kill[name] + 2
                                           for name in self.reporting),
                         timeout=60, what="new reports of every device acknowledged")
        for name in moved:
            self.assertEqual(self.balancer.backend_for(self.nodes[name].session.device_number), "b")
        yield wait_until(self, lambda: self.held_by("b") == self.numbers(self.devices["a"][1:]
                                                                       + self.devices["b"]),
                         what="B holding the moved devices' sessions")

        # Reports stop; everything sent is acknowledged and B shows it, online.
        self.reports.stop()
        yield wait_until(self, lambda: all(self.nodes[name].session.idle()
                                           for name in self.reporting), what="all acked")
        for name in sorted(self.reporting):
            body = yield self.via_b(name)
            self.assertEqual(body["reported"]["seq"], self.seq[name], name)
            self.assertTrue(body["connection"]["online"], name)

        # The silent device is shown offline once A's lease expired (B's check);
        # the devices that came back stay online.
        yield wait_until(self, lambda: not self.registry.device(self.silent).online,
                         timeout=LEASE_TTL + 30, what="the silent device offline")
        body = yield self.via_b(self.silent)
        self.assertFalse(body["connection"]["online"])
        self.assertGreaterEqual(body["reported"]["seq"], acked_at_kill[self.silent])
        offline = [entry for entry in self.registry.device(self.silent).history
                   if entry[1] > self.cursor_at_kill and entry[3] == "connection"]
        self.assertEqual([dict(entry[4]) for entry in offline], [{"online": False}])
        for name in sorted(self.reporting):
            self.assertTrue(self.registry.device(name).online, name)
            body = yield self.via_b(name)
            self.assertTrue(body["connection"]["online"], name)
        return moved

    def b_counters(self):
        return self.hosts["b"].workers[0].status.get("counters", {})

    @defer.inlineCallbacks
    def test_health_check_moves_devices_and_b_resumes_their_sessions(self):
        """SIGKILL host A: the balancer's health check drops A, B resumes A's devices' sessions
        from their records with nothing acknowledged lost, and A's silent device shows offline
        once A's lease expired."""
        def move(moved):
            return wait_until(self, lambda: "a" in self.balancer.removed, what="A removed")
        moved = yield self.before_and_after(move)
        self.assertIn("health check", self.balancer.removed["a"])
        for name in moved:
            self.assertEqual(self.nodes[name].session.sessions_started, 1, name)
        self.assertEqual(self.b_counters().get("sessions_resumed"), len(moved))

    @defer.inlineCallbacks
    def test_devices_that_rekeyed_start_new_sessions_on_b(self):
        """SIGKILL host A while the balancer still sends to it: A's devices start new sessions
        after rekey_after, which land on B once A is removed, with nothing acknowledged lost."""
        self.balancer.stop_health_checks()

        @defer.inlineCallbacks
        def move(moved):
            yield wait_until(self, lambda: all(self.nodes[name].session.sessions_started >= 2
                                               for name in moved),
                             what="A's devices starting new sessions")
            self.balancer.remove("a", "killed by the test")
        moved = yield self.before_and_after(move)
        self.assertEqual(self.b_counters().get("sessions_resumed", 0), 0)
        self.assertGreaterEqual(self.b_counters().get("sessions_started"),
                                DEVICES_PER_HOST + len(moved))
