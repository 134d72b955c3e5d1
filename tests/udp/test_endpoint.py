"""Tests for broker.udp.endpoint: demultiplexing, sessions, bridging, limits.

A real registry (MemoryStore) and sans-IO nodes joined to the endpoint by a
fake link on a task.Clock (tests/udp/helpers.py); no sockets, no sleeps.
"""

import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from broker.metrics import Metrics
from broker.registry import MemoryStore
from broker.registry.errors import StoreError, UnknownDevice

from broker.ssp.crypto import TO_SERVER, seal
from broker.ssp.framing import build_header
from broker.ssp.keys import derive_session_key
from broker.udp.metrics import EndpointMetrics
from broker.udp.park import Parked
from broker.udp.sessions import SEQ_RESERVATION_BLOCK, LiveSession, clock_floor

from .helpers import Harness


def sample(metrics, name, **labels):
    """The current value of one Prometheus sample (0.0 before it exists)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def authentic(provisioned, session_id, seq, payload):
    """A datagram sealed with the device's real session key (authentic, content chosen)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
    key = derive_session_key(provisioned.secret, provisioned.device_number, session_id)
    header = build_header(provisioned.device_number, session_id)
    return seal(AESOCB3(key), TO_SERVER, seq, b"\x00\x01\xff\xff" + payload, header)


class DemultiplexTests(SynchronousTestCase):
    """What the endpoint does with datagrams that are not (yet) a session's."""

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")

    def assertSilent(self):
        self.assertEqual(self.h.transport.written, [])

    def test_unknown_framing_version_dropped_and_counted(self):
        """A datagram with another framing version is counted and never answered."""
        self.h.endpoint.datagramReceived(b"\x02" + os.urandom(80), ("127.0.0.9", 1))
        self.assertEqual(self.h.endpoint.drops["unknown_framing"], 1)
        self.assertSilent()

    def test_short_and_zero_headers_dropped(self):
        """Datagrams too short to hold anything, or naming device/session 0, are dropped."""
        endpoint = self.h.endpoint
        endpoint.datagramReceived(b"", ("127.0.0.9", 1))
        endpoint.datagramReceived(b"\x01" * 20, ("127.0.0.9", 1))
        endpoint.datagramReceived(build_header(1, 1)[:1] + bytes(16) + os.urandom(60),
                                  ("127.0.0.9", 1))
        self.assertEqual(endpoint.drops["short"], 2)
        self.assertEqual(endpoint.drops["bad_header"], 1)
        self.assertSilent()

    def test_unknown_device_dropped(self):
        """A datagram naming a device the registry does not know is dropped unopened."""
        self.h.endpoint.datagramReceived(build_header(12345, 1) + os.urandom(60),
                                         ("127.0.0.9", 1))
        self.assertEqual(self.h.endpoint.drops["unknown_device"], 1)
        self.assertEqual(len(self.h.endpoint), 0)
        self.assertSilent()

    def test_failed_authentication_gets_no_reply(self):
        """Garbage under a real device's header starts no session and gets no reply."""
        header = build_header(self.device.device_number, 99)
        for _ in range(3):
            self.h.endpoint.datagramReceived(header + os.urandom(60), ("127.0.0.9", 1))
        self.assertEqual(self.h.endpoint.drops["auth_failed"], 3)
        self.assertEqual(len(self.h.endpoint), 0)
        self.assertIsNone(self.h.registry.session_record(self.device.device_number))
        self.assertSilent()

    def test_failed_authentication_does_not_pollute_cipher_cache(self):
        """Key schedules built for datagrams that failed authentication are discarded."""
        header = build_header(self.device.device_number, 99)
        for _ in range(5):
            self.h.endpoint.datagramReceived(header + os.urandom(60), ("127.0.0.9", 1))
        self.assertEqual(len(self.h.endpoint._ciphers), 0)

    def test_authentic_but_malformed_is_counted_and_survived(self):
        """An authentic datagram with a bad fragment or bad zlib is dropped and counted, no crash."""
        endpoint = self.h.endpoint
        endpoint.datagramReceived(authentic(self.device, 5, 0, b"short"), ("127.0.0.9", 1))
        endpoint.datagramReceived(
            authentic(self.device, 5, 1, b"\x00" * 8 + b"\x80\x00" + b"not zlib"),
            ("127.0.0.9", 1))
        endpoint.datagramReceived(
            authentic(self.device, 5, 2, b"\x00" * 7 + b"\x02\x80\x00" + b"x\x9c\x03\x00"
                      + b"\x00\x00\x00\x01"), ("127.0.0.9", 1))
        self.assertEqual(endpoint.drops["short"], 1)  # under 10 payload bytes: unopened
        self.assertEqual(endpoint.drops["bad_zlib"], 1)
        self.assertEqual(endpoint.drops["bad_version"], 1)  # empty protobuf: no version 2
        self.assertEqual(endpoint.drops["internal_error"], 0)
        self.assertEqual(endpoint.session_of(self.device.device_number).session_id, 5)


