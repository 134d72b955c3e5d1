"""Store outages in the log (broker.udp.store_outage_log): one warning when
writes start failing, a summary line per interval while they fail, one line
when they land again after an interval without failure; never a traceback
per device for the store's own errors, nor a pair of lines per failure when
only some writes fail.

Unit tests on a task.Clock with a MemoryStore that fails on demand, and one
integration test with a real redis-server stopped for a few seconds."""

from __future__ import annotations

import os
import signal

from twisted.internet import defer, reactor, task
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import MemoryStore
from broker.registry.errors import StoreError
from broker.udp.store_outage_log import NAMED_DEVICES, StoreOutageLog

from .helpers import Harness

DEVICES = 40
_LOUD = (LogLevel.warn, LogLevel.error, LogLevel.critical)


def store_failure(message="disk full"):
    return Failure(StoreError(message))


def capture_events(testcase) -> list:
    """Every log event from now until the test ends."""
    events = []
    observe = events.append
    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def udp_lines(events) -> list:
    """The events of the UDP endpoint's modules at warning level or above, or with a traceback."""
    return [e for e in events
            if e.get("log_namespace", "").startswith("broker.udp.")
            and (e.get("log_failure") is not None or e.get("log_level") in _LOUD)]


def recoveries(events) -> list:
    return [formatEvent(e) for e in events
            if e.get("log_namespace", "").startswith("broker.udp.store_outage_log")
            and "succeed again" in e.get("log_format", "")]


def unexpected_failure(error):
    """A Failure with a traceback, as an errback gets for a bug's exception."""
    try:
        raise error
    except Exception:
        return Failure()


class OutageStore(MemoryStore):
    """A MemoryStore whose state and session record writes fail while ``failing`` is set."""

    failing = False

    def write(self, op, result=None):
        if self.failing and op[0] in ("state", "session"):
            return defer.fail(StoreError("the disk is failing"))
        return super().write(op, result)


class DeviceOutageStore(MemoryStore):
    """A MemoryStore whose state and session record writes fail for the device
    numbers in ``failing`` (one store shard down), while the others' land."""

    failing = frozenset()

    def write(self, op, result=None):
        number = op[4] if op[0] == "state" else op[1] if op[0] == "session" else None
        if number in self.failing:
            return defer.fail(StoreError("the shard of this device is down"))
        return super().write(op, result)


