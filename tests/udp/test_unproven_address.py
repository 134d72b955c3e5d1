"""A session's first datagram from elsewhere than the device's known address may be a
replay of one that never reached the broker (a failing link, a session no broker
heard): such a session starts on probation, answers no more than three times what it
got, and a device that really moved proves itself by answering a probe."""

import os

from twisted.trial.unittest import SynchronousTestCase

from broker.udp.probation import AMPLIFICATION_LIMIT

from .helpers import Harness

ATTACKER = ("127.0.0.66", 6666)
DEVICE = ("127.0.0.2", 40000)
#: Where the device's NAT maps it after a reboot.
REBOUND = ("127.0.0.2", 40999)
#: About 6 kB of desired values: several datagrams once a session sends them freely.
BIG = {f"k{i}": os.urandom(60).hex() for i in range(50)}


def silent_run(h, node, seconds):
    """The device runs ``seconds`` while none of its datagrams reach the broker;
    every datagram it sent meanwhile (captured on the way)."""
    del h.nodes[h.address_of(node)]
    captured = []
    for _ in range(int(seconds / 0.05)):
        captured += [data for data, _ in node.datagrams(h.clock.seconds())]
        h.clock.advance(0.05)
    return captured


def replayed_from(h, data, address, seconds=10.0):
    """Hand ``data`` to the endpoint as from ``address``; what ``address`` is sent in
    the next ``seconds`` (none of it delivered)."""
    h.transport.written = []
    h.endpoint.datagramReceived(data, address)
    got = []
    for _ in range(int(seconds * 10)):
        h.clock.advance(0.1)
        got += [sent for sent, to in h.transport.written if to == address]
        h.transport.written = []
    return got


class Reported:
    """A device that reported from DEVICE, with 6 kB of desired values."""

    settings = {}
    node_options = {}

    def setUp(self):
        self.h = Harness(self, **self.settings)
        self.device = self.h.provision("dev")
        self.number = self.device.device_number
        self.successResultOf(self.h.registry.update_desired("dev", BIG))
        self.node = self.h.node(self.device, address=DEVICE, **self.node_options)
        self.node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(3.0)
        self.assertEqual(self.view().address, DEVICE)

    def view(self):
        return self.h.registry.device_by_number(self.number)

    def assert_contained(self, replay, got):
        """The replayer got at most one datagram, at most three times the replay's
        size, and the registry still shows the device where it was, offline or not
        moved."""
        self.assertLessEqual(len(got), 1)
        self.assertLessEqual(sum(map(len, got)), AMPLIFICATION_LIMIT * len(replay))
        self.assertEqual(self.view().address, DEVICE)
        self.assertEqual(self.h.endpoint.counters["sessions_verified"], 0)
        self.assertEqual(self.h.endpoint.counters["roams"], 0)

class UnprovenAddressTests(Reported, SynchronousTestCase):
    """A device that reported from DEVICE, with 6 kB of desired values."""

    def test_replay_of_a_session_no_broker_heard(self):
        """A captured first datagram of a session the device started during an outage
        (no broker heard it), replayed from a stranger, starts the session on
        probation: no amplification, no address moved."""
        old = self.node.session_id
        captured = silent_run(self.h, self.node, 90.0)     # past rekey_after (75 s)
        self.assertNotEqual(self.node.session_id, old)
        header = self.node.session._header
        replay = next(data for data in captured if data.startswith(header))
        got = replayed_from(self.h, replay, ATTACKER)
        self.assertEqual(self.h.endpoint.counters["sessions_on_probation"], 1)
        self.assert_contained(replay, got)

    def test_rebooted_device_behind_a_new_port_is_served_within_a_second(self):
        """A device that reboots and comes back from a new port (a NAT's new mapping)
        starts its new session on probation there; the broker's answer (its 6 kB of
        desired values) does not fit the allowance, so a probe goes instead, and the
        device's acknowledgement of it verifies the session: within a second the
        registry shows the new address and the device holds every desired value."""
        del self.h.nodes[DEVICE]
        rebooted = self.h.node(self.device, address=REBOUND)
        rebooted.report({"v": 2}, self.h.clock.seconds())
        self.h.run(1.0)
        counters = self.h.endpoint.counters
        self.assertEqual(counters["sessions_started"], 2)
        self.assertEqual(counters["sessions_on_probation"], 1)
        self.assertGreaterEqual(counters["probes_sent"], 1)
        self.assertEqual(counters["sessions_verified"], 1)
        self.assertEqual(self.view().address, REBOUND)
        self.assertTrue(self.view().online)
        self.assertEqual(rebooted.desired, BIG)
        self.assertEqual(dict(self.h.registry.device("dev").reported), {"v": 2})

    def test_device_at_its_known_address_starts_without_probation(self):
        """A rebooted device that comes back from its known address is not on
        probation: it gets its desired values in its first round trips."""
        del self.h.nodes[DEVICE]
        rebooted = self.h.node(self.device, address=DEVICE)
        rebooted.report({"v": 2}, self.h.clock.seconds())
        self.h.run(1.0)
        self.assertEqual(self.h.endpoint.counters["sessions_on_probation"], 0)
        self.assertEqual(rebooted.desired, BIG)


class EvictedSessionTests(Reported, SynchronousTestCase):
    """As above, with a short ``offline_after`` and a device that keeps its session."""

    settings = {"offline_after": 30.0}
    node_options = {"rekey_after": 600.0}

    def test_replay_of_a_datagram_lost_before_an_eviction(self):
        """A heartbeat the device sent into a failed link (the session went offline and
        was evicted with a final mark below it), replayed from a stranger, resumes the
        session on probation: no amplification, no address moved."""
        captured = silent_run(self.h, self.node, 120.0)
        self.assertIsNone(self.h.endpoint.entry_of(self.number))     # evicted
        record = self.h.registry.session_record(self.number)
        self.assertTrue(self.h.endpoint.bridge.mark_is_final(record))
        same_session = [data for data in captured
                        if data.startswith(self.node.session._header)]
        got = replayed_from(self.h, same_session[-1], ATTACKER)
        self.assertEqual(self.h.endpoint.counters["sessions_on_probation"], 1)
        self.assert_contained(same_session[-1], got)


class NeverHeardDeviceTests(SynchronousTestCase):
    """A device the registry has no address for."""

    def test_first_session_of_a_new_device_is_not_on_probation(self):
        """A device never heard before has no known address to compare with: its
        first session is served in full at once."""
        h = Harness(self)
        device = h.provision("dev")
        self.successResultOf(h.registry.update_desired("dev", BIG))
        node = h.node(device, address=DEVICE)
        node.report({"v": 1}, h.clock.seconds())
        h.run(1.0)
        self.assertEqual(h.endpoint.counters["sessions_on_probation"], 0)
        self.assertEqual(node.desired, BIG)
        self.assertEqual(h.registry.device_by_number(device.device_number).address, DEVICE)