class SessionTests(SynchronousTestCase):
    """Sessions: start, replacement, replay, roaming, durability of acks."""

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")

    def test_report_updates_registry_and_is_acknowledged(self):
        """A reported value reaches the registry (new version) and the node gets its ack."""
        node = self.h.node(self.device)
        before = self.h.registry.device("dev").version
        node.report({"temp": 21.5}, self.h.clock.seconds())
        node.emit({"kind": "boot"}, now=self.h.clock.seconds())
        self.h.run(1.0)
        view = self.h.registry.device("dev")
        self.assertEqual(dict(view.reported), {"temp": 21.5})
        self.assertGreater(view.version, before)
        self.assertTrue(view.online)
        self.assertEqual(view.address, ("127.0.0.2", 40000))
        self.assertGreater(node.acknowledged, 0)
        self.assertTrue(node.idle())
        kinds = [entry[3] for entry in view.history]
        self.assertIn("reported", kinds)

    def test_ack_waits_until_durable(self):
        """No acknowledgement of a report leaves the broker before the registry made it durable."""
        node = self.h.node(self.device)
        self.h.run(0.5)
        acked = node.acknowledged
        self.h.store.hold()
        node.report({"temp": 1}, self.h.clock.seconds())
        self.h.run(2.0)
        self.assertEqual(node.acknowledged, acked)
        self.assertFalse(node.idle())
        self.h.store.release()
        self.h.run(1.0)
        self.assertGreater(node.acknowledged, acked)
        self.assertTrue(node.idle())

    def test_nothing_sent_before_the_session_is_durable(self):
        """A new session's id and sequence reservation are durable before its first datagram."""
        self.h.store.hold()
        started = self.h.clock.seconds()
        self.h.node(self.device)
        self.h.run(1.0)
        self.assertEqual(self.h.delivered, 0)
        self.h.store.release()
        self.h.run(0.5)
        self.assertGreater(self.h.delivered, 0)
        record = self.h.registry.session_record(self.device.device_number)
        self.assertEqual(record.seq_reservation, clock_floor(started) + SEQ_RESERVATION_BLOCK)

    def test_desired_reaches_the_node(self):
        """A change of desired in the registry arrives at the node as a callback."""
        seen = []
        node = self.h.node(self.device, on_desired=seen.append)
        self.h.run(0.5)
        self.successResultOf(self.h.registry.update_desired("dev", {"led": "on"}))
        self.h.run(1.0)
        self.assertEqual(seen[-1], {"led": "on"})
        self.assertEqual(node.desired, {"led": "on"})

    def test_desired_before_session_is_sent_at_start(self):
        """Desired values written while the device was away are its first incoming state."""
        self.successResultOf(self.h.registry.update_desired("dev", {"rate": 5}))
        node = self.h.node(self.device)
        self.h.run(1.0)
        self.assertEqual(node.desired, {"rate": 5})

    def test_commands_delivered_once_in_order(self):
        """Commands queued at the endpoint reach the node once each, in order."""
        got = []
        node = self.h.node(self.device, on_command=got.append)
        self.h.run(0.5)
        self.assertIs(self.successResultOf(
            self.h.endpoint.send_command(self.device.device_number, "a", "b")), True)
        self.h.run(0.5)
        self.h.endpoint.send_command(self.device.device_number, {"c": 1})
        self.h.run(1.0)
        self.assertEqual(got, ["a", "b", {"c": 1}])
        self.assertTrue(node.idle())

    def test_heartbeat_answered_without_registry_write(self):
        """A device heartbeat is acknowledged within the ack delay and writes nothing durable."""
        node = self.h.node(self.device)
        node.report({"x": 1}, self.h.clock.seconds())
        self.h.run(1.0)
        writes = self.h.store.writes
        acked = node.acknowledged
        self.h.run(26.0, dt=0.05)  # one heartbeat (25 s)
        self.assertGreater(node.acknowledged, acked)
        self.assertEqual(self.h.store.writes, writes)

    def test_new_session_replaces_old_and_old_replay_is_ignored(self):
        """A newer session id retires the live one; a replay of the old one changes nothing."""
        node = self.h.node(self.device)
        node.report({"v": 1}, self.h.clock.seconds())
        captured = []
        self.h.run(0.3)
        old_id = node.session_id
        captured.extend(node.datagrams(self.h.clock.seconds() + 30))  # a later datagram, unseen
        node.start(self.h.clock.seconds())  # reboot: strictly newer id
        self.h.run(1.0)
        self.assertGreater(node.session_id, old_id)
        live = self.h.endpoint.session_of(self.device.device_number)
        self.assertEqual(live.session_id, node.session_id)
        for data, _ in captured:
            self.h.endpoint.datagramReceived(data, ("127.0.0.66", 6666))
        self.assertEqual(self.h.endpoint.session_of(self.device.device_number), live)
        self.assertGreaterEqual(self.h.endpoint.drops["old_session"], 1)
        record = self.h.registry.session_record(self.device.device_number)
        self.assertEqual(record.session_id, node.session_id)

    def test_roaming_moves_the_session(self):
        """A node's newer datagrams from another address move the session and its replies."""
        node = self.h.node(self.device)
        self.h.run(0.5)
        live = self.h.endpoint.session_of(self.device.device_number)
        self.h.move(node, ("127.0.0.3", 41000))
        node.report({"moved": True}, self.h.clock.seconds())
        self.h.run(1.0)
        live = self.h.endpoint.session_of(self.device.device_number)
        self.assertEqual(live.session_id, node.session_id)
        self.assertEqual(self.h.endpoint.counters["sessions_started"], 1)
        self.assertEqual(live.session.remote_address, ("127.0.0.3", 41000))
        self.assertEqual(self.h.registry.device("dev").address, ("127.0.0.3", 41000))
        self.assertTrue(node.idle())
        self.assertEqual(self.h.endpoint.counters["roams"], 1)  # the move, not the start

    def test_roams_metric_counts_moves_not_session_starts(self):
        """broker_ssp_roams stays put when sessions start, are replaced or resume, and
        moves by one for each real change of a session's address."""
        metrics = Metrics()
        copier = EndpointMetrics(self.h.endpoint, metrics)
        node = self.h.node(self.device)
        other = self.h.node(self.h.provision("other"), address=("127.0.0.4", 40004))
        node.report({"v": 1}, self.h.clock.seconds())
        other.report({"v": 1}, self.h.clock.seconds())
        self.h.run(1.0)
        node.start(self.h.clock.seconds())  # a reboot: a newer session, from a new address
        self.h.move(node, ("127.0.0.5", 40005))
        self.h.run(1.0)
        copier.update()
        self.assertEqual(sample(metrics, "broker_ssp_new_sessions_total"), 3.0)
        self.assertEqual(sample(metrics, "broker_ssp_roams_total"), 0.0)
        self.h.move(node, ("127.0.0.6", 40006))  # a real roam (of a parked session)
        node.report({"v": 2}, self.h.clock.seconds())
        self.h.run(1.0)
        copier.update()
        self.assertEqual(sample(metrics, "broker_ssp_roams_total"), 1.0)
        self.assertEqual(self.h.registry.device("dev").address, ("127.0.0.6", 40006))
        h2 = self.h.restart()  # resuming after a restart is no roam either
        h2.nodes = self.h.nodes
        node.report({"v": 3}, h2.clock.seconds())
        h2.run(1.0)
        copier2 = EndpointMetrics(h2.endpoint, metrics)
        copier2.update()
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(sample(metrics, "broker_ssp_roams_total"), 1.0)

    def test_replayed_datagram_from_elsewhere_does_not_move_the_session(self):
        """An old authentic datagram replayed from another address leaves the session where it is."""
        node = self.h.node(self.device)
        node.report({"v": 1}, self.h.clock.seconds())
        now = self.h.clock.seconds()
        first = node.datagrams(now)
        for data, _ in first:
            self.h.endpoint.datagramReceived(data, ("127.0.0.2", 40000))
        self.h.run(1.0)
        for data, _ in first:
            self.h.endpoint.datagramReceived(data, ("127.0.0.66", 6666))
        live = self.h.endpoint.session_of(self.device.device_number)
        self.assertEqual(live.session.remote_address, ("127.0.0.2", 40000))

    def test_key_rotation_ends_the_session(self):
        """Rotating a device's key retires its live session at once."""
        self.h.node(self.device)
        self.h.run(0.5)
        self.successResultOf(self.h.registry.rotate_key("dev"))
        self.assertIsNone(self.h.endpoint.session_of(self.device.device_number))

    def test_one_timer_for_all_sessions(self):
        """A hundred busy sessions share one reactor timer; idle ones need none."""
        nodes = []
        for i in range(100):
            device = self.h.provision(f"d{i}")
            node = self.h.node(device, address=("127.0.1.1", 20000 + i))
            node.report({"i": i}, self.h.clock.seconds())
            nodes.append(node)
        self.h.step()
        self.h.step()
        self.assertLessEqual(len(self.h.clock.getDelayedCalls()), 1)
        self.h.run(2.0)
        self.assertTrue(all(node.idle() for node in nodes))
        self.assertEqual(len(self.h.endpoint), 100)
        # Idle: only the presence wheel keeps a wake-up.
        self.assertLessEqual(len(self.h.endpoint.scheduler), 1)


