"""Tests for broker.ssp.incoming: a replayed datagram earns the broker no datagram.

An answering server (FLEET) acknowledges a state it already holds again, and
says which state it holds when a diff names one it dropped, so that a device
that lost an ack is not stuck. Both answers are for in-order datagrams only:
an older sequence number (a replay of a captured datagram) is taken as mosh
takes it, but must not make the broker send (wire.md 3: no amplification).
"""

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.device_state import DeviceState
from broker.ssp.errors import DropReason

from tests.ssp.linksim import BROKER_ADDRESS, DEVICE_ADDRESS, broker_pair

EMPTY = DeviceState.empty()


def exchange(device, broker, now):
    """One round: the device's due datagrams to the broker and back; returns the device's."""
    sent = device.datagrams_to_send(now)
    for data, _ in sent:
        broker.receive_datagram(data, DEVICE_ADDRESS, now)
    for data, _ in broker.datagrams_to_send(now):
        device.receive_datagram(data, BROKER_ADDRESS, now)
    device.pop_events()
    return sent


def settle(device, broker, start, seconds=1.0, step=0.01):
    """Exchange datagrams every ``step`` for ``seconds``; returns every device datagram."""
    sent = []
    for tick in range(int(seconds / step)):
        sent += exchange(device, broker, start + tick * step)
    return sent


class ReplayAnswerTests(SynchronousTestCase):
    """What an answering broker session sends for old and new datagrams."""

    def setUp(self):
        self.device, self.broker = broker_pair(10.0)
        self.device.set_local_state(EMPTY.with_values({"v": 1}), 10.0)
        self.first = settle(self.device, self.broker, 10.0)
        self.assertTrue(self.device.idle)
        self.broker.pop_events()

    def test_replayed_acknowledged_state_sends_nothing(self):
        """A replay of the datagram that carried an acknowledged state schedules no answer."""
        for data, _ in self.first:
            self.broker.receive_datagram(data, DEVICE_ADDRESS, 12.0)
        self.assertEqual(self.broker.next_wakeup(), None)
        self.assertEqual(self.broker.datagrams_to_send(12.5), [])

    def test_replayed_unknown_reference_sends_nothing(self):
        """A replayed diff from a state the broker dropped is refused and not answered."""
        self.device.set_local_state(EMPTY.with_values({"v": 2}), 11.0)
        captured = settle(self.device, self.broker, 11.0)
        self.device.set_local_state(EMPTY.with_values({"v": 3}), 12.0)
        settle(self.device, self.broker, 12.0)
        self.device.set_local_state(EMPTY.with_values({"v": 4}), 13.0)
        settle(self.device, self.broker, 13.0)
        self.broker.pop_events()
        for data, _ in captured:
            self.broker.receive_datagram(data, DEVICE_ADDRESS, 15.0)
        self.assertIn(DropReason.UNKNOWN_REFERENCE, self.broker.drops)
        self.assertEqual(self.broker.next_wakeup(), None)
        self.assertEqual(self.broker.datagrams_to_send(15.5), [])

    def test_in_order_resend_of_acknowledged_state_is_answered(self):
        """A device that lost the ack resends its state in a new datagram (a newer
        sequence number): that one is acknowledged again within the ack delay."""
        device, broker = broker_pair(10.0)
        device.set_local_state(EMPTY.with_values({"v": 1}), 10.0)
        for data, _ in device.datagrams_to_send(10.0):
            broker.receive_datagram(data, DEVICE_ADDRESS, 10.0)
        broker.datagrams_to_send(10.2)   # the broker's ack, lost on the way
        when = device.next_wakeup()
        resent = device.datagrams_to_send(when)   # the device's retransmission
        self.assertTrue(resent)
        for data, _ in resent:
            broker.receive_datagram(data, DEVICE_ADDRESS, when)
        self.assertEqual(len(broker.datagrams_to_send(when + 0.2)), 1)
