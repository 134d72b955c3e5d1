"""After a crash (kill -9: no clean stop writes the marks) a captured datagram of the
live session can neither answer its replayer with more than it brought nor move the
device's address (wire.md 3), and the window it has is bounded by ``mark_interval``."""

import os

from twisted.trial.unittest import SynchronousTestCase

from broker.udp.endpoint import own_address
from broker.udp.park import Parked
from broker.udp.probation import AMPLIFICATION_LIMIT, Probation

from .helpers import Harness

ATTACKER = ("127.0.0.66", 6666)
ELSEWHERE = ("127.0.0.3", 41000)
#: The address Harness.node sends from.
DEVICE = ("127.0.0.2", 40000)
#: About 6 kB of desired values: many datagrams once a session sends them freely.
BIG = {f"k{i}": os.urandom(60).hex() for i in range(50)}


def crashed(h, **settings):
    """A new registry and endpoint over the same store; the old endpoint is never
    stopped (kill -9: no stopProtocol, so no marks written)."""
    return Harness(h.testcase, store=h.store, clock=h.clock, **settings)


def sent_to(harness, address):
    """The datagrams the harness's endpoint wrote to ``address`` (and not yet delivered)."""
    return [data for data, to in harness.transport.written if to == address]


def collect_sent(harness, address, seconds):
    """Run ``seconds`` in 0.1 s steps; the datagrams written to ``address`` meanwhile
    (none of them delivered)."""
    got = []
    for _ in range(int(round(seconds * 10))):
        harness.clock.advance(0.1)
        got += sent_to(harness, address)
        harness.transport.written = []
    return got


class CapturingTests(SynchronousTestCase):
    """A device that reported, then only heartbeats, its datagrams captured."""

    desired = None
    settings = {}

    def setUp(self):
        self.h = Harness(self, **self.settings)
        self.device = self.h.provision("dev")
        self.number = self.device.device_number
        self.node = self.h.node(self.device)
        if self.desired is not None:
            self.successResultOf(self.h.registry.update_desired("dev", self.desired))
        self.node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(2.0)
        self.captured = []
        receive = self.h.endpoint.datagramReceived

        def capture(data, addr):
            self.captured.append(data)
            receive(data, addr)
        self.h.endpoint.datagramReceived = capture

    def heartbeats(self, seconds):
        """Let the device heartbeat (and park in between) for ``seconds``."""
        self.h.run(seconds, dt=0.05)

    def record(self, harness=None):
        return (harness or self.h).registry.session_record(self.number)

    def view(self, harness):
        return harness.registry.device_by_number(self.number)


class MarkAtParkTests(CapturingTests):
    """Parking writes a lagging receive mark at most every ``mark_interval``."""

    def test_park_within_the_interval_writes_no_mark(self):
        """A heartbeat 25 s after the last record write moves the device's sequence
        number, but its park writes nothing (the default interval is 60 s)."""
        reported = self.record()
        self.heartbeats(30.0)
        entry = self.h.endpoint.entry_of(self.number)
        self.assertIs(type(entry), Parked)
        self.assertGreater(entry.expected_seq(), reported.remote_seq)
        self.assertEqual(self.record(), reported)
        self.assertEqual(self.h.endpoint.counters["marks_at_park"], 0)

    def test_park_after_the_interval_writes_the_mark(self):
        """The first park 60 s or more after the last record write stores the device's
        next expected sequence number (the 75 s heartbeat's), and only that one."""
        self.heartbeats(80.0)
        entry = self.h.endpoint.entry_of(self.number)
        self.assertIs(type(entry), Parked)
        self.assertEqual(self.record().remote_seq, entry.expected_seq())
        self.assertEqual(self.h.endpoint.counters["marks_at_park"], 1)


