"""SSPSession.ask_acks: empty diffs sent as a no-op diff the peer acknowledges at once."""

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import events
from broker.ssp.device_state import DeviceState
from broker.ssp.instruction import UINT64_MAX
from broker.ssp.mosh_states import UserStream
from broker.ssp.profile import FLEET, MOSH

from tests.ssp.linksim import BROKER_ADDRESS, DEVICE_ADDRESS, broker_pair
from tests.ssp.test_session import decode_out, deliver

START = 10.0
STEP = 0.01


def heard_pair():
    """A device and a broker session after the device's first (empty) datagram
    reached the broker, which now knows the device's address."""
    device, broker = broker_pair(START)
    device.set_local_state(DeviceState.empty().with_values({"a": 1}), START)
    deliver(device, broker, START, DEVICE_ADDRESS)
    device.pop_events()
    broker.pop_events()
    return device, broker


def broker_answer(broker, now):
    """The instruction of the broker's next datagram (one fragment), stepping time
    until it is due; returns (instruction, datagrams, when)."""
    while True:
        out = broker.datagrams_to_send(now)
        if out:
            return decode_out(broker, out[0][0]), out, now
        now = round(now + STEP, 3)


def device_ack_time(device, broker_out, now, num):
    """Deliver ``broker_out`` to ``device`` at ``now``; the time of the device's first
    datagram acknowledging ``num`` within 5 s (None: none) and the device's events."""
    for data, _ in broker_out:
        device.receive_datagram(data, BROKER_ADDRESS, now)
    found = device.pop_events()
    end = now + 5.0
    while now < end:
        for data, _ in device.datagrams_to_send(now):
            if decode_out(device, data).ack_num >= num:
                return now, found
        now = round(now + STEP, 3)
    return None, found


class AskAcksTests(SynchronousTestCase):
    """A session asking for acks makes a mosh-following peer answer within ACK_DELAY."""

    def test_empty_answer_carries_the_no_op_diff_and_is_acknowledged_at_once(self):
        """With ask_acks on, the broker's answer that has nothing new goes with
        DeviceState.ACK_REQUEST_DIFF, and the device acknowledges its state within
        ACK_DELAY (plus a step), reporting no state change to its application."""
        device, broker = heard_pair()
        broker.ask_acks(True)
        inst, out, when = broker_answer(broker, START)
        self.assertEqual(inst.diff, DeviceState.ACK_REQUEST_DIFF)
        acked_at, found = device_ack_time(device, out, when, inst.new_num)
        self.assertIsNotNone(acked_at)
        self.assertLessEqual(acked_at - when, FLEET.ack_delay + 2 * STEP)
        self.assertEqual([e for e in found if type(e) is events.StateReceived], [])
        self.assertEqual(device.latest_remote_state, DeviceState.empty())

    def test_without_asking_the_empty_answer_waits_for_the_next_datagram(self):
        """Without ask_acks the same answer has an empty diff and the device sends no
        acknowledgement of it within 5 s (it would come with its next heartbeat)."""
        device, broker = heard_pair()
        inst, out, when = broker_answer(broker, START)
        self.assertEqual(inst.diff, b"")
        acked_at, _ = device_ack_time(device, out, when, inst.new_num)
        self.assertIsNone(acked_at)

    def test_asking_off_restores_empty_diffs(self):
        """ask_acks(False) after ask_acks(True): empty diffs are sent as b"" again."""
        device, broker = heard_pair()
        broker.ask_acks(True)
        broker.ask_acks(False)
        inst, _, _ = broker_answer(broker, START)
        self.assertEqual(inst.diff, b"")

    def test_state_without_a_request_diff_is_not_changed(self):
        """A state type with no ACK_REQUEST_DIFF (mosh's user stream) ignores
        ask_acks: its empty diffs stay empty."""
        empty = UserStream.empty()
        device, broker = broker_pair(START, profile=MOSH, empty=empty,
                                     broker_framing=False)
        device.set_local_state(empty.with_keys(b"x"), START)
        deliver(device, broker, START, DEVICE_ADDRESS)
        broker.ask_acks(True)
        now = START
        diffs = []
        while now < START + 1.0 and not diffs:
            diffs = [decode_out(broker, data).diff
                     for data, _ in broker.datagrams_to_send(now)]
            now = round(now + STEP, 3)
        self.assertEqual(diffs, [b""])

    def test_shutdown_state_is_not_changed(self):
        """The shutdown handshake's state (number 2^64-1) keeps its own diff."""
        device, broker = heard_pair()
        broker.ask_acks(True)
        broker.start_shutdown(START)
        inst, _, _ = broker_answer(broker, START)
        self.assertEqual(inst.new_num, UINT64_MAX)
        self.assertEqual(inst.diff, b"")


class ProbeTests(SynchronousTestCase):
    """SSPSession.probe: a path challenge, small whatever the session's state holds."""

    def test_probe_is_small_acknowledged_at_once_and_keeps_the_sender_consistent(self):
        """With 6 kB of values due, a probe is one datagram under 200 bytes carrying
        the acknowledged state under a new number; the device acknowledges it within
        ACK_DELAY without a state change, and the broker's next sends still bring the
        device every value."""
        device, broker = heard_pair()
        big = DeviceState.empty().with_values({f"k{i}": "x" * 100 for i in range(60)})
        broker.set_local_state(big, START)
        out = broker.probe(START)
        self.assertEqual(len(out), 1)
        self.assertLess(len(out[0][0]), 200)
        inst = decode_out(broker, out[0][0])
        self.assertEqual((inst.old_num, inst.diff, inst.chaff),
                         (broker.acknowledged_num, DeviceState.ACK_REQUEST_DIFF, b""))
        acked_at, found = device_ack_time(device, out, START, inst.new_num)
        self.assertIsNotNone(acked_at)
        self.assertLessEqual(acked_at - START, FLEET.ack_delay + 2 * STEP)
        self.assertEqual([e for e in found if type(e) is events.StateReceived], [])
        now = acked_at
        for _ in range(300):
            deliver(device, broker, now, DEVICE_ADDRESS)
            deliver(broker, device, now, BROKER_ADDRESS)
            now = round(now + STEP, 3)
        self.assertEqual(device.latest_remote_state, big)

    def test_no_probe_during_a_shutdown(self):
        """Once the shutdown handshake began, probe sends nothing (its state numbers
        are the handshake's)."""
        _, broker = heard_pair()
        broker.start_shutdown(START)
        self.assertEqual(broker.probe(START), [])
