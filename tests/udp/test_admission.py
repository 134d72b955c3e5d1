"""Tests for broker.udp.admission: what a datagram may cost before it authenticated.

The budgets alone, and the endpoint using them on a task.Clock with sans-IO
nodes (tests/udp/helpers.py): no sockets, no sleeps.
"""

import dataclasses
import gc
import math
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from twisted.trial.unittest import SynchronousTestCase

from broker.config import SSPSettings
from broker.ssp.crypto import TO_CLIENT, TO_SERVER, seal
from broker.ssp.errors import DropReason
from broker.ssp.framing import build_header
from broker.ssp.keys import derive_session_key
from broker.udp.admission import (AUTH_ATTEMPTS_PER_NEW_SESSION, NEW_SESSIONS_PER_DEVICE,
                                  Admission, auth_attempts_per_second, first_datagram_fails)

from .helpers import Harness

#: A session id above any a node of the harness picks (forgeries are attempts, not old sessions).
FORGED_IDS = 1 << 63


def forge(endpoint, numbers, count, hosts, first_id=FORGED_IDS):
    """Feed ``count`` forged first datagrams naming ``numbers`` in turn, from ``hosts`` in turn."""
    for i in range(count):
        header = build_header(numbers[i % len(numbers)], first_id + i)
        endpoint.datagramReceived(header + os.urandom(60), (hosts[i % len(hosts)], 20000 + i))


class AdmissionTests(SynchronousTestCase):
    """The budgets on their own, time as an argument."""

    def test_stranger_budgets(self):
        """A host or (for a device with a session) a device past its failure budget gets
        no decryption; the rest is bounded by the attempts bucket."""
        now = 10.5
        admission = Admission(SSPSettings(auth_failure_budget=2, max_new_sessions_per_second=1),
                              now=now)
        self.assertTrue(admission.stranger(7, "192.0.2.1", now))
        admission.failed(7, "192.0.2.1", now)
        admission.failed(7, "192.0.2.1", now)
        self.assertFalse(admission.stranger(8, "192.0.2.1", now))   # the host is spent
        self.assertFalse(admission.stranger(7, "192.0.2.2", now))   # the device is spent
        self.assertTrue(admission.stranger(7, "192.0.2.2", now, per_device=False))
        admission.failed(9, None, now)  # from the session's own address: no host charged
        admission.failed(9, "192.0.2.3", now, per_device=False)
        self.assertEqual(len(admission.host_failures), 2)
        self.assertEqual(len(admission.failures), 2)
        granted = sum(admission.stranger(5, f"198.51.100.{i}", now) for i in range(50))
        self.assertEqual(granted, AUTH_ATTEMPTS_PER_NEW_SESSION - 2)  # 10 a second, 2 used
        self.assertTrue(admission.stranger(8, "192.0.2.1", now + 1))  # a new second

    def test_attempts_rate_from_settings(self):
        """With max_auth_attempts_per_second 0 (the default) the attempts rate is a
        multiple of the new-session rate; set, it is the rate."""
        self.assertEqual(auth_attempts_per_second(SSPSettings(max_new_sessions_per_second=3)),
                         3 * AUTH_ATTEMPTS_PER_NEW_SESSION)
        own = SSPSettings(max_new_sessions_per_second=3, max_auth_attempts_per_second=70)
        self.assertEqual(auth_attempts_per_second(own), 70)

    def test_per_device_new_session_rate_from_settings(self):
        """The per-device new-session limit is a setting (issue: limits on new-session
        attempts are configurable), by default NEW_SESSIONS_PER_DEVICE."""
        settings = SSPSettings(max_device_new_sessions_per_second=5)
        self.assertEqual(Admission(settings, now=0.0).device_sessions.limit, 5)
        self.assertEqual(Admission(SSPSettings(), now=0.0).device_sessions.limit,
                         NEW_SESSIONS_PER_DEVICE)

    def test_first_datagram_check(self):
        """An authentic first datagram passes; a tampered one or the broker's own direction fails."""
        secret = bytes(range(16))
        cipher = AESOCB3(derive_session_key(secret, 42, 9))
        header = build_header(42, 9)
        good = seal(cipher, TO_SERVER, 0, b"\x00" * 20, header)
        self.assertIsNone(first_datagram_fails(secret, 42, 9, good))
        bad = good[:-1] + bytes([good[-1] ^ 1])
        self.assertIs(first_datagram_fails(secret, 42, 9, bad), DropReason.AUTH_FAILED)
        reflected = seal(cipher, TO_CLIENT, 0, b"\x00" * 20, header)
        self.assertIs(first_datagram_fails(secret, 42, 9, reflected), DropReason.WRONG_DIRECTION)
        self.assertIs(first_datagram_fails(secret, 42, 10, good), DropReason.AUTH_FAILED)


