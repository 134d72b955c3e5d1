"""Tests for broker.node.run: stdin lines become reports, and nothing read is lost silently."""

import io

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from broker.node.backlog import MAX_EVENT_BYTES, MAX_VALUES_BYTES, BacklogFull
from broker.node.client import SSPNode
from broker.node.run import Input, parse_line
from broker.node.session_ids import SessionIds


class FakeNode:
    """Records what Input hands to the node."""

    def __init__(self):
        self.reports = []
        self.events = []

    def report(self, values):
        self.reports.append(values)

    def emit(self, *events):
        self.events.extend(events)

    def update(self, values, events):
        if values:
            self.report(values)
        self.emit(*events)


class BoundedNode(FakeNode):
    """A node whose backlog holds ``capacity`` events; ``acknowledge`` frees room."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity
        self.held = 0

    @property
    def backlog(self):
        return self.held

    def update(self, values, events):
        if self.held + len(events) > self.capacity:
            raise BacklogFull("backlog full")
        self.held += len(events)
        super().update(values, events)

    def acknowledge(self, count):
        self.held = max(0, self.held - count)


class Producer:
    """StandardIO's producer half, as Input drives it: paused or reading."""

    def __init__(self):
        self.paused = False
        self.pauses = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False


class InputTests(SynchronousTestCase):
    """stdin as a byte stream: lines however they are split, bad ones skipped with a message."""

    def setUp(self):
        self.node = FakeNode()
        self.err = io.StringIO()
        self.ended = []
        self.input = Input(self.node, self.err, lambda: self.ended.append(True))

    def test_lines_split_anywhere(self):
        """Lines cut across reads, and CRLF endings, give the same reports."""
        self.input.dataReceived(b'{"a": 1}\r\n{"b"')
        self.input.dataReceived(b': 2}\n\n')
        self.assertEqual(self.node.reports, [{"a": 1}, {"b": 2}])
        self.assertEqual(self.err.getvalue(), "")

    def test_last_line_without_newline_is_reported(self):
        """A last line without a line end (printf, echo -n) is reported at end of input."""
        self.input.dataReceived(b'{"a": 1}\n{"b": 2}')
        self.input.connectionLost()
        self.assertEqual(self.node.reports, [{"a": 1}, {"b": 2}])
        self.assertEqual(self.ended, [True])

    def test_overlong_line_is_skipped_and_input_goes_on(self):
        """A line over MAX_LINE bytes is skipped with one message; the lines after it count."""
        self.input.dataReceived(b'{"big": "' + b"x" * Input.MAX_LINE)
        self.input.dataReceived(b"x" * 1000)
        self.input.dataReceived(b'"}\n{"after": 1}\n')
        self.input.connectionLost()
        self.assertEqual(self.node.reports, [{"after": 1}])
        self.assertEqual(self.err.getvalue().count("line skipped"), 1)
        self.assertIn("longer than", self.err.getvalue())
        self.assertEqual(self.ended, [True])

    def test_overlong_complete_line_is_skipped(self):
        """A too long line that arrives whole in one read is skipped too."""
        self.input.dataReceived(b'{"big": "' + b"x" * Input.MAX_LINE + b'"}\n{"after": 1}\n')
        self.assertEqual(self.node.reports, [{"after": 1}])
        self.assertIn("longer than", self.err.getvalue())

    def test_non_utf8_line_is_skipped(self):
        """A line that is not UTF-8 is skipped with a message, never reported mangled."""
        self.input.dataReceived(b'{"t": "\xff"}\n{"ok": 1}\n')
        self.assertEqual(self.node.reports, [{"ok": 1}])
        self.assertIn("UTF-8", self.err.getvalue())

    def test_bad_event_skips_the_whole_line(self):
        """A line whose event cannot be sent reports none of its values either."""
        self.input.dataReceived(b'{"t": 1, "$event": ' + b"[" * 40 + b"]" * 40 + b'}\n')
        self.assertEqual(self.node.reports, [])
        self.assertIn("line skipped", self.err.getvalue())

    def test_too_deeply_nested_line_is_skipped_and_input_goes_on(self):
        """A line nested too deep for the JSON parser is skipped with a message, and the
        lines after it still count (no exception ends the input)."""
        self.input.dataReceived(b"[" * 100_000 + b"]" * 100_000 + b'\n{"ok": 1}\n')
        self.input.connectionLost()
        self.assertEqual(self.node.reports, [{"ok": 1}])
        self.assertIn("line skipped", self.err.getvalue())
        self.assertIn("nested", self.err.getvalue())
        self.assertEqual(self.ended, [True])

    def test_skipped_lines_are_counted(self):
        """Every skipped line counts in ``skipped`` (the exit status tells of them);
        blank lines are not skipped lines."""
        self.input.dataReceived(b'{"a": 1}\nnot json\n\n{"$evnt": 1}\n{"b": 2}\n')
        self.assertEqual(self.input.skipped, 2)
        self.assertEqual(self.node.reports, [{"a": 1}, {"b": 2}])

    def test_events_are_emitted(self):
        """$event and $events of a line are emitted in order, after its values."""
        self.input.dataReceived(b'{"t": 1, "$event": "a", "$events": ["b"]}\n')
        self.assertEqual(self.node.reports, [{"t": 1}])
        self.assertEqual(self.node.events, ["a", "b"])


