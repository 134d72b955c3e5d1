"""A device that does not acknowledge its commands cannot make the broker hold more and more:
its session takes at most MAX_PENDING_COMMANDS of them, and more are refused, nothing queued."""

from twisted.trial.unittest import SynchronousTestCase

from broker.udp.bridge import MAX_PENDING_COMMANDS, TooManyCommands
from broker.udp.convert import decode_state

from .helpers import Harness


class PendingCommandLimitTests(SynchronousTestCase):

    def setUp(self):
        self.h = Harness(self)
        self.device = self.h.provision("dev")
        self.got = []
        # The node keeps its session however long the broker's datagrams are lost.
        self.node = self.h.node(self.device, on_command=self.got.append, rekey_after=1e6)
        self.h.run(1.0)

    def send(self, *commands):
        return self.h.endpoint.send_command(self.device.device_number, *commands)

    def deaf(self, deaf=True):
        """The broker's datagrams are lost (True) or delivered again (False): a deaf node acknowledges nothing."""
        self.h.deaf = deaf

    def fill(self):
        """Queue MAX_PENDING_COMMANDS commands on a deaf node's session."""
        self.deaf()
        for index in range(MAX_PENDING_COMMANDS):
            self.assertIs(self.successResultOf(self.send(index)), True)
        self.h.run(1.0)

    def record_commands(self):
        record = self.h.registry.session_record(self.device.device_number)
        return decode_state(record.local_state).events_since(0)

    def test_a_command_beyond_the_limit_is_refused_and_not_queued(self):
        """With MAX_PENDING_COMMANDS unacknowledged, the next command raises TooManyCommands and reaches neither the session nor its record."""
        self.fill()
        with self.assertRaises(TooManyCommands) as caught:
            self.send("one too many")
        self.assertEqual((caught.exception.waiting, caught.exception.limit),
                         (MAX_PENDING_COMMANDS, MAX_PENDING_COMMANDS))
        self.assertEqual(self.record_commands(), tuple(range(MAX_PENDING_COMMANDS)))
        self.deaf(False)
        self.h.run(2.0)
        self.assertEqual(self.got, list(range(MAX_PENDING_COMMANDS)))

    def test_a_batch_that_would_pass_the_limit_is_refused_whole(self):
        """Several commands that together would pass the limit are all refused, none queued."""
        self.deaf()
        for index in range(MAX_PENDING_COMMANDS - 1):
            self.successResultOf(self.send(index))
        self.assertRaises(TooManyCommands, self.send, "a", "b")
        self.assertIs(self.successResultOf(self.send("last")), True)
        self.assertEqual(self.record_commands()[-1], "last")

    def test_acknowledged_commands_make_room(self):
        """Once the device has acknowledged its commands, new ones are queued and arrive again."""
        self.fill()
        self.assertRaises(TooManyCommands, self.send, "refused")
        self.deaf(False)
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertIs(self.successResultOf(self.send("after")), True)
        self.h.run(1.0)
        self.assertEqual(self.got, [*range(MAX_PENDING_COMMANDS), "after"])

    def test_commands_on_their_way_to_the_record_count(self):
        """Commands whose record write is still pending count toward the limit."""
        self.deaf()
        self.h.store.hold()
        pending = [self.send(index) for index in range(MAX_PENDING_COMMANDS)]
        self.assertRaises(TooManyCommands, self.send, "over")
        self.h.store.release()
        self.assertEqual([self.successResultOf(d) for d in pending],
                         [True] * MAX_PENDING_COMMANDS)

    def test_the_refused_session_still_works(self):
        """After a refusal the device's reports are still acknowledged and its session keeps every queued command."""
        self.fill()
        self.assertRaises(TooManyCommands, self.send, "x")
        self.deaf(False)
        self.node.report({"v": 1}, self.h.clock.seconds())
        self.h.run(2.0)
        self.assertTrue(self.node.idle())
        self.assertEqual(self.h.registry.device("dev").reported, {"v": 1})
        self.assertEqual(len(self.got), MAX_PENDING_COMMANDS)