class StoreOutageLogTests(SynchronousTestCase):
    """The outage log on its own, on a task.Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.events = []
        self.patch(StoreOutageLog, "log", Logger(observer=self.events.append))
        self.outage = StoreOutageLog(self.clock.seconds, interval=10.0)

    def test_first_failure_is_one_warning_with_the_reason(self):
        """The first failure of an outage is one warning naming the write and the store's reason, without a traceback."""
        self.outage.failed(store_failure("Redis failed: connection refused"), "report", "dev-1")
        self.assertEqual(len(self.events), 1)
        event = self.events[0]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIsNone(event.get("log_failure"))
        text = formatEvent(event)
        self.assertIn("report of dev-1", text)
        self.assertIn("Redis failed: connection refused", text)
        self.assertTrue(self.outage.failing)

    def test_failures_of_an_outage_are_summed_up_once_per_interval(self):
        """Ten thousand failures over 25 s are three lines: the first, and a summary
        at 10 s and 20 s whose counts add up to every failure after the first."""
        for second in range(25):
            for i in range(400):
                self.outage.failed(store_failure(), "report", f"dev-{i}")
            self.clock.advance(1.0)
        self.assertEqual(len(self.events), 3)
        # The summaries count every failure after the first one, up to the
        # first of second 20 (the one that logged the second summary).
        self.assertEqual(sum(e["count"] for e in self.events[1:]), 400 * 20)
        self.assertEqual(self.events[-1]["total"], 400 * 20 + 1)
        self.assertTrue(all(e.get("log_failure") is None for e in self.events))

    def test_recovery_is_one_line_and_a_new_outage_warns_again(self):
        """The first success an interval after the last failure logs one line with
        their count and when the last one was; later successes log nothing; a
        failure after it starts a new outage."""
        self.outage.succeeded()
        self.assertEqual(self.events, [])
        for _ in range(5):
            self.outage.failed(store_failure(), "reservation", "dev")
            self.clock.advance(1.0)
        self.clock.advance(9.5)
        self.outage.succeeded()
        self.outage.succeeded()
        self.assertEqual(len(self.events), 2)
        self.assertEqual(self.events[1]["total"], 5)
        self.assertIn("succeed again, none failed in the last 10.5 s: 5 failures in the "
                      "4.0 s", formatEvent(self.events[1]))
        self.assertFalse(self.outage.failing)
        self.outage.failed(store_failure("again"), "report", "dev")
        self.assertEqual(len(self.events), 3)
        self.assertIn("again", formatEvent(self.events[2]))

    def test_unexpected_error_keeps_one_traceback_per_type(self):
        """An exception that is not the store's own is logged with its traceback at
        error level, once per type in an outage, however often it comes."""
        for _ in range(50):
            try:
                raise RuntimeError("a bug")
            except RuntimeError:
                self.outage.failed(Failure(), "report", "dev")
            self.outage.failed(store_failure(), "report", "dev")
        tracebacks = [e for e in self.events if e.get("log_failure") is not None]
        self.assertEqual(len(tracebacks), 1)
        self.assertEqual(tracebacks[0]["log_level"], LogLevel.error)
        self.assertIsInstance(tracebacks[0]["log_failure"].value, RuntimeError)


    def test_success_soon_after_a_failure_does_not_end_the_outage(self):
        """A write landing less than an interval after the last failure logs nothing
        and keeps the outage on; the first one an interval after it ends it."""
        self.outage.failed(store_failure(), "report", "dev-1")
        self.clock.advance(9.9)
        self.outage.succeeded()
        self.assertEqual(len(self.events), 1)
        self.assertTrue(self.outage.failing)
        self.clock.advance(0.1)
        self.outage.succeeded()
        self.assertEqual(len(self.events), 2)
        self.assertFalse(self.outage.failing)

    def test_alternating_failures_and_successes_are_one_outage(self):
        """Writes that fail and land in turn every 0.1 s for 30 s (a partial outage)
        are one warning, a summary every 10 s and one recovery line, not a pair of
        lines per failure."""
        for _ in range(300):
            self.outage.failed(store_failure(), "report", "dev-7")
            self.outage.succeeded()            # another device's write landed
            self.clock.advance(0.1)
        self.clock.advance(10.0)
        self.outage.succeeded()
        levels = [e["log_level"] for e in self.events]
        self.assertEqual(levels, [LogLevel.warn] * 3 + [LogLevel.info], [
            formatEvent(e) for e in self.events])
        self.assertEqual(self.events[-1]["total"], 300)
        summary = formatEvent(self.events[1])
        self.assertIn("devices dev-7;", summary)
        self.assertIn(f"{self.events[1]['landed']} writes landed", summary)
        self.assertGreater(self.events[1]["landed"], 90)

    def test_summary_names_the_first_failing_devices_and_counts_the_rest(self):
        """A summary names the first few devices whose writes failed since the last
        line, each once, and counts the failures of the others."""
        self.outage.failed(store_failure(), "report", "dev-first")
        for _ in range(3):
            for i in range(30):
                self.outage.failed(store_failure(), "report", f"dev-{i}")
        self.outage.failed(store_failure(), "the reports of a turn")
        self.clock.advance(10.0)
        self.outage.failed(store_failure(), "report", "dev-0")
        self.assertEqual(len(self.events), 2)
        text = formatEvent(self.events[1])
        named = ", ".join(f"dev-{i}" for i in range(NAMED_DEVICES))
        self.assertIn(f"devices {named} and {3 * (30 - NAMED_DEVICES) + 1} other writes;",
                      text)
        self.assertNotIn("dev-first", text)     # the warning named it
        self.assertEqual(self.events[1]["count"], 3 * 30 + 2)

    def test_outage_begun_by_another_error_warns_on_its_first_store_error(self):
        """An outage whose first failure is not the store's own (a bug, a removed
        device) still gets its warning with the store's reason at its first
        StoreError, once."""
        self.outage.failed(unexpected_failure(ValueError("a bug")), "report", "dev-1")
        self.outage.failed(store_failure("database is locked"), "report", "dev-2")
        self.outage.failed(store_failure("database is locked"), "report", "dev-3")
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("report of dev-2 not durable): database is locked",
                      formatEvent(warnings[0]))
        self.assertEqual(len([e for e in self.events if e.get("log_failure")]), 1)


