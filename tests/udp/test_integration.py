"""End to end over real loopback sockets: a broker (tests/helpers.start_broker) and SSP nodes.

Integration tests: real UDP on 127.0.0.1, waits bounded by loopback.DEADLINE.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase

from broker.node.client import SSPNode
from broker.ssp.framing import build_header
from tests.helpers import loopback_config, start_broker

from .loopback import LossyProxy, Recorder, pause, wait_until


def history_events(view):
    """Every event the registry recorded for a device, in order."""
    found = []
    for _, _, _, kind, data in view.history:
        if kind == "events":
            found.extend(data)
        elif kind == "reported" and hasattr(data, "get") and "events" in data:
            found.extend(data["events"])
    return list(found)


class EndToEndTests(TestCase):
    """Provision, report, desired, roaming, loss, replay and floods against a real broker."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        config = loopback_config(self, registry={"history_size": 1000},
                                 ssp={"device_heartbeat": 2.0, "offline_after": 6.0})
        self.broker = yield start_broker(self, config)
        self.registry = self.broker.service.registry
        self.endpoint = self.broker.service.ssp_endpoint
        self.address = ("127.0.0.1", self.broker.udp_port)

    def node(self, provisioned, address=None, **kwargs):
        kwargs.setdefault("heartbeat", 2.0)
        kwargs.setdefault("rekey_after", 60.0)
        node = SSPNode(provisioned.device_number, provisioned.secret, address or self.address,
                       state_path=os.path.join(self.mktemp(), "ids.json"),
                       interface="127.0.0.1", **kwargs)
        node.start()
        self.addCleanup(node.stop)
        return node

    def listen(self, protocol):
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port

    @defer.inlineCallbacks
    def test_report_and_desired_round_trip(self):
        """A provisioned node's report reaches the registry; a desired write reaches the node."""
        device = yield self.registry.add_device("sensor-1")
        version = self.registry.device("sensor-1").version
        desired = []
        node = self.node(device, on_desired=desired.append)
        node.report({"temp": 21.5, "unit": "C"})
        node.emit({"kind": "boot"})
        yield wait_until(self, lambda: dict(self.registry.device("sensor-1").reported)
                         == {"temp": 21.5, "unit": "C"}, what="reported")
        view = self.registry.device("sensor-1")
        self.assertGreater(view.version, version)
        self.assertTrue(view.online)
        self.assertEqual(history_events(view), [{"kind": "boot"}])
        yield self.registry.update_desired("sensor-1", {"led": "on"})
        yield wait_until(self, lambda: desired and desired[-1] == {"led": "on"}, what="desired")
        self.assertEqual(node.desired, {"led": "on"})
        yield wait_until(self, lambda: node.session.idle(), what="acknowledged")

    @defer.inlineCallbacks
    def test_source_port_change_keeps_the_session(self):
        """A node whose source port changes mid-session keeps its session and is followed
        (the registry's address once the node answered there: probation)."""
        device = yield self.registry.add_device("roamer")
        node = self.node(device)
        node.report({"n": 1})
        yield wait_until(self, lambda: self.registry.device("roamer").reported.get("n") == 1)
        session_id = self.endpoint.session_of(device.device_number).session_id
        old_port = node.endpoint.local_ports()[0]
        yield node.move()
        new_port = node.endpoint.local_ports()[0]
        self.assertNotEqual(old_port, new_port)
        node.report({"n": 2})
        yield wait_until(self, lambda: self.registry.device("roamer").reported.get("n") == 2)
        yield self.registry.update_desired("roamer", {"mode": "eco"})
        yield wait_until(self, lambda: node.desired == {"mode": "eco"}, what="desired after move")
        yield wait_until(self, lambda: self.registry.device("roamer").address
                         == ("127.0.0.1", new_port), what="address after move")
        live = self.endpoint.session_of(device.device_number)
        self.assertEqual(live.session_id, session_id)
        self.assertEqual(live.session.remote_address, ("127.0.0.1", new_port))
        self.assertEqual(self.endpoint.counters["sessions_verified"], 1)
        self.assertEqual(node.session.sessions_started, 1)

    @defer.inlineCallbacks
    def test_lossy_reordering_duplicating_link_converges(self):
        """Through a proxy that drops, duplicates and reorders, values and events converge exactly."""
        device = yield self.registry.add_device("lossy")
        proxy = LossyProxy(self.address, seed=7)
        port = self.listen(proxy)
        self.addCleanup(proxy.stop)
        desired = []
        node = self.node(device, address=("127.0.0.1", port.getHost().port),
                         on_desired=desired.append)
        for i in range(40):
            node.report({"count": i})
            node.emit({"seq": i})
            if i == 20:
                yield self.registry.update_desired("lossy", {"target": 42})
            yield pause(0.01)
        yield wait_until(self, lambda: node.session.idle()
                         and node.desired == {"target": 42}, what="convergence")
        view = self.registry.device("lossy")
        self.assertEqual(dict(view.reported), {"count": 39})
        self.assertEqual(history_events(view), [{"seq": i} for i in range(40)])
        self.assertGreater(proxy.stats["dropped"], 0)
        self.assertGreater(proxy.stats["duplicated"], 0)
        self.assertGreater(proxy.stats["delayed"], 0)
        self.assertEqual(node.session.sessions_started, 1)

    @defer.inlineCallbacks
    def test_replay_of_old_session_after_new_session_is_ignored(self):
        """A datagram captured in an old session and replayed after a new one changes nothing."""
        device = yield self.registry.add_device("replayed")
        proxy = LossyProxy(self.address, drop=0, duplicate=0, reorder=0)
        port = self.listen(proxy)
        node = self.node(device, address=("127.0.0.1", port.getHost().port))
        node.report({"v": "old"})
        yield wait_until(self, lambda: self.registry.device("replayed").reported.get("v") == "old")
        captured = list(proxy.captured)
        old_id = node.session_id
        node.session.start(node.endpoint.now())  # a reboot: strictly newer session
        node.report({"v": "new"})
        yield wait_until(self, lambda: self.registry.device("replayed").reported.get("v") == "new")
        self.assertGreater(node.session_id, old_id)
        attacker = Recorder()
        self.listen(attacker)
        drops = self.endpoint.drops["old_session"]
        for data in captured:
            attacker.transport.write(data, self.address)
        yield wait_until(self, lambda: self.endpoint.drops["old_session"] >= drops + len(captured),
                         what="replays dropped")
        yield pause(0.2)
        self.assertEqual(attacker.received, [])
        live = self.endpoint.session_of(device.device_number)
        self.assertEqual(live.session_id, node.session_id)
        self.assertEqual(self.registry.device("replayed").reported.get("v"), "new")

    @defer.inlineCallbacks
    def test_unauthenticated_flood_is_dropped_without_replies(self):
        """A flood of garbage and forged datagrams gets no reply while a real node is served."""
        device = yield self.registry.add_device("victim")
        node = self.node(device)
        node.report({"ok": 0})
        yield wait_until(self, lambda: self.registry.device("victim").reported.get("ok") == 0)
        live = self.endpoint.session_of(device.device_number)
        attacker = Recorder()
        self.listen(attacker)
        headers = [b"\x02" + os.urandom(16),                          # unknown framing
                   build_header(424242, 1),                            # unknown device
                   build_header(device.device_number, live.session_id),  # forged, live session
                   build_header(device.device_number, live.session_id + 1)]  # forged new session
        for round_ in range(10):
            for i in range(100):
                attacker.transport.write(headers[i % 4] + os.urandom(60 + i % 40), self.address)
            node.report({"ok": round_ + 1})
            yield pause(0.02)
        yield wait_until(self, lambda: self.registry.device("victim").reported.get("ok") == 10,
                         what="the real node served")
        yield pause(0.3)
        self.assertEqual(attacker.received, [])
        drops = self.endpoint.drops
        self.assertGreater(drops["unknown_framing"], 0)
        self.assertGreater(drops["unknown_device"], 0)
        self.assertGreater(drops["auth_failed"] + drops["rate_limited"]
                           + drops["new_session_rate_limited"], 0)
        self.assertEqual(self.endpoint.session_of(device.device_number).session_id,
                         live.session_id)


def _ipv6_loopback() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class IPv6Tests(TestCase):
    """The SSP port bound to ::1 serves nodes over IPv6."""

    timeout = 60

    @defer.inlineCallbacks
    def test_report_over_ipv6(self):
        """A node talking to [::1]:port reports and is followed at its IPv6 address."""
        if not _ipv6_loopback():
            raise SkipTest("this host has no IPv6 loopback")
        config = loopback_config(self, ssp={"host": "::1"})
        broker = yield start_broker(self, config)
        registry = broker.service.registry
        device = yield registry.add_device("v6")
        node = SSPNode(device.device_number, device.secret, ("::1", broker.udp_port),
                       state_path=os.path.join(self.mktemp(), "ids.json"), interface="::1")
        node.start()
        self.addCleanup(node.stop)
        node.report({"family": "inet6"})
        yield wait_until(self, lambda: registry.device("v6").reported.get("family") == "inet6")
        self.assertEqual(registry.device("v6").address[0], "::1")
        udp = broker.service.getServiceNamed("udp")
        self.assertGreaterEqual(udp.receive_buffer, 65536)