class BackPressureTests(SynchronousTestCase):
    """A full backlog pauses the reading of stdin; no line read is dropped."""

    def setUp(self):
        self.node = BoundedNode(capacity=2)
        self.err = io.StringIO()
        self.ended = []
        self.clock = Clock()
        self.producer = Producer()
        self.input = Input(self.node, self.err, lambda: self.ended.append(True),
                           clock=self.clock)
        self.input.makeConnection(self.producer)

    def test_full_backlog_pauses_input_and_every_line_is_taken_later(self):
        """Lines a full backlog refuses wait, in order, with reading paused; as
        acknowledgements make room they are taken and reading resumes: nothing is
        skipped."""
        self.input.dataReceived(b"".join(b'{"$event": %d}\n' % i for i in range(5)))
        self.assertEqual(self.node.events, [0, 1])
        self.assertTrue(self.producer.paused)
        self.assertEqual(self.input.waiting, 3)
        self.input.dataReceived(b'{"$event": 5}\n')  # (read before the pause took hold)
        self.clock.advance(Input.RETRY)
        self.assertEqual(self.node.events, [0, 1])   # no room yet: nothing tried
        self.node.acknowledge(2)
        self.clock.advance(Input.RETRY)
        self.assertEqual(self.node.events, [0, 1, 2, 3])
        self.assertTrue(self.producer.paused)
        self.node.acknowledge(2)
        self.clock.advance(Input.RETRY)
        self.node.acknowledge(2)
        self.clock.advance(Input.RETRY)
        self.assertEqual(self.node.events, list(range(6)))
        self.assertFalse(self.producer.paused)
        self.assertEqual((self.input.waiting, self.input.skipped), (0, 0))
        self.assertEqual(self.err.getvalue(), "")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_end_of_input_waits_for_the_lines_held(self):
        """End of input while lines wait for room ends the input only once they are all
        taken, the last line without a line end included."""
        self.input.dataReceived(b'{"$event": 0}\n{"$event": 1}\n{"$event": 2}\n{"$event": 3}')
        self.input.connectionLost()
        self.assertEqual(self.ended, [])
        self.node.acknowledge(2)
        self.clock.advance(Input.RETRY)
        self.assertEqual(self.node.events, [0, 1, 2, 3])
        self.assertEqual(self.ended, [True])

    def test_a_line_that_can_never_fit_is_skipped(self):
        """A line with more events than the whole backlog holds is skipped with a message
        once the backlog is empty (waiting longer would never help); the lines after it
        are taken."""
        self.input.dataReceived(b'{"$event": 0}\n{"$events": [1, 2, 3]}\n{"$event": 4}\n')
        self.assertEqual(self.node.events, [0])
        self.node.acknowledge(1)
        self.clock.advance(Input.RETRY)
        self.assertEqual(self.node.events, [0, 4])
        self.assertEqual(self.input.skipped, 1)
        self.assertIn("backlog full", self.err.getvalue())
        self.assertFalse(self.producer.paused)

    def test_stopping_leaves_the_waiting_lines_counted(self):
        """Lines still waiting when the node stops (a signal) are counted in ``waiting``
        (the exit status tells of them) and never taken afterwards."""
        self.input.dataReceived(b'{"$events": [0, 1]}\n{"$event": 2}\n{"$event": 3}\n')
        self.input.stop()
        self.node.acknowledge(2)
        self.clock.advance(Input.RETRY)
        self.assertEqual(self.node.events, [0, 1])
        self.assertEqual(self.input.waiting, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class NodeLimitTests(SynchronousTestCase):
    """Input lines a real node cannot send (no sockets: a memory reactor)."""

    def test_a_line_over_the_node_limits_is_skipped_and_later_lines_count(self):
        """A line whose values, or one of whose events, exceed what one SSP state may
        carry is skipped whole with one message each; the lines after it are reported."""
        clock = MemoryReactorClock()
        node = SSPNode(7, bytes(16), ("127.0.0.1", 1), reactor=clock, now=clock.seconds,
                       session_ids=SessionIds(None))
        err = io.StringIO()
        lines = Input(node, err, lambda: None)
        big_value = b"x" * (MAX_VALUES_BYTES + 1)
        big_event = b"y" * (MAX_EVENT_BYTES + 1)
        lines.dataReceived(b'{"big": "' + big_value + b'"}\n'
                           b'{"t": 1, "$event": "' + big_event + b'"}\n'
                           b'{"later": 2, "$event": "ok"}\n')
        self.assertEqual(dict(node.session.state.values), {"later": 2})
        self.assertEqual(node.session.state.events_since(0), ("ok",))
        self.assertEqual(err.getvalue().count("line skipped"), 2)
        self.assertIn(str(MAX_VALUES_BYTES), err.getvalue())

    def test_a_line_the_registry_would_refuse_is_skipped_and_others_count(self):
        """A line with a key the registry refuses is skipped with a message naming the
        key, and never joins the state: the lines around it are reported, and no later
        state (a new session's first carries the whole map) carries it."""
        clock = MemoryReactorClock()
        node = SSPNode(7, bytes(16), ("127.0.0.1", 1), reactor=clock, now=clock.seconds,
                       session_ids=SessionIds(None))
        err = io.StringIO()
        lines = Input(node, err, lambda: None)
        lines.dataReceived(b'{"humidity": 40}\n{"temp C": 21.5}\n{"pressure": 1013}\n'
                           b'{"blob": "' + b"x" * 9000 + b'"}\n')
        self.assertEqual(dict(node.session.state.values), {"humidity": 40, "pressure": 1013})
        self.assertEqual(lines.skipped, 2)
        self.assertIn("line skipped: key 'temp C'", err.getvalue())
        self.assertIn("8192", err.getvalue())


class ParseLineTests(SynchronousTestCase):
    """One input line: a JSON object, standard JSON only."""

    def test_non_finite_numbers_are_refused(self):
        """NaN, Infinity and numbers too large for a float are refused, as the registry would."""
        for bad in ('{"t": NaN}', '{"t": Infinity}', '{"t": -Infinity}', '{"t": 1e400}',
                    '{"t": [1, {"u": -1e999}]}'):
            error = self.assertRaises(ValueError, parse_line, bad)
            self.assertIn("finite", str(error))
        self.assertEqual(parse_line('{"t": 1.5e300}'), ({"t": 1.5e300}, []))

    def test_unknown_dollar_keys_are_refused(self):
        """A $ key other than $event / $events (a typo) is refused, not reported as a value."""
        error = self.assertRaises(ValueError, parse_line, '{"t": 1, "$evnt": "boot"}')
        self.assertIn("$evnt", str(error))

    def test_bytes_travel_as_the_api_writes_them(self):
        """{"$bytes": base64} is bytes, in values and events, as in the HTTP API;
        text that is not base64 is refused with what is wrong."""
        self.assertEqual(parse_line('{"blob": {"$bytes": "AAEC"}, "$event": {"$bytes": "/w=="}}'),
                         ({"blob": b"\x00\x01\x02"}, [b"\xff"]))
        self.assertEqual(parse_line('{"m": {"$bytes": "AA==", "x": 1}}'),
                         ({"m": {"$bytes": "AA==", "x": 1}}, []))       # not the one-key form
        error = self.assertRaises(ValueError, parse_line, '{"blob": {"$bytes": "not base64!"}}')
        self.assertIn("base64", str(error))

    def test_unpaired_surrogates_are_refused(self):
        """A \\ud800 escape (valid JSON, not Unicode) in a key, value or event is refused:
        such text cannot be sent, and would stop the node's sending for good."""
        for bad in ('{"t": "\\ud800"}', '{"\\udc00": 1}', '{"t": ["ok", {"u": "\\udfff"}]}',
                    '{"$event": "\\ud83d"}'):
            error = self.assertRaises(ValueError, parse_line, bad)
            self.assertIn("surrogate", str(error))
        self.assertEqual(parse_line('{"t": "\\ud83d\\ude00"}'), ({"t": "\U0001f600"}, []))