class PresenceTests(SynchronousTestCase):
    """Connection facts: online, offline after silence, eviction and return."""

    def test_offline_after_silence_then_resume(self):
        """A silent device goes offline after offline_after; when it speaks again it resumes."""
        h = Harness(self, offline_after=30.0, device_heartbeat=10.0)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        self.assertTrue(h.registry.device("dev").online)
        address = h.address_of(node)
        del h.nodes[address]  # the device goes quiet (out of range)
        h.run(31.0, dt=0.5)
        self.assertFalse(h.registry.device("dev").online)
        self.assertIsNone(h.endpoint.session_of(device.device_number))  # evicted from memory
        h.nodes[address] = node
        node.report({"v": 2}, h.clock.seconds())
        h.run(2.0)
        self.assertEqual(h.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(h.endpoint.session_of(device.device_number).session_id, node.session_id)
        self.assertTrue(h.registry.device("dev").online)
        self.assertEqual(dict(h.registry.device("dev").reported), {"v": 2})


    def test_device_gone_with_a_command_on_its_way_leaves_memory(self):
        """A device that went silent before acknowledging a command leaves memory once
        offline (its record keeps the command); back, it gets the command once."""
        h = Harness(self, offline_after=30.0)
        device = h.provision("dev")
        commands = []
        node = h.node(device, on_command=commands.append)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        address = h.address_of(node)
        del h.nodes[address]  # gone before the command arrives
        self.assertTrue(self.successResultOf(h.endpoint.send_command(device.device_number,
                                                                     "reboot")))
        h.run(61.0, dt=0.5)
        self.assertFalse(h.registry.device("dev").online)
        self.assertIsNone(h.endpoint.entry_of(device.device_number))
        self.assertEqual(len(h.endpoint.scheduler), 0)
        self.assertEqual(commands, [])
        h.nodes[address] = node
        node.report({"v": 2}, h.clock.seconds())
        h.run(3.0)
        self.assertEqual(h.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(commands, ["reboot"])
        self.assertTrue(node.idle())
        h.run(30.0, dt=0.1)
        self.assertEqual(commands, ["reboot"])


class RestartTests(SynchronousTestCase):
    """wire.md 7 on a fake link: a new endpoint over the same store resumes sessions."""

    def test_restart_resumes_without_loss_or_doubles(self):
        """After a restart the session resumes: acked reports kept, events once, no new session."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        node.emit("e1", now=h.clock.seconds())
        h.run(1.0)
        session_id = node.session_id
        old_seq = h.endpoint.session_of(device.device_number).session.next_seq
        reserved = h.registry.session_record(device.device_number).seq_reservation
        h2 = h.restart()
        h2.nodes = h.nodes
        node.report({"v": 2}, h.clock.seconds())
        node.emit("e2", now=h.clock.seconds())
        h2.run(3.0)
        self.assertEqual(node.session_id, session_id)
        live = h2.endpoint.session_of(device.device_number)
        self.assertEqual(live.session_id, session_id)
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertGreater(reserved, old_seq)
        self.assertGreaterEqual(live.session.next_seq, reserved)
        view = h2.registry.device("dev")
        self.assertEqual(dict(view.reported), {"v": 2})
        events = [e for entry in view.history if entry[3] in ("reported", "events")
                  for e in (entry[4].get("events", ()) if hasattr(entry[4], "get") else entry[4])]
        self.assertEqual(list(events), ["e1", "e2"])
        self.assertTrue(node.idle())

    def test_restart_after_heartbeat_resumes(self):
        """A restart after heartbeats (acked, never written) still resumes the session."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        h.run(26.0, dt=0.05)  # a heartbeat acked above the durable state
        h2 = h.restart()
        h2.nodes = h.nodes
        node.report({"v": 2}, h.clock.seconds())
        h2.run(3.0)
        self.assertEqual(dict(h2.registry.device("dev").reported), {"v": 2})
        self.assertTrue(node.idle())
        self.assertEqual(node.sessions_started, 1)

    def test_old_session_replay_after_restart_is_ignored(self):
        """A datagram of a retired session replayed after a restart is dropped, not revived."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        first = node.datagrams(h.clock.seconds())
        for data, _ in first:
            h.endpoint.datagramReceived(data, h.address_of(node))
        node.start(h.clock.seconds())
        h.run(1.0)
        h2 = h.restart()
        for data, _ in first:
            h2.endpoint.datagramReceived(data, ("127.0.0.66", 6666))
        self.assertEqual(h2.endpoint.drops["old_session"], len(first))
        self.assertEqual(len(h2.endpoint), 0)
        self.assertEqual(h2.transport.written, [])


class LimitTests(SynchronousTestCase):
    """Abuse limits: rates, new sessions, the session cap, failure budgets."""

    def test_device_rate_limit(self):
        """Authentic datagrams beyond the per-device rate are dropped before the session sees them."""
        h = Harness(self, max_device_datagrams_per_second=3)
        device = h.provision("dev")
        node = h.node(device)
        h.run(0.1)
        address = h.address_of(node)
        now = h.clock.seconds()
        for i in range(10):
            node.report({"i": i}, now)
            for data, _ in node.session.datagrams_to_send(now + i * 0.03):
                h.endpoint.datagramReceived(data, address)
        self.assertGreater(h.endpoint.drops["device_rate_limited"], 0)

    def test_new_session_rate_limit(self):
        """New sessions beyond the global rate are refused within the same second."""
        h = Harness(self, max_new_sessions_per_second=1)
        nodes = [h.node(h.provision(f"d{i}"), address=("127.0.0.2", 40000 + i))
                 for i in range(3)]
        for node in nodes:
            node.report({"up": True}, h.clock.seconds())
        h.step(0.001)
        self.assertEqual(len(h.endpoint), 1)
        self.assertEqual(h.endpoint.drops["new_session_rate_limited"], 2)
        h.run(55.0, dt=0.1)  # the refused ones try again with their next heartbeats
        self.assertEqual(len(h.endpoint), 3)
        self.assertTrue(all(node.idle() for node in nodes))

    def test_session_cap(self):
        """Beyond max_sessions a new device's session is refused and counted."""
        h = Harness(self, max_sessions=1)
        h.node(h.provision("a"), address=("127.0.0.2", 1))
        h.node(h.provision("b"), address=("127.0.0.2", 2))
        h.run(0.5)
        self.assertEqual(len(h.endpoint), 1)
        self.assertGreater(h.endpoint.drops["session_cap"], 0)

    def test_forgery_flood_does_not_starve_the_device(self):
        """Forged datagrams for a live session from elsewhere are capped; the device is still served."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        h.run(0.5)
        live = h.endpoint.session_of(device.device_number)
        header = build_header(device.device_number, live.session_id)
        for _ in range(500):
            h.endpoint.datagramReceived(header + os.urandom(80), ("127.0.0.66", 6666))
        self.assertEqual(h.transport.written, [])
        self.assertGreater(h.endpoint.drops["rate_limited"], 400)
        self.assertLessEqual(h.endpoint.drops["auth_failed"], 10)
        node.report({"still": "here"}, h.clock.seconds())
        h.run(0.5)
        self.assertEqual(dict(h.registry.device("dev").reported), {"still": "here"})
        self.assertTrue(node.idle())


class ParkingTests(SynchronousTestCase):
    """Idle sessions are parked in a few bytes and rebuilt when needed."""

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")
        self.node = self.h.node(self.device)
        self.node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(3.0, dt=0.05)

    def entry(self):
        return self.h.endpoint.entry_of(self.device.device_number)

    def test_idle_session_is_parked_small(self):
        """After park_after idle seconds the session is a packed entry of a few bytes."""
        entry = self.entry()
        self.assertIsInstance(entry, Parked)
        self.assertLess(len(entry.data), 100)
        self.assertEqual(entry.session_id, self.node.session_id)
        self.assertEqual(len(self.h.endpoint._ciphers), 0)
        self.assertEqual(len(self.h.endpoint.scheduler), 1)  # only the presence wheel

    def test_unparked_session_keeps_its_rtt_estimate(self):
        """A parked session rebuilt keeps its SRTT and RTTVAR (float32 in the packed
        form), so its RTO is the one it had, not one from a first sample."""
        from broker.udp.park import park, unpark
        from broker.udp.sessions import LiveSession

        live = self.h.endpoint._table.wake(self.entry(), self.device.device_number,
                                           self.h.clock.seconds())
        rtt = live.session.rtt
        rtt.restore(0.040, 0.003)
        parked = park(live)
        self.assertIsNotNone(parked)
        back = unpark(parked, self.device.device_number, remote_state=live.reported,
                      ciphers=self.h.endpoint._ciphers, profile=self.h.endpoint._table.profile,
                      random_bytes=bytes, now=self.h.clock.seconds())
        self.assertIsInstance(back, LiveSession)
        self.assertAlmostEqual(back.session.rtt.srtt, 0.040, places=6)
        self.assertAlmostEqual(back.session.rtt.rttvar, 0.003, places=6)
        self.assertEqual(back.session.rtt.rto, rtt.rto)

    def test_heartbeat_wakes_and_is_answered(self):
        """A heartbeat to a parked session is authenticated, answered, and the session parks again."""
        acked = self.node.acknowledged
        self.h.run(26.0, dt=0.05)
        self.assertGreater(self.node.acknowledged, acked)
        self.assertGreaterEqual(self.h.endpoint.counters["sessions_unparked"], 1)
        self.assertIsInstance(self.entry(), Parked)
        self.assertEqual(self.node.sessions_started, 1)

    def test_report_to_parked_session(self):
        """A report to a parked session is made durable and acknowledged in the same session."""
        self.node.report({"v": 2}, self.h.clock.seconds())
        self.node.emit("e", now=self.h.clock.seconds())
        self.h.run(1.0)
        view = self.h.registry.device("dev")
        self.assertEqual(dict(view.reported), {"v": 2})
        self.assertTrue(self.node.idle())
        self.assertEqual(self.h.endpoint.counters["sessions_resumed"], 0)

    def test_desired_change_reaches_parked_device(self):
        """A desired change wakes the parked session and reaches the device."""
        self.successResultOf(self.h.registry.update_desired("dev", {"led": "off"}))
        self.h.run(1.0)
        self.assertEqual(self.node.desired, {"led": "off"})

    def test_forgery_and_replay_leave_parked_session_alone(self):
        """Forged or replayed datagrams neither wake a parked session nor get a reply."""
        parked = self.entry()
        header = build_header(self.device.device_number, self.node.session_id)
        self.h.endpoint.datagramReceived(header + os.urandom(70), ("127.0.0.66", 6666))
        self.assertIs(self.entry(), parked)
        self.assertEqual(self.h.transport.written, [])
        self.assertEqual(self.h.endpoint.drops["auth_failed"], 1)

    def test_spoofed_flood_at_a_parked_session_does_not_rebuild_it(self):
        """Forgeries and replays from the parked session's own address are refused
        before the session is rebuilt or a cipher cached, opened only within the
        device's failure budget; the device is still answered."""
        parked = self.entry()
        address = self.h.address_of(self.node)
        captured = []
        receive = self.h.endpoint.datagramReceived
        self.h.endpoint.datagramReceived = lambda data, addr: (captured.append(data),
                                                              receive(data, addr))
        self.node.report({"v": 2}, self.h.clock.seconds())
        self.h.run(2.0)
        del self.h.endpoint.datagramReceived
        parked = self.entry()
        self.assertIsInstance(parked, Parked)
        woken = []
        wake = self.h.endpoint.table.wake
        self.h.endpoint.table.wake = lambda *args: woken.append(args) or wake(*args)
        header = build_header(self.device.device_number, self.node.session_id)
        for _ in range(100):
            self.h.endpoint.datagramReceived(header + os.urandom(70), address)
            self.h.endpoint.datagramReceived(captured[0], address)
        self.assertEqual(woken, [])
        self.assertIs(self.entry(), parked)
        self.assertEqual(len(self.h.endpoint._ciphers), 0)
        drops = self.h.endpoint.drops
        budget = self.h.settings.auth_failure_budget
        self.assertEqual(drops["auth_failed"] + drops["replay"], budget)
        self.assertEqual(drops["rate_limited"], 200 - budget)
        self.assertEqual(self.h.transport.written, [])
        acked = self.node.acknowledged
        self.h.run(26.0, dt=0.05)   # the device's next heartbeat is answered
        self.assertGreater(self.node.acknowledged, acked)
        self.assertEqual(len(woken), 1)

    def test_parked_device_goes_offline_and_is_evicted(self):
        """A parked device silent for offline_after goes offline and leaves memory; it resumes later."""
        address = self.h.address_of(self.node)
        del self.h.nodes[address]
        self.h.run(80.0, dt=0.5)
        self.assertFalse(self.h.registry.device("dev").online)
        self.assertIsNone(self.entry())
        self.h.nodes[address] = self.node
        self.node.report({"v": 3}, self.h.clock.seconds())
        self.h.run(1.0)
        self.assertEqual(dict(self.h.registry.device("dev").reported), {"v": 3})
        self.assertTrue(self.h.registry.device("dev").online)


class BrokerHeartbeatTests(SynchronousTestCase):
    """[ssp] broker_heartbeats: the broker's own empty acks to a device that sends nothing."""

    def connected(self, **settings):
        """A harness and a device whose report was acknowledged, then the device's address."""
        h = Harness(self, **settings)  # the nodes' heartbeat: device_heartbeat (25 s)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(3.0, dt=0.05)
        self.assertTrue(node.idle())
        return h, device, node, h.address_of(node)

    def silent_for(self, h, address, seconds):
        """Datagrams the broker sent to ``address`` while the device there sent nothing."""
        node = h.nodes.pop(address)
        before = h.transport.sent[address]
        h.run(seconds, dt=0.25)
        h.nodes[address] = node
        return h.transport.sent[address] - before

    def test_off_sends_nothing_to_an_idle_device(self):
        """With broker_heartbeats off an idle device gets nothing from the broker (it is parked)."""
        h, device, _, address = self.connected(broker_heartbeats=False)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), Parked)
        self.assertEqual(self.silent_for(h, address, 60.0), 0)

    def test_on_sends_a_heartbeat_each_interval(self):
        """With broker_heartbeats on a silent device gets one empty ack every device_heartbeat
        seconds (its session keeps a timer, so it is not parked), until offline_after."""
        h, device, _, address = self.connected(broker_heartbeats=True)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), LiveSession)
        self.assertEqual(self.silent_for(h, address, 60.0), 2)
        self.assertEqual(self.silent_for(h, address, 15.0), 0)
        self.assertEqual(self.silent_for(h, address, 30.0), 0)  # detached after offline_after

    def test_on_reaches_a_session_that_was_parked(self):
        """A session parked before broker_heartbeats was switched on (reload) is rebuilt
        with it by the device's next datagram, and heartbeats from then on."""
        import dataclasses
        h, device, node, address = self.connected(broker_heartbeats=False)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), Parked)
        h.endpoint.reconfigure(dataclasses.replace(h.settings, broker_heartbeats=True))
        unparked = h.endpoint.counters["sessions_unparked"]
        h.run(26.0, dt=0.05)  # the device's heartbeat wakes the parked session
        self.assertGreater(h.endpoint.counters["sessions_unparked"], unparked)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), LiveSession)
        self.assertEqual(self.silent_for(h, address, 60.0), 2)
        self.assertEqual(node.sessions_started, 1)