class GlobalRateTests(SynchronousTestCase):
    """max_datagrams_per_second: every datagram of the port, before any crypto work."""

    def test_datagrams_over_the_rate_cost_no_decryption(self):
        """Past the port's rate datagrams are dropped as global_rate_limited without a
        decryption; an authentic device is refused alike until the bucket refills."""
        h = Harness(self, max_datagrams_per_second=10)
        device = h.provision("dev")
        hosts = [f"127.0.1.{i}" for i in range(1, 31)]  # one each: no host budget in the way
        forge(h.endpoint, [device.device_number], 30, hosts)
        self.assertEqual(h.endpoint.drops["auth_failed"], 10)
        self.assertEqual(h.endpoint.drops["global_rate_limited"], 20)
        node = h.node(device)
        h.step(0.001)
        self.assertEqual(h.endpoint.drops["global_rate_limited"], 21)
        self.assertEqual(len(h.endpoint), 0)
        self.assertEqual(h.transport.written, [])
        h.clock.advance(1.0)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        self.assertEqual(dict(h.registry.device("dev").reported), {"v": 1})
        self.assertTrue(node.idle())

    def test_garbage_naming_no_device_does_not_use_up_the_rate(self):
        """A flood of datagrams naming no device, far over the port's rate, is dropped
        before the rate is charged: a device's session is served all along."""
        h = Harness(self, max_datagrams_per_second=10)
        device = h.provision("dev")
        node = h.node(device)
        h.run(1.0)
        acked = node.acknowledged
        for second in range(3):
            for i in range(1000):
                h.endpoint.datagramReceived(build_header(1000 + i, 5) + os.urandom(60),
                                            ("127.0.3.1", 9000 + i))
            node.report({"v": second}, h.clock.seconds())
            h.run(1.0)
        self.assertEqual(h.endpoint.drops["unknown_device"], 3000)
        self.assertEqual(h.endpoint.drops["global_rate_limited"], 0)
        self.assertEqual(dict(h.registry.device("dev").reported), {"v": 2})
        self.assertEqual(node.acknowledged, acked + 3)

    def test_forgeries_from_strangers_use_the_rate_only_within_their_budget(self):
        """Forged datagrams naming a device from other hosts charge the port's rate only
        as far as the authentication budgets let them through: the device's own
        datagrams still find the rate free."""
        h = Harness(self, max_datagrams_per_second=30, max_auth_attempts_per_second=5)
        device = h.provision("dev")
        node = h.node(device)
        h.run(1.0)
        hosts = [f"127.0.4.{i}" for i in range(1, 200)]
        for second in range(3):
            forge(h.endpoint, [device.device_number], 500, hosts,
                  first_id=FORGED_IDS + second * 1000)
            node.report({"v": second}, h.clock.seconds())
            h.run(1.0)
        self.assertEqual(h.endpoint.drops["global_rate_limited"], 0)
        self.assertGreater(h.endpoint.drops["rate_limited"], 1400)
        self.assertEqual(dict(h.registry.device("dev").reported), {"v": 2})
        self.assertTrue(node.idle())

    def test_rate_is_steady_not_per_burst(self):
        """At twice the rate for three seconds, about half the datagrams pass each second."""
        h = Harness(self, max_datagrams_per_second=50)
        device = h.provision("dev")
        passed = []
        for second in range(3):
            before = h.endpoint.drops["global_rate_limited"]
            for i in range(100):
                forge(h.endpoint, [device.device_number], 1, [f"10.{second}.0.{i}"],
                      first_id=FORGED_IDS + second * 100 + i)
                h.clock.advance(0.01)
            passed.append(100 - (h.endpoint.drops["global_rate_limited"] - before))
        # The first second spends the saved burst as well, then the rate holds.
        self.assertEqual(passed, [99, 50, 50])

    def test_dropped_datagrams_leave_nothing_behind(self):
        """Ten thousand datagrams over the rate leave no allocation behind, only a counter."""
        h = Harness(self, max_datagrams_per_second=1)
        device = h.provision("dev")
        data = build_header(device.device_number, FORGED_IDS) + os.urandom(60)
        address = ("127.0.0.66", 6666)
        receive = h.endpoint.datagramReceived
        for _ in range(10):
            receive(data, address)
        gc.collect()
        gc.disable()
        try:
            before = sys.getallocatedblocks()
            for _ in range(10_000):
                receive(data, address)
            grown = sys.getallocatedblocks() - before
        finally:
            gc.enable()
        self.assertEqual(h.endpoint.drops["global_rate_limited"], 10_009)
        self.assertLess(grown, 50)

    def test_reload_sets_the_new_rate(self):
        """reconfigure() applies a new max_datagrams_per_second at once."""
        h = Harness(self, max_datagrams_per_second=5)
        h.endpoint.reconfigure(dataclasses.replace(h.settings, max_datagrams_per_second=7))
        device = h.provision("dev")
        forge(h.endpoint, [device.device_number], 10, [f"127.0.2.{i}" for i in range(10)])
        self.assertEqual(h.endpoint.drops["global_rate_limited"], 3)