class MarkEveryParkTests(CapturingTests):
    """``mark_interval = 0``: every park writes a lagging mark."""

    settings = {"mark_interval": 0.0}

    def test_heartbeat_replayed_after_a_crash_is_dropped(self):
        """With the mark written at the park after each heartbeat, a heartbeat replayed
        after a kill -9 is dropped as a replay: no session, no answer."""
        self.heartbeats(30.0)
        self.assertEqual(self.record().remote_seq,
                         self.h.endpoint.entry_of(self.number).expected_seq())
        h2 = crashed(self.h, **self.settings)
        h2.endpoint.datagramReceived(self.captured[-1], ATTACKER)
        h2.clock.advance(1.0)
        self.assertEqual(h2.transport.written, [])
        self.assertIsNone(h2.endpoint.entry_of(self.number))
        self.assertEqual(h2.endpoint.drops["replay"], 1)


class ProbationTests(CapturingTests):
    """A session resumed from a record whose mark may lag is on probation."""

    desired = BIG

    def replay_after_crash(self, seconds=20.0):
        """Crash after a heartbeat, replay it from a stranger; what the stranger got."""
        self.heartbeats(30.0)
        self.h2 = h2 = crashed(self.h)
        replayed = self.captured[-1]
        h2.endpoint.datagramReceived(replayed, ATTACKER)
        got = collect_sent(h2, ATTACKER, seconds)
        return replayed, got

    def test_replay_is_answered_with_no_more_than_it_brought(self):
        """A heartbeat replayed from a stranger after a crash resumes the session on
        probation: in 20 s the stranger gets at most three times the replay's bytes
        (6 kB of desired values are due), and the registry keeps the
        device's address and offline state."""
        replayed, got = self.replay_after_crash()
        self.assertLessEqual(sum(map(len, got)), AMPLIFICATION_LIMIT * len(replayed))
        view = self.view(self.h2)
        self.assertEqual(view.address, self.h.address_of(self.node))
        self.assertFalse(view.online)
        self.assertEqual(self.h2.endpoint.counters["sessions_on_probation"], 1)

    def test_device_takes_its_session_back_from_a_replayer(self):
        """After a replay, the device's own next datagrams (from its known address) are
        answered in full and verify the session once they acknowledge an answer: it
        gets its desired values, the stranger nothing more."""
        _, got = self.replay_after_crash(seconds=1.0)
        h2 = self.h2
        h2.nodes = self.h.nodes
        self.node.report({"v": 2}, h2.clock.seconds())
        h2.run(3.0)
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 1)
        self.assertEqual(dict(h2.registry.device("dev").reported), {"v": 2})
        self.assertEqual(self.node.desired, BIG)
        self.assertTrue(self.view(h2).online)
        self.assertEqual(self.view(h2).address, self.h.address_of(self.node))
        self.assertEqual(h2.transport.sent[ATTACKER], len(got))
        self.assertEqual(self.node.sessions_started, 1)

    def test_device_at_its_known_address_sees_only_a_pause(self):
        """A device that did not move resumes after a crash on probation (its address
        proves nothing), yet is answered in full there: its report is stored and
        acknowledged at once in the same session, and the device's acknowledgement of
        that answer verifies the session and brings the registry's facts within a
        second."""
        self.heartbeats(30.0)
        h2 = crashed(self.h)
        h2.nodes = self.h.nodes
        self.node.report({"v": 2}, h2.clock.seconds())
        h2.run(1.0)
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(h2.endpoint.counters["sessions_on_probation"], 1)
        self.assertEqual(h2.endpoint.counters["datagrams_withheld"], 0)
        self.assertTrue(self.node.idle())
        self.assertEqual(dict(h2.registry.device("dev").reported), {"v": 2})
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 1)
        self.assertTrue(self.view(h2).online)
        self.assertEqual(self.view(h2).address, DEVICE)
        self.assertEqual(self.node.sessions_started, 1)

    def test_desired_change_reaches_an_unmoved_device_at_once(self):
        """A desired value set after a crash reaches the device at its known address
        in its first round trip, and its acknowledgement of it verifies the session
        within a second."""
        self.heartbeats(30.0)
        h2 = crashed(self.h)
        h2.nodes = self.h.nodes
        self.successResultOf(h2.registry.update_desired("dev", {"late": 1}))
        self.node.report({"v": 2}, h2.clock.seconds())
        h2.run(1.0)
        self.assertEqual(self.node.desired["late"], 1)
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 1)
        self.assertTrue(self.view(h2).online)

    def test_eviction_on_probation_keeps_later_replays_on_probation(self):
        """A session resumed by a replay and evicted unverified leaves a mark that does
        not vouch for later datagrams: a later captured one, replayed, is again answered
        with at most three times its bytes."""
        self.heartbeats(60.0)                 # two heartbeats after the report
        first, second = self.captured[-2], self.captured[-1]
        h2 = crashed(self.h)
        h2.endpoint.datagramReceived(first, ATTACKER)
        h2.clock.advance(100.0)               # offline, evicted
        self.assertIsNone(h2.endpoint.entry_of(self.number))
        h2.transport.written = []
        h2.endpoint.datagramReceived(second, ATTACKER)
        got = collect_sent(h2, ATTACKER, 20.0)
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 2)
        self.assertLessEqual(sum(map(len, got)), AMPLIFICATION_LIMIT * len(second))


