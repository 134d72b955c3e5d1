"""A session's first datagram from elsewhere than the device's known address may be a
replay of one that never reached the broker (a failing link, a session no broker
heard): such a session starts on probation, answers no more than three times what it
got, and a device that really moved proves itself by answering a probe."""

import collections
import os

from twisted.trial.unittest import SynchronousTestCase

from broker.udp.park import Parked
from broker.udp.probation import AMPLIFICATION_LIMIT

from .helpers import BROKER, Harness

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
        """The replayer got at most three times the replay's bytes, and the registry
        still shows the device where it was."""
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


class InMemorySessionTests(Reported, SynchronousTestCase):
    """A device whose session is still in memory (parked) when a datagram it lost on
    a failing link is replayed, or when it really moves."""

    node_options = {"rekey_after": 600.0}

    def test_lost_heartbeat_replayed_to_the_parked_session_is_contained(self):
        """A heartbeat the device sent into a failing link, replayed from a stranger
        while the session is still parked (before offline_after evicts it): the roam
        it makes puts the session on probation, so the stranger gets at most three
        times its bytes and the registry keeps the device's address."""
        captured = silent_run(self.h, self.node, 30.0)
        self.assertIs(type(self.h.endpoint.entry_of(self.number)), Parked)
        got = replayed_from(self.h, captured[-1], ATTACKER)
        self.assertEqual(self.h.endpoint.counters["sessions_on_probation"], 1)
        self.assert_contained(captured[-1], got)

    def test_nat_rebinding_is_verified_and_counted_as_a_roam(self):
        """A device whose NAT maps it to a new port mid-session is put on probation by
        the move and verified by its next acknowledgement: the registry shows the new
        address within a second, one roam is counted, and no new session starts."""
        self.h.move(self.node, REBOUND)
        self.node.report({"v": 2}, self.h.clock.seconds())
        self.h.run(1.0)
        counters = self.h.endpoint.counters
        self.assertEqual(counters["sessions_on_probation"], 1)
        self.assertEqual(counters["sessions_verified"], 1)
        self.assertEqual(counters["roams"], 1)
        self.assertEqual(self.view().address, REBOUND)
        self.assertEqual(self.node.sessions_started, 1)


class SlowLinkTests(SynchronousTestCase):
    """A device rebooted behind a new NAT port on a link with a 1 s round trip."""

    ONE_WAY = 0.5
    DT = 0.01

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")
        self.number = self.device.device_number
        node = self.h.node(self.device, address=DEVICE)
        node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(3.0)
        del self.h.nodes[DEVICE]
        self.commands = []
        self.rebooted = self.h.node(self.device, address=REBOUND,
                                    on_command=self.commands.append)
        del self.h.nodes[REBOUND]      # delivered by run_link, with its delay
        self.start = self.h.clock.seconds()

    def run_link(self, seconds, actions):
        """Step the slow link for ``seconds``, the device reporting every 30 ms;
        ``actions`` maps seconds since the reboot to calls."""
        up, down = collections.deque(), collections.deque()
        h, node = self.h, self.rebooted
        for step in range(int(round(seconds / self.DT))):
            now = h.clock.seconds()
            action = actions.get(round(now - self.start, 2))
            if action is not None:
                action()
            if step % 3 == 0:
                node.report({"v": step}, now)
            up.extend((now + self.ONE_WAY, data) for data, _ in node.datagrams(now))
            while up and up[0][0] <= now + 1e-9:
                h.endpoint.datagramReceived(up.popleft()[1], REBOUND)
            down.extend((now + self.ONE_WAY, data) for data, _ in h.transport.written)
            h.transport.written = []
            while down and down[0][0] <= now + 1e-9:
                node.receive(down.popleft()[1], BROKER, now)
            h.clock.advance(self.DT)

    def test_a_probe_never_takes_the_device_back(self):
        """A command that went out while the device was on probation, then 6 kB of
        desired values that do not fit (so a probe goes): the probe carries the newest
        state that went out, not the acknowledged one, so the device runs the command
        once and ends with every desired value."""
        self.run_link(4.0, {
            0.6: lambda: self.h.endpoint.send_command(self.number, "open"),
            0.9: lambda: self.successResultOf(
                self.h.registry.update_desired("dev", {"big": BIG})),
        })
        counters = self.h.endpoint.counters
        self.assertEqual(counters["sessions_verified"], 1)
        self.assertGreaterEqual(counters["probes_sent"], 1)
        self.assertEqual(self.rebooted.desired, {"big": BIG})
        self.assertEqual(self.commands, ["open"])


class LostProbeTests(Reported, SynchronousTestCase):
    """The first datagram to a rebooted device's new port is lost."""

    def lose_next_to(self, address):
        """The next datagram the endpoint writes to ``address`` is lost."""
        endpoint = self.h.endpoint
        write = endpoint._sendto
        left = [1]

        def lossy(data, to):
            if to == address and left[0]:
                left[0] -= 1
                return
            write(data, to)
        endpoint._sendto = lossy

    def test_a_lost_probe_is_sent_again(self):
        """The allowance is counted in bytes only, so a probe that was lost is sent
        again at the session's retransmission time: the device is verified and has
        its desired values within 5 s, not at its next heartbeat."""
        del self.h.nodes[DEVICE]
        self.lose_next_to(REBOUND)
        rebooted = self.h.node(self.device, address=REBOUND)
        rebooted.report({"v": 2}, self.h.clock.seconds())
        self.h.run(5.0, dt=0.05)
        self.assertEqual(self.h.endpoint.counters["sessions_verified"], 1)
        self.assertGreaterEqual(self.h.endpoint.counters["probes_sent"], 2)
        self.assertEqual(rebooted.desired, BIG)
        self.assertEqual(self.view().address, REBOUND)


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
