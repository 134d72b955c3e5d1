"""Workers on one host: real worker processes behind one UDP port, sharing Redis.

The supervisor runs in the test's reactor and spawns two real workers
(python -m broker.worker); 1,000 simulated devices (real SSP sessions over
loopback UDP) connect through the steered port.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.config import load_config
from broker.node.client import NodeEndpoint
from broker.node.session import NodeSession
from broker.node.session_ids import SessionIds
from broker.node.client import node_profile
from broker.steering import worker_of
from broker.workers import SupervisorService

from .redis_support import start_single
from .support import SingleRedis, open_registry_on, wait_until, write_worker_config

DEVICES = 1000


class WorkersTests(SingleRedis, TestCase):
    """Two workers share the SSP port; each device's sessions stay on one worker."""

    timeout = 240

    def write_config(self, url):
        return write_worker_config(self, url, workers=2,
                                   ssp="device_heartbeat = 5.0\noffline_after = 15.0\n"
                                       "max_new_sessions_per_second = 100000")

    @defer.inlineCallbacks
    def setUp(self):
        url = start_single(self)
        self.registry = open_registry_on(self, url)
        adds = [self.registry.add_device(f"dev-{i:04d}") for i in range(DEVICES)]
        self.devices = yield defer.gatherResults(adds)
        os.environ["SSP_WORKER_REPORT_DEVICES"] = "1"
        self.addCleanup(os.environ.pop, "SSP_WORKER_REPORT_DEVICES", None)
        path = self.write_config(url)
        self.supervisor = SupervisorService(load_config(path), path, reactor=reactor)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)
        yield self.supervisor.ready
        self.endpoint = NodeEndpoint(("127.0.0.1", self.supervisor.udp_port), reactor=reactor,
                                     sockets=8)
        self.endpoint.listen()
        self.addCleanup(self.endpoint.stop)
        profile = node_profile(5.0)
        ids = SessionIds(None)
        self.nodes = []
        for device in self.devices:
            node = NodeSession(device.device_number, device.secret,
                               self.endpoint.broker_address, session_ids=ids, profile=profile,
                               ciphers=self.endpoint.ciphers, rekey_after=60.0)
            node.report({"seq": 0}, self.endpoint._now())
            self.nodes.append(node)
        for i in range(0, DEVICES, 100):
            for node in self.nodes[i:i + 100]:
                self.endpoint.add(node)
            yield wait_until(self, lambda: True)

    def report_all(self, seq):
        now = self.endpoint._now()
        for node in self.nodes:
            node.report({"seq": seq}, now)
            self.endpoint.kick(node)

    def acknowledged(self, seq):
        return all(node.desired is not None and node.acknowledged >= seq for node in self.nodes)

    def worker_devices(self):
        return {w.index: set(w.status.get("devices") or ()) for w in
                self.supervisor.workers.values()}

    @defer.inlineCallbacks
    def wait_reported(self, seq, timeout=90):
        yield wait_until(self, lambda: all(
            (self.registry.device_by_number(d.device_number).reported.get("seq") == seq)
            for d in self.devices), timeout=timeout, what=f"every device's seq={seq} in Redis")

    @defer.inlineCallbacks
    def test_sessions_stay_on_their_worker_and_resume_after_a_kill(self):
        """1,000 devices over 2 workers: each device's session is held by worker_of(number)
        before and after every source port changes, and a SIGKILLed worker's devices resume on its restart."""
        yield self.wait_reported(0)
        self.report_all(1)
        yield self.wait_reported(1)
        yield self.endpoint.move()
        self.report_all(2)
        yield self.wait_reported(2)
        yield wait_until(self, lambda: sum(map(len, self.worker_devices().values())) == DEVICES,
                         what="status of both workers")
        held = self.worker_devices()
        for device in self.devices:
            owner = worker_of(device.device_number, 2)
            self.assertIn(device.device_number, held[owner])
            self.assertNotIn(device.device_number, held[1 - owner])
        self.assertTrue(all(held.values()), "both workers hold sessions")
        def counted(name):
            return sum(w.status["counters"].get(name, 0)
                       for w in self.supervisor.workers.values())

        # Every device moved once (a roam, not a new session); status lines come
        # periodically, so wait for the ones that carry the moves.
        yield wait_until(self, lambda: counted("roams") >= DEVICES, what="the roams counted")
        self.assertEqual(counted("sessions_started"), DEVICES)
        self.assertEqual(counted("sessions_resumed"), 0)

        # Kill worker 0 without warning; its devices resume on the restarted worker.
        old = self.supervisor.workers[0]
        self.supervisor.signal_worker(0, "KILL")
        yield old.ended
        yield wait_until(self, lambda: self.supervisor.workers[0] is not old
                         and self.supervisor.workers[0].status.get("ready"),
                         timeout=60, what="worker 0 restarted")
        self.report_all(3)
        yield self.wait_reported(3, timeout=120)
        new = self.supervisor.workers[0].status
        yield wait_until(self, lambda: self.supervisor.workers[0].status.get("counters", {})
                         .get("sessions_resumed", 0) > 0, what="resumed sessions on worker 0")
        lost = [d for d in self.devices if worker_of(d.device_number, 2) == 0]
        self.assertEqual(self.supervisor.restarts, 1)
        self.assertGreater(len(lost), 0)
        self.assertNotEqual(new["pid"], old.status["pid"])