class ReconfigureTests(SynchronousTestCase):
    """SIGHUP: new limits and timings without a restart."""

    def test_new_limits_apply_at_once(self):
        """After reconfigure() a lower session cap refuses the next new device."""
        import dataclasses
        h = Harness(self)
        h.node(h.provision("a"), address=("127.0.0.2", 1))
        h.run(0.2)
        h.endpoint.reconfigure(dataclasses.replace(h.settings, max_sessions=1,
                                                   offline_after=99.0))
        h.node(h.provision("b"), address=("127.0.0.2", 2))
        h.run(0.2)
        self.assertEqual(len(h.endpoint), 1)
        self.assertGreater(h.endpoint.drops["session_cap"], 0)
        self.assertEqual(h.endpoint.table.presence.offline_after, 99.0)
        self.assertEqual(h.endpoint.table.profile.offline_after, 99.0)

    def test_pending_desired_of_a_silent_device(self):
        """Desired values a gone device never acknowledged stay with its live session until
        it goes offline, then with the registry; either way they reach it when it is back."""
        h = Harness(self, offline_after=30.0, device_heartbeat=10.0)
        device = h.provision("dev")
        node = h.node(device)
        h.run(1.0)
        address = h.address_of(node)
        del h.nodes[address]
        self.successResultOf(h.registry.update_desired("dev", {"led": "blink"}))
        h.run(20.0, dt=0.1)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), LiveSession)
        h.run(15.0, dt=0.1)
        self.assertIsNone(h.endpoint.entry_of(device.device_number))  # offline, evicted
        h.nodes[address] = node
        node.report({"back": True}, h.clock.seconds())
        h.run(1.0)
        self.assertEqual(node.desired, {"led": "blink"})