class EndpointOutageLogTests(SynchronousTestCase):
    """An endpoint with many devices reporting through a store outage (MemoryStore, task.Clock)."""

    def connected(self, h, count):
        nodes = []
        for i in range(count):
            nodes.append(h.node(h.provision(f"dev-{i}"), address=("127.0.0.2", 40000 + i)))
        h.run(1.0, dt=0.05)
        self.assertTrue(all(node.idle() for node in nodes))
        return nodes

    def test_many_devices_through_an_outage_log_a_bounded_number_of_lines(self):
        """Forty devices reporting through a 25 s outage log a handful of lines (no
        traceback), still count every failed write, and log one recovery line when the
        writes land again, after which every report is acknowledged."""
        store = OutageStore()
        h = Harness(self, store=store)
        nodes = self.connected(h, DEVICES)
        events = capture_events(self)
        counters = h.endpoint.counters
        failures = counters["store_failures"]
        store.failing = True
        for step in range(5):
            now = h.clock.seconds()
            for node in nodes:
                node.report({"step": step}, now)
            h.run(5.0, dt=0.05)
        failed = counters["store_failures"] - failures
        self.assertGreater(failed, 2 * DEVICES)     # each device's report, again and again
        lines = udp_lines(events)
        self.assertLessEqual(len(lines), 4, [formatEvent(e) for e in lines])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(recoveries(events), [])
        store.failing = False
        for _ in range(12):      # the nodes' retransmissions backed off meanwhile
            h.run(5.0, dt=0.05)
            if all(node.idle() for node in nodes):
                break
        self.assertTrue(all(node.idle() for node in nodes))
        h.run(10.0, dt=0.5)     # no failure for an interval: the next write ends the outage
        nodes[0].report({"after": True}, h.clock.seconds())
        h.run(1.0, dt=0.05)
        self.assertEqual(len(recoveries(events)), 1, recoveries(events))
        self.assertEqual(dict(h.registry.device("dev-7").reported), {"step": 4})
        self.assertEqual(counters["store_failures"] - failures, failed)

    def test_one_failing_device_among_many_logs_a_few_lines_naming_it(self):
        """One device whose writes fail for 25 s while nine others report normally
        logs a warning and a summary per 10 s naming it, then one recovery line,
        not a warning and a recovery line for each of its failed writes."""
        store = DeviceOutageStore()
        h = Harness(self, store=store)
        nodes = self.connected(h, 10)
        events = capture_events(self)
        counters = h.endpoint.counters
        failures = counters["store_failures"]
        store.failing = frozenset({h.registry.device("dev-3").device_number})
        for step in range(25):
            for node in nodes:           # each device reports in its own reactor turn
                node.report({"step": step}, h.clock.seconds())
                h.run(0.1, dt=0.05)
        self.assertGreater(counters["store_failures"] - failures, 10)
        store.failing = frozenset()
        for step in range(25, 40):
            for node in nodes:
                node.report({"step": step}, h.clock.seconds())
                h.run(0.1, dt=0.05)
        lines = [formatEvent(e) for e in events
                 if e.get("log_namespace", "").startswith("broker.udp.store_outage_log")]
        self.assertLessEqual(len(lines), 5, lines)
        self.assertEqual(len(recoveries(events)), 1, lines)
        self.assertIn("dev-3", lines[0])
        self.assertTrue(all("dev-3" in line for line in lines[1:-1]), lines)
        h.run(2.0, dt=0.05)
        self.assertTrue(all(node.idle() for node in nodes))


class RedisOutageLogTests(TestCase):
    """A broker on a real redis-server that stops answering for a few seconds."""

    timeout = 60

    @defer.inlineCallbacks
    def test_redis_outage_logs_no_traceback_per_device(self):
        """Twenty real nodes reporting while Redis is stopped for 3 s give no traceback
        and a bounded number of endpoint lines, then one recovery line once writes
        land an interval (here 2 s) after the last failure."""
        from broker.node.client import SSPNode
        from tests.helpers import loopback_config, start_broker
        from tests.scale.redis_support import start_server_process

        port, process = start_server_process(self)
        self.addCleanup(lambda: process.poll() is None and os.kill(process.pid, signal.SIGCONT))
        broker = yield start_broker(self, loopback_config(self, registry={
            "backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0",
            "redis_timeout": 0.5}))
        registry = broker.service.registry
        nodes = []
        for i in range(20):
            dev = yield registry.add_device(f"n{i}")
            node = SSPNode(dev.device_number, dev.secret, ("127.0.0.1", broker.udp_port),
                           heartbeat=1.0, rekey_after=60.0)
            node.start()
            self.addCleanup(node.stop)
            nodes.append(node)
        for node in nodes:
            node.report({"i": 0})
        yield task.deferLater(reactor, 1.0, lambda: None)
        events = capture_events(self)
        endpoint = broker.service.ssp_endpoint
        endpoint.bridge.outage_log.interval = 2.0     # a short quiet time ends the outage
        counters = endpoint.counters
        failures = counters["store_failures"]
        os.kill(process.pid, signal.SIGSTOP)
        for step in range(1, 7):
            for node in nodes:
                node.update({"i": step}, [{"e": step}])
            yield task.deferLater(reactor, 0.5, lambda: None)
        os.kill(process.pid, signal.SIGCONT)
        self.assertGreater(counters["store_failures"] - failures, len(nodes))
        for step in range(100, 140):     # writes keep coming until one ends the outage
            if recoveries(events):
                break
            nodes[0].report({"i": step})
            yield task.deferLater(reactor, 0.25, lambda: None)
        self.assertEqual(len(recoveries(events)), 1)
        lines = udp_lines(events)
        self.assertEqual([e for e in lines if e.get("log_failure") is not None], [])
        self.assertLessEqual(len(lines), 5, [formatEvent(e) for e in lines])