class SpoofedKnownAddressTests(CapturingTests):
    """A replay whose (spoofed) source is the device's known address."""

    desired = BIG

    def test_replay_from_the_known_address_moves_no_facts(self):
        """A heartbeat replayed after a crash with the device's known address as its
        source resumes the session on probation: the registry's device stays offline
        and unverified."""
        self.heartbeats(30.0)
        h2 = crashed(self.h)
        h2.endpoint.datagramReceived(self.captured[-1], DEVICE)
        h2.clock.advance(1.0)
        self.assertEqual(h2.endpoint.counters["sessions_on_probation"], 1)
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 0)
        self.assertFalse(self.view(h2).online)

    def test_later_replay_from_elsewhere_neither_roams_nor_amplifies(self):
        """After a replay spoofing the known address, a later captured datagram
        replayed from the replayer's own address is answered with at most three times
        its bytes, and moves neither the session's registry address
        nor a roam count."""
        self.heartbeats(60.0)                 # two heartbeats after the report
        first, second = self.captured[-2], self.captured[-1]
        h2 = crashed(self.h)
        h2.endpoint.datagramReceived(first, DEVICE)
        h2.clock.advance(0.5)
        h2.transport.written = []
        h2.endpoint.datagramReceived(second, ATTACKER)
        got = collect_sent(h2, ATTACKER, 10.0)
        self.assertLessEqual(sum(map(len, got)), AMPLIFICATION_LIMIT * len(second))
        self.assertEqual(self.view(h2).address, DEVICE)
        self.assertFalse(self.view(h2).online)
        self.assertEqual(h2.endpoint.counters["roams"], 0)
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 0)


class ProbationAdmissionTests(CapturingTests):
    """On probation the device's known address stays its own in admission."""

    def verified_after(self, forgeries):
        """Crash, replay the last heartbeat from a stranger, then send ``forgeries``
        garbage datagrams with the device's header from there each second while
        the device runs: seconds until the session is verified (None: not in 120 s)."""
        self.heartbeats(30.0)
        replayed = self.captured[-1]
        h2 = self.h2 = crashed(self.h)
        h2.endpoint.datagramReceived(replayed, ATTACKER)
        h2.nodes = self.h.nodes
        forged = replayed[:17] + bytes(64)
        start = h2.clock.seconds()
        second = None
        for _ in range(int(120 / 0.05)):
            if int(h2.clock.seconds()) != second:
                # At the start of each of the admission windows' seconds.
                second = int(h2.clock.seconds())
                for _ in range(forgeries):
                    h2.endpoint.datagramReceived(forged, ATTACKER)
            h2.step(0.05)
            if h2.endpoint.counters["sessions_verified"]:
                return h2.clock.seconds() - start
        return None

    def test_forgeries_from_the_replayer_do_not_lock_the_device_out(self):
        """Nine forgeries a second from the replayer's address (over the failure
        budget) do not delay the device at its known address: its session is
        verified as soon as without them, within two heartbeats."""
        quiet = self.verified_after(0)
        self.setUp()
        flooded = self.verified_after(9)
        self.assertIsNotNone(quiet)
        self.assertLess(quiet, 55.0)
        self.assertEqual(flooded, quiet)
        self.assertGreater(self.h2.endpoint.drops["auth_failed"], 0)

    def test_known_address_is_own_and_the_replayers_is_not(self):
        """While a replay has moved the session's address, the known address is the
        session's own in admission and the replayer's is a stranger's."""
        self.heartbeats(30.0)
        h2 = crashed(self.h)
        h2.endpoint.datagramReceived(self.captured[-1], ATTACKER)
        live = h2.endpoint.entry_of(self.number)
        self.assertEqual(live.session.remote_address, ATTACKER)
        self.assertTrue(own_address(live, DEVICE, False))
        self.assertFalse(own_address(live, ATTACKER, False))


