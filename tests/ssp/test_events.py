"""Tests for broker.ssp.events: the fast constructors of hot events."""

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import events
from broker.ssp.errors import DropReason


class FastConstructorTests(SynchronousTestCase):
    """The per-datagram constructors build ordinary frozen events."""

    def test_same_as_dataclass_constructor(self):
        """state_received & co. equal (and hash like) the normal events."""
        pairs = [
            (events.state_received("s", 3), events.StateReceived("s", 3)),
            (events.state_acknowledged(7), events.StateAcknowledged(7)),
            (events.datagram_rejected(DropReason.SHORT),
             events.DatagramRejected(DropReason.SHORT)),
        ]
        for fast, normal in pairs:
            self.assertIs(type(fast), type(normal))
            self.assertEqual(fast, normal)
            self.assertEqual(hash(fast), hash(normal))
            self.assertEqual(repr(fast), repr(normal))

    def test_still_frozen(self):
        """An event from a fast constructor cannot be changed."""
        event = events.state_received("s", 3)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            event.num = 4
        self.assertEqual(event.num, 3)