class ConfiguredSettingsTests(SynchronousTestCase):
    """park_after, auth_failure_budget and facts_interval come from the [ssp] settings."""

    def test_park_after_is_the_configured_one(self):
        """With park_after 5 s an idle session stays live for 3 s and is parked after 6 s."""
        h = Harness(self, park_after=5.0)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(3.0, dt=0.05)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), LiveSession)
        h.run(3.0, dt=0.05)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), Parked)

    def test_auth_failure_budget_is_the_configured_one(self):
        """With a budget of 2 only two forgeries from a stranger's address are opened per second."""
        h = Harness(self, auth_failure_budget=2)
        device = h.provision("dev")
        h.node(device)
        h.run(0.5)
        live = h.endpoint.session_of(device.device_number)
        header = build_header(device.device_number, live.session_id)
        for _ in range(50):
            h.endpoint.datagramReceived(header + os.urandom(80), ("127.0.0.66", 6666))
        self.assertEqual(h.endpoint.drops["auth_failed"], 2)
        self.assertEqual(h.endpoint.drops["rate_limited"], 48)

    def facts_refreshes(self, facts_interval):
        h = Harness(self, facts_interval=facts_interval, park_after=60.0)
        device = h.provision("dev")
        node = h.node(device)
        calls = []
        connection = h.endpoint.bridge.connection

        def counted(live, **facts):
            calls.append(facts)
            return connection(live, **facts)
        h.endpoint.bridge.connection = counted
        for i in range(8):
            node.report({"i": i}, h.clock.seconds())
            h.run(0.55)
        return calls

    def test_facts_interval_is_the_configured_one(self):
        """Connection facts of a busy device are refreshed every facts_interval, not more often."""
        often, rarely = self.facts_refreshes(0.5), self.facts_refreshes(10.0)
        self.assertGreaterEqual(len(often), 7)
        self.assertEqual(len(rarely), 1)  # going online, with its first address

    def test_reload_applies_new_timings(self):
        """reconfigure() gives the table the new park_after and facts_interval and the new budget."""
        import dataclasses
        h = Harness(self)
        h.endpoint.reconfigure(dataclasses.replace(h.settings, park_after=7.0,
                                                   facts_interval=4.0, auth_failure_budget=3))
        self.assertEqual(h.endpoint.table.park_after, 7.0)
        self.assertEqual(h.endpoint.table.facts_interval, 4.0)
        self.assertEqual(h.endpoint.admission.failures.limit, 3)