class HeartbeatOnlyTests(CapturingTests):
    """A device with no desired values that only heartbeats across the crash."""

    def test_heartbeat_only_device_is_verified_within_a_second(self):
        """A device that only heartbeats is verified by its first heartbeat after the
        crash, within a second of it: the broker has nothing new to send it (no desired
        values), yet its empty answer asks for an acknowledgement (a non-empty diff
        that changes nothing), so the registry shows it online again without waiting
        for the next heartbeat."""
        self.heartbeats(30.0)
        h2 = crashed(self.h)
        h2.nodes = self.h.nodes
        first_heard = None
        for _ in range(int(30.0 / 0.05)):
            h2.step(0.05)
            if first_heard is None and h2.endpoint.entry_of(self.number) is not None:
                first_heard = h2.clock.seconds()
            if h2.endpoint.counters["sessions_verified"]:
                break
        self.assertIsNotNone(first_heard)
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 1)
        self.assertLess(h2.clock.seconds() - first_heard, 1.0)
        self.assertTrue(self.view(h2).online)
        self.assertEqual(h2.endpoint.counters["datagrams_withheld"], 0)


class MovedDeviceTests(CapturingTests):
    """A device whose address changed across the crash."""

    def test_moved_device_is_verified_by_acknowledging_a_fresh_state(self):
        """A device heard from a new address after a crash gets one small answer there
        (its report acknowledged, an acknowledgement asked for), and its
        acknowledgement of that answer's state verifies the session within a second:
        the registry then shows the new address."""
        self.heartbeats(30.0)
        h2 = crashed(self.h)
        h2.nodes = self.h.nodes
        h2.move(self.node, ELSEWHERE)
        self.node.report({"v": 2}, h2.clock.seconds())
        h2.run(1.0)
        self.assertEqual(h2.endpoint.counters["sessions_on_probation"], 1)
        self.assertTrue(self.node.idle())       # its report was acknowledged
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 1)
        self.assertEqual(self.view(h2).address, ELSEWHERE)
        self.assertEqual(dict(h2.registry.device("dev").reported), {"v": 2})

    def test_moved_heartbeat_only_device_is_verified(self):
        """A device that only heartbeats, heard from a new address after a crash, is
        verified there without a new session: the broker's answer that asks for an
        acknowledgement fits the allowance its heartbeats earned."""
        self.heartbeats(30.0)
        h2 = crashed(self.h)
        h2.nodes = self.h.nodes
        h2.move(self.node, ELSEWHERE)
        h2.run(60.0, dt=0.05)
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 1)
        self.assertEqual(self.view(h2).address, ELSEWHERE)
        self.assertTrue(self.view(h2).online)
        self.assertEqual(self.node.sessions_started, 1)

    def test_clean_stop_leaves_no_probation_at_the_known_address(self):
        """After a clean stop every mark is final: a device resuming from its known
        address is not on probation."""
        self.heartbeats(30.0)
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        self.node.report({"v": 2}, h2.clock.seconds())
        h2.run(3.0)
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(h2.endpoint.counters["sessions_on_probation"], 0)
        self.assertEqual(self.view(h2).address, DEVICE)

    def test_after_a_clean_stop_a_new_address_is_verified_by_a_probe(self):
        """After a clean stop, a device resuming from a new address is on probation (a
        final mark does not vouch for a datagram lost on the way) and is verified
        there within a second, without a new session."""
        self.heartbeats(30.0)
        h2 = self.h.restart()
        h2.nodes = self.h.nodes
        h2.move(self.node, ELSEWHERE)
        self.node.report({"v": 2}, h2.clock.seconds())
        h2.run(1.0)
        self.assertEqual(h2.endpoint.counters["sessions_resumed"], 1)
        self.assertEqual(h2.endpoint.counters["sessions_on_probation"], 1)
        self.assertEqual(h2.endpoint.counters["sessions_verified"], 1)
        self.assertEqual(self.view(h2).address, ELSEWHERE)
        self.assertEqual(self.node.sessions_started, 1)