class FloodTests(SynchronousTestCase):
    """Forged first datagrams cannot starve genuine new and resumed sessions."""

    def test_forged_first_datagrams_do_not_starve_new_or_resumed_sessions(self):
        """During a flood of forged first datagrams naming known devices (them included),
        a device starting a session and one resuming after a restart are served at once,
        and no datagram goes to a forger."""
        h = Harness(self, max_new_sessions_per_second=5)
        resumer, starter = h.provision("resumer"), h.provision("starter")
        other = h.provision("other").device_number
        rnode = h.node(resumer, address=("127.0.0.2", 40001))
        rnode.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        h2 = h.restart()  # as after kill -9: nothing of the session in memory
        h2.nodes = h.nodes
        now = h2.clock.seconds()
        h2.clock.advance(math.floor(now) + 1.1 - now)  # all of the flood in one second
        # Most forgeries name the two real devices: more than their failure budgets.
        numbers = [resumer.device_number, starter.device_number, other]
        hosts = [f"127.0.0.{66 + i}" for i in range(4)]
        endpoint = h2.endpoint
        forge(endpoint, numbers, 1000, hosts)
        snode = h2.node(starter, address=("127.0.0.3", 40002))
        rnode.report({"v": 2}, h2.clock.seconds())
        for step in range(20):  # both real first datagrams arrive amid the flood
            h2.step(0.005)
            forge(endpoint, numbers, 50, hosts, first_id=FORGED_IDS + 1000 + 50 * step)
        self.assertEqual(endpoint.session_of(starter.device_number).session_id, snode.session_id)
        self.assertEqual(endpoint.session_of(resumer.device_number).session_id, rnode.session_id)
        h2.run(1.0)
        self.assertEqual(endpoint.counters["sessions_started"], 1)
        self.assertEqual(endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(dict(h2.registry.device("resumer").reported), {"v": 2})
        self.assertTrue(rnode.idle() and snode.idle())
        self.assertEqual(rnode.sessions_started, 1)
        self.assertEqual(set(h2.transport.sent), {("127.0.0.2", 40001), ("127.0.0.3", 40002)})
        # Decryptions spent on the flood: the four hosts' failure budgets, no more.
        self.assertLessEqual(endpoint.drops["auth_failed"], 4 * h2.settings.auth_failure_budget)
        self.assertEqual(endpoint.drops["rate_limited"], 2000 - endpoint.drops["auth_failed"])
        self.assertEqual(endpoint.drops["new_session_rate_limited"], 0)
        self.assertLessEqual(len(endpoint._ciphers), 2)  # none built for a forgery stays

    def test_decryptions_under_a_many_host_flood_are_bounded(self):
        """Forgeries from as many hosts as datagrams cost at most the attempts rate in
        decryptions a second, start nothing and get no reply."""
        h = Harness(self, max_new_sessions_per_second=2)
        numbers = [h.provision(f"d{i}").device_number for i in range(3)]
        attempts = 2 * AUTH_ATTEMPTS_PER_NEW_SESSION
        for second in range(2):
            hosts = [f"127.{second + 1}.{i // 250}.{i % 250}" for i in range(500)]
            forge(h.endpoint, numbers, 500, hosts, first_id=FORGED_IDS + 500 * second)
            self.assertEqual(h.endpoint.drops["auth_failed"], attempts * (second + 1))
            h.clock.advance(1.0)
        self.assertEqual(h.endpoint.drops["rate_limited"], 1000 - 2 * attempts)
        self.assertEqual(len(h.endpoint), 0)
        self.assertEqual(len(h.endpoint._ciphers), 0)
        self.assertEqual(h.transport.sent, {})
        for number in numbers:
            self.assertIsNone(h.registry.session_record(number))

    def test_a_replayed_datagram_from_one_host_does_not_starve_new_sessions(self):
        """A captured datagram of a device replayed from one host many times a second
        costs that host's failure budget only: a new device is still served at once."""
        h = Harness(self, max_new_sessions_per_second=2)
        device, newcomer = h.provision("dev"), h.provision("newcomer")
        node = h.node(device, address=("127.0.0.2", 40001))
        node.report({"v": 1}, h.clock.seconds())
        captured = node.datagrams(h.clock.seconds())
        for data, _ in captured:
            h.endpoint.datagramReceived(data, ("127.0.0.2", 40001))
        h.run(2.0)
        now = h.clock.seconds()
        h.clock.advance(math.floor(now) + 1.1 - now)  # the replays and the newcomer in one second
        for i in range(200):
            h.endpoint.datagramReceived(captured[0][0], ("127.0.0.66", 30000 + i))
        self.assertGreaterEqual(h.endpoint.drops["rate_limited"],
                                200 - h.settings.auth_failure_budget)
        h.node(newcomer, address=("127.0.0.3", 40002))
        h.step(0.01)
        self.assertIsNotNone(h.endpoint.entry_of(newcomer.device_number))
        self.assertFalse([a for a in h.transport.sent if a[0] == "127.0.0.66"])

    def test_one_device_cannot_take_every_new_session(self):
        """A device starting session after session (a boot loop) is held to
        NEW_SESSIONS_PER_DEVICE a second, at no decryption; another device still starts."""
        h = Harness(self, max_new_sessions_per_second=5)
        looping, other = h.provision("looping"), h.provision("other")
        now = h.clock.seconds()
        h.clock.advance(math.floor(now) + 1.1 - now)
        for i in range(20):
            node = h.node(looping, address=("127.0.0.2", 40001 + i))
            for data, _ in node.datagrams(h.clock.seconds()):
                h.endpoint.datagramReceived(data, ("127.0.0.2", 40001 + i))
        self.assertEqual(h.endpoint.counters["sessions_started"], NEW_SESSIONS_PER_DEVICE)
        self.assertEqual(h.endpoint.drops["new_session_rate_limited"],
                         20 - NEW_SESSIONS_PER_DEVICE)
        self.assertEqual(h.endpoint.drops.get("auth_failed", 0), 0)
        h.node(other, address=("127.0.0.3", 40002))
        h.step(0.01)
        self.assertIsNotNone(h.endpoint.entry_of(other.device_number))
        self.assertEqual(h.endpoint.counters["sessions_started"], NEW_SESSIONS_PER_DEVICE + 1)
        h.clock.advance(1.0)   # a new second: the device may start a session again
        node = h.node(looping, address=("127.0.0.2", 41000))
        h.step(0.01)
        self.assertEqual(h.endpoint.session_of(looping.device_number).session_id,
                         node.session_id)


    def test_new_session_forgeries_from_a_sessions_own_address_are_attempts(self):
        """Forged first datagrams of newer sessions spoofing a live session's own
        address cost at most the attempts rate in key derivations; the session lives on."""
        h = Harness(self, max_new_sessions_per_second=2)
        device = h.provision("dev")
        node = h.node(device, address=("127.0.0.2", 40001))
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        live = h.endpoint.session_of(device.device_number)
        now = h.clock.seconds()
        h.clock.advance(math.floor(now) + 1.1 - now)
        forge(h.endpoint, [device.device_number], 500, ["127.0.0.2"])
        for i in range(500):
            header = build_header(device.device_number, FORGED_IDS + 1000 + i)
            h.endpoint.datagramReceived(header + os.urandom(60), ("127.0.0.2", 40001))
        self.assertLessEqual(h.endpoint.drops["auth_failed"],
                             h.settings.auth_failure_budget + 2 * AUTH_ATTEMPTS_PER_NEW_SESSION)
        self.assertEqual(h.endpoint.session_of(device.device_number), live)
        node.report({"v": 2}, h.clock.seconds())
        h.run(1.0)
        self.assertEqual(dict(h.registry.device("dev").reported), {"v": 2})
        self.assertEqual(h.transport.sent.keys(), {("127.0.0.2", 40001)})


class SourceTests(SynchronousTestCase):
    """Failures are counted per source: an IPv4 address or an IPv6 /64."""

    def test_ipv6_failures_count_per_64(self):
        """Forgeries from many addresses of one IPv6 /64 spend one failure budget; another
        /64 and IPv4 sources (also IPv4-mapped ones) keep their own."""
        now = 3.5
        admission = Admission(SSPSettings(auth_failure_budget=2, max_new_sessions_per_second=9),
                              now=now)
        for i in range(2):
            self.assertTrue(admission.stranger(7, f"2001:db8:0:1::{i + 1:x}", now, False))
            admission.failed(7, f"2001:db8:0:1::{i + 1:x}", now, False)
        self.assertFalse(admission.stranger(7, "2001:db8:0:1:ffff::9", now, False))
        self.assertFalse(admission.stranger(7, "2001:db8:0:1::abcd%eth0", now, False))
        self.assertTrue(admission.stranger(7, "2001:db8:0:2::1", now, False))
        for i in range(2):
            admission.failed(7, f"::ffff:192.0.2.{i + 1}", now, False)
        self.assertTrue(admission.stranger(7, "::ffff:192.0.2.3", now, False))
        self.assertTrue(admission.stranger(7, "192.0.2.3", now, False))

    def test_rotating_ipv6_sources_do_not_starve_a_new_device(self):
        """A forger rotating through the addresses of its /64 spends its own budget only:
        a genuine device starting a session in the same second is served."""
        h = Harness(self, max_new_sessions_per_second=2)
        victim, newcomer = h.provision("victim"), h.provision("newcomer")
        now = h.clock.seconds()
        h.clock.advance(math.floor(now) + 1.1 - now)
        forge(h.endpoint, [victim.device_number], 300,
              [f"2001:db8:66:1::{i + 1:x}" for i in range(300)])
        self.assertLessEqual(h.endpoint.drops["auth_failed"], h.settings.auth_failure_budget)
        h.node(newcomer, address=("::1", 40002))
        h.step(0.01)
        self.assertIsNotNone(h.endpoint.entry_of(newcomer.device_number))
        self.assertEqual(set(h.transport.sent), {("::1", 40002)})