class SessionFiguresTests(SynchronousTestCase):
    """The RTT and retransmission figures of docs/operations.md are fed."""

    def test_retransmissions_counted(self):
        """A command the device never acknowledges is sent again, each resend counted, and
        the resends back off (each waits twice the RTO of the one before)."""
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        h.run(1.0)
        self.assertEqual(h.endpoint.counters["retransmissions"], 0)
        del h.nodes[h.address_of(node)]  # the broker's datagrams are lost from now on
        h.endpoint.send_command(device.device_number, "reboot")
        counts = []
        for _ in range(8):
            h.run(1.0)
            counts.append(h.endpoint.counters["retransmissions"])
        self.assertGreaterEqual(counts[-1], 3)
        # Without the backoff the count would grow by the same step each second.
        self.assertLess(counts[-1] - counts[3], counts[3])

    def test_rtt_sampled_once_measured(self):
        """Facts refreshes after the first RTT sample leave the smoothed RTT for the histogram."""
        h = Harness(self, facts_interval=0.5, park_after=60.0)
        device = h.provision("dev")
        node = h.node(device)
        samples = h.endpoint.table.rtt_samples
        self.assertEqual(samples, [])
        for i in range(6):
            node.report({"i": i}, h.clock.seconds())
            h.run(0.5)
        self.assertGreaterEqual(len(samples), 3)
        # Measured on a loopback-fast fake link (the unmeasured default is 1 s).
        self.assertTrue(all(0 <= srtt < 1.0 for srtt in samples), samples)
        rtt = h.endpoint.session_of(device.device_number).session.rtt
        self.assertTrue(rtt.hit)
        self.assertIn(rtt.srtt, samples)