class ProbationAllowanceTests(SynchronousTestCase):
    """Probation.allowed: at most three times the bytes received, to their sender."""

    def test_allowance_is_in_bytes_and_per_address(self):
        """Each datagram earns its sender three times its bytes; the fragments of one
        instruction go all or none; a datagram from another address takes the place
        of the earlier allowance."""
        self.assertEqual(AMPLIFICATION_LIMIT, 3)
        probation = Probation(None, 10)
        probation.earned(ATTACKER, 80)
        self.assertTrue(probation.owed())
        self.assertEqual(probation.allowed([(b"x" * 241, ATTACKER)], 11), ([], 1))
        kept, withheld = probation.allowed([(b"x" * 200, ATTACKER), (b"y" * 41, ATTACKER)], 11)
        self.assertEqual((kept, withheld), ([], 2))
        kept, withheld = probation.allowed([(b"x" * 160, ATTACKER)], 11)
        self.assertEqual((len(kept), withheld), (1, 0))
        kept, withheld = probation.allowed([(b"x" * 80, ATTACKER)], 12)
        self.assertEqual((len(kept), withheld), (1, 0))
        self.assertFalse(probation.owed())
        probation.earned(ATTACKER, 80)
        probation.earned(ELSEWHERE, 50)
        self.assertEqual(probation.allowed([(b"x" * 150, ATTACKER)], 13), ([], 1))
        self.assertEqual(probation.allowed([(b"z" * 150, ELSEWHERE)], 13),
                         ([(b"z" * 150, ELSEWHERE)], 0))

    def test_known_address_is_sent_to_freely(self):
        """Datagrams to the known address pass whatever their number and size, and
        take nothing from another address's allowance; one from there ends it."""
        probation = Probation(list(DEVICE), 10)
        probation.earned(ATTACKER, 80)
        out = [(b"x" * 1000, DEVICE), (b"y" * 1000, DEVICE)]
        self.assertEqual(probation.allowed(out, 11), (out, 0))
        self.assertEqual(probation.allowed([(b"z" * 240, ATTACKER)], 12),
                         ([(b"z" * 240, ATTACKER)], 0))
        probation.earned(ATTACKER, 80)
        probation.earned(DEVICE, 80)
        self.assertEqual(probation.allowed([(b"z" * 80, ATTACKER)], 13), ([], 1))

    def test_what_went_out_is_recorded_for_probes(self):
        """The newest state number of what was let go is kept (a probe must not go
        behind it); a withheld one is not."""
        probation = Probation(list(DEVICE), 10)
        probation.earned(ATTACKER, 50)
        self.assertEqual(probation.went_out, 0)
        probation.allowed([(b"x" * 400, DEVICE)], 11)
        self.assertEqual(probation.went_out, 11)
        probation.allowed([(b"x" * 400, ATTACKER)], 12)
        self.assertEqual(probation.went_out, 11)
        probation.allowed([(b"x" * 100, ATTACKER)], 13)
        self.assertEqual(probation.went_out, 13)