class AssemblyCapTests(SynchronousTestCase):
    """An authentic device cannot make the broker hold a megabyte of fragments."""

    def fragment(self, device, seq, number, final=False):
        word = number | (0x8000 if final else 0)
        payload = (7).to_bytes(8, "big") + word.to_bytes(2, "big") + b"\x55" * 1000
        return authentic(device, 5, seq, payload)

    def test_broker_sessions_have_the_small_cap(self):
        """The endpoint's sessions hold at most MAX_ASSEMBLY_BYTES, also after parking."""
        from broker.udp.endpoint import MAX_ASSEMBLY_BYTES
        h = Harness(self)
        device = h.provision("dev")
        node = h.node(device)
        node.report({"v": 1}, h.clock.seconds())
        h.run(3.0, dt=0.05)
        self.assertIsInstance(h.endpoint.entry_of(device.device_number), Parked)
        live = h.endpoint.session_of(device.device_number)  # unparked
        self.assertEqual(live.session.max_assembly_bytes, MAX_ASSEMBLY_BYTES)
        self.assertLess(MAX_ASSEMBLY_BYTES, 1 << 20)

    def test_oversized_instruction_dropped(self):
        """Fragments past the cap are dropped as too_large and the partial assembly is freed."""
        from broker.udp.endpoint import MAX_ASSEMBLY_BYTES
        h = Harness(self, max_device_datagrams_per_second=1000)
        device = h.provision("dev")
        address = ("127.0.0.9", 1)
        fits = MAX_ASSEMBLY_BYTES // 1000
        for seq in range(fits):
            h.endpoint.datagramReceived(self.fragment(device, seq, seq), address)
        session = h.endpoint.session_of(device.device_number).session
        self.assertEqual(h.endpoint.drops["too_large"], 0)
        self.assertEqual(session._assembly.pending_bytes, fits * 1000)
        h.endpoint.datagramReceived(self.fragment(device, fits, fits), address)
        self.assertEqual(h.endpoint.drops["too_large"], 1)
        self.assertIsNone(session._assembly)
        self.assertIs(h.endpoint.session_of(device.device_number).session, session)


class _FailingStates(MemoryStore):
    """A memory store whose next ``fail`` batched state writes fail (a store blip;
    ``fail`` None: every one, a full disk).

    It keeps the SQLite store's promise after a failure (sqlite_retry.py): a
    failed device's state commits with its next session record, which fails
    with it.
    """

    def __init__(self, fail=None):
        super().__init__()
        self.fail = fail
        self.unsaved = {}

    def write_states(self, devs, result=None):
        if self.fail is None or self.fail:
            if self.fail:
                self.fail -= 1
            self.unsaved.update((dev.number, dev) for dev in devs)
            return defer.fail(StoreError("blip" if self.fail is not None else "disk full"))
        for dev in devs:
            self.unsaved.pop(dev.number, None)
        return super().write_states(devs, result)

    def write_sessions(self, numbers, records, result=None):
        states = [self.unsaved.pop(n) for n in numbers if n in self.unsaved]
        if states:
            failed = []
            self.write_states(states).addErrback(failed.append)
            if failed:
                return defer.fail(failed[0])
        return super().write_sessions(numbers, records, result)


class ReportBatchTests(SynchronousTestCase):
    """Reports are gathered per reactor turn: one registry write per turn and device."""

    def setUp(self):
        self.h = Harness(self)

    def deliver(self, node, now):
        for data, _ in node.datagrams(now):
            self.h.endpoint.datagramReceived(data, self.h.address_of(node))

    def connected(self, name, address):
        node = self.h.node(self.h.provision(name), address=address)
        self.h.run(0.5)
        self.assertTrue(node.idle())
        return node

    def test_reports_of_one_turn_share_one_registry_call(self):
        """Two devices' reports received in one turn reach the registry in one batched call, at its end."""
        a = self.connected("a", ("127.0.0.2", 40000))
        b = self.connected("b", ("127.0.0.3", 40000))
        registry = self.h.registry
        calls = []
        many = registry.update_reported_many
        registry.update_reported_many = lambda updates: (calls.append(list(updates)),
                                                         many(updates))[1]
        now = self.h.clock.seconds()
        a.report({"t": 1}, now)
        b.report({"t": 2}, now)
        self.deliver(a, now + 0.05)
        self.deliver(b, now + 0.05)
        self.assertEqual(dict(registry.device("a").reported), {})
        self.h.clock.advance(0)
        self.assertEqual(len(calls), 1)
        self.assertEqual(len(calls[0]), 2)
        self.assertEqual(dict(registry.device("a").reported), {"t": 1})
        self.assertEqual(dict(registry.device("b").reported), {"t": 2})
        self.h.run(1.0)
        self.assertTrue(a.idle() and b.idle())

    def test_states_of_one_device_in_one_turn_written_once(self):
        """Two states of one device in one turn are one registry update; both count, events once."""
        node = self.connected("dev", ("127.0.0.2", 40000))
        endpoint = self.h.endpoint
        writes = endpoint.counters["registry_writes"]
        durable = endpoint.counters["updates_durable"]
        now = self.h.clock.seconds()
        node.report({"v": 1}, now)
        node.emit("e1", now=now)
        self.deliver(node, now + 0.05)
        node.report({"v": 2}, now + 0.05)
        node.emit("e2", now=now + 0.05)
        self.deliver(node, now + 0.2)
        self.h.clock.advance(0)
        self.assertEqual(endpoint.counters["registry_writes"] - writes, 1)
        self.assertEqual(endpoint.counters["updates_durable"] - durable, 2)
        view = self.h.registry.device("dev")
        self.assertEqual(dict(view.reported), {"v": 2})
        events = [e for entry in view.history if entry[3] in ("reported", "events")
                  for e in (entry[4].get("events", ()) if hasattr(entry[4], "get") else entry[4])]
        self.assertEqual(list(events), ["e1", "e2"])
        self.h.run(1.0)
        self.assertTrue(node.idle())

    def test_report_of_a_session_retired_before_the_turn_ends_is_not_written(self):
        """A report whose session was retired in the same turn writes neither state nor record."""
        node = self.connected("dev", ("127.0.0.2", 40000))
        number = node.device_number
        live = self.h.endpoint.session_of(number)
        record = self.h.registry.session_record(number)
        now = self.h.clock.seconds()
        node.report({"v": 9}, now)
        self.deliver(node, now + 0.05)
        self.assertGreater(live.pending_num, 0)
        self.h.endpoint.key_changed(number)
        self.h.clock.advance(0)
        self.assertEqual(dict(self.h.registry.device("dev").reported), {})
        self.assertEqual(self.h.registry.session_record(number), record)
        self.assertEqual(live.writes, 0)

    def test_record_of_a_device_unknown_to_the_registry_acknowledges_only_the_others(self):
        """A report whose record the registry refuses (device removed, the endpoint not yet
        told) stays unacknowledged and counts as a store failure; another report of the
        same turn is acknowledged."""
        a = self.connected("a", ("127.0.0.2", 40000))
        b = self.connected("b", ("127.0.0.3", 40000))
        endpoint = self.h.endpoint
        endpoint.bridge.stop()       # the removal below does not reach the endpoint
        self.successResultOf(self.h.registry.remove_device("b"))
        acked_a, acked_b = a.acknowledged, b.acknowledged
        failures = endpoint.counters["store_failures"]
        now = self.h.clock.seconds()
        a.report({"v": 1}, now)
        b.report({"v": 2}, now)
        self.deliver(a, now + 0.05)
        self.deliver(b, now + 0.05)
        self.h.run(1.0)
        self.assertGreater(a.acknowledged, acked_a)
        self.assertTrue(a.idle())
        self.assertEqual(b.acknowledged, acked_b)
        self.assertGreaterEqual(endpoint.counters["store_failures"] - failures, 1)
        self.assertTrue(self.flushLoggedErrors(UnknownDevice))

    def test_failed_batch_acknowledges_nothing(self):
        """When the store fails the batched reports, their records do not confirm them: no ack."""
        self.h = Harness(self, store=_FailingStates())
        node = self.connected("dev", ("127.0.0.2", 40000))
        acked = node.acknowledged
        node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(2.0)
        self.assertEqual(node.acknowledged, acked)
        self.assertFalse(node.idle())
        self.assertGreaterEqual(self.h.endpoint.counters["store_failures"], 1)
        self.assertEqual(self.flushLoggedErrors(StoreError), [])   # no traceback per device (store_outage_log.py)

    def test_report_lost_to_a_store_blip_is_acknowledged_in_its_session(self):
        """A report whose write failed once is written again with the device's next
        datagram and acknowledged in the same session, with broker heartbeats too
        (before, it stayed unacknowledged until the device started a new session)."""
        store = _FailingStates(fail=0)
        self.h = Harness(self, store=store, broker_heartbeats=True)
        node = self.connected("dev", ("127.0.0.2", 40000))
        first = node.session_id
        store.fail = 1
        acked = node.acknowledged
        node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(5.0, dt=0.05)
        self.assertEqual(self.h.endpoint.counters["store_failures"], 1)
        self.assertGreater(node.acknowledged, acked)
        self.assertTrue(node.idle())
        self.assertEqual(node.session_id, first)
        self.assertEqual(dict(self.h.restart().registry.device("dev").reported), {"v": 1})
        self.assertEqual(self.flushLoggedErrors(StoreError), [])   # no traceback per device (store_outage_log.py)

    def test_report_unsaved_while_the_store_fails_is_never_acknowledged(self):
        """While every state write fails, the retries fail with them: nothing is
        acknowledged, the session is never parked, and each retry waits for the
        device's own datagrams (one write on its way at most)."""
        store = _FailingStates(fail=0)
        self.h = Harness(self, store=store)
        node = self.connected("dev", ("127.0.0.2", 40000))
        self.h.run(2.0, dt=0.05)    # parked while idle
        acked = node.acknowledged
        counters = self.h.endpoint.counters
        parked, received = counters["sessions_parked"], counters["datagrams_in"]
        store.fail = None
        node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(20.0, dt=0.05)
        self.assertEqual(self.flushLoggedErrors(StoreError), [])   # no traceback per device (store_outage_log.py)
        self.assertEqual(node.acknowledged, acked)
        self.assertFalse(node.idle())
        self.assertGreater(counters["store_failures"], 1)
        self.assertLessEqual(counters["store_failures"], counters["datagrams_in"] - received)
        self.assertEqual(counters["sessions_parked"], parked)

    def test_event_whose_write_failed_once_is_stored_once(self):
        """An event whose batched write failed once is in the store once: the registry
        keeps a failed write's changes and writes them again, so the device must not
        send it again in a new session: the report is written again with the
        device's next datagram and acknowledged once durable."""
        store = _FailingStates(fail=0)
        self.h = Harness(self, store=store)
        node = self.connected("dev", ("127.0.0.2", 40000))
        store.fail = 1
        node.emit("e1", now=self.h.clock.seconds())
        self.h.run(120.0, dt=0.05)
        self.assertEqual(self.flushLoggedErrors(StoreError), [])   # no traceback per device (store_outage_log.py)
        self.assertTrue(node.idle())
        restarted = self.h.restart()
        view = restarted.registry.device("dev")
        events = [e for entry in view.history if entry[3] in ("reported", "events")
                  for e in (entry[4].get("events", ()) if hasattr(entry[4], "get") else entry[4])]
        self.assertEqual(events, ["e1"])

