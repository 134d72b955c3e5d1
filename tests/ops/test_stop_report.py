"""Tests for the broker's last line on stop (broker.service): it claims a committed
store only when the store holds every change, and names the devices it lost; and
for the exit status of such a stop, after SIGTERM or SIGINT (broker.lifecycle).
With Redis: tests/scale/test_redis_stop_report.py."""

import os
import signal
import sqlite3

from twisted.application.service import Application
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker import service as service_module
from broker.lifecycle import SignalHandlers
from broker.registry import errors
from broker.registry.admin import AdminDatabase
from broker.registry.database import DB_NAME
from tests.helpers import loopback_config, start_broker
from tests.ops.test_lifecycle import FakeBroker, FakeSignals
from tests.ops.test_process import WAIT, absolute_temp, http_url, request, start, write_config


def break_storage(data_dir, testcase):
    """Make every write of a device's row fail, as a full disk would."""
    conn = sqlite3.connect(os.path.join(data_dir, DB_NAME), isolation_level=None)
    testcase.addCleanup(conn.close)
    conn.execute("CREATE TRIGGER full_disk BEFORE UPDATE ON devices"
                 " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    return conn


class StopCapture:
    """A TestCase mixin: the log lines and the exit status a broker's stop sets."""

    def capture_stop(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.exits = []
        self.patch(service_module, "exit_with_status_at_exit", self.exits.append)

    def last_line(self):
        """(level, text) of the stop's last line."""
        lines = [(event["log_level"], formatEvent(event)) for event in self.events
                 if event.get("log_namespace") == "broker.service"]
        self.assertTrue(lines and lines[-1][1].startswith("stopped"), lines)
        return lines[-1]


class StopReportTests(StopCapture, TestCase):
    """A broker over SQLite stopped on the real reactor, its log lines captured."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        config = loopback_config(self, ssp={"enabled": False}, broker={"stop_timeout": 2.0})
        self.running = yield start_broker(self, config)
        self.service = self.running.service
        self.registry = self.service.registry
        self.capture_stop()

    def break_storage(self):
        return break_storage(self.service.data_dir, self)

    @defer.inlineCallbacks
    def test_clean_stop_says_committed(self):
        """A stop whose commits all succeeded says the store is committed, at info level,
        and leaves the exit status alone."""
        yield self.registry.add_device("pump-1")
        yield self.registry.update_desired("pump-1", {"fan": "on"})
        yield self.service.stopService()
        level, text = self.last_line()
        self.assertEqual(level, LogLevel.info)
        self.assertIn("stopped: store committed and closed after", text)
        self.assertEqual(self.exits, [])

    @defer.inlineCallbacks
    def test_lost_changes_are_named_not_committed(self):
        """When the last try cannot store some devices' changes, the last line is an
        error naming them and the storage error, says the next start is unclean,
        never claims a committed store, and under twistd sets exit status 1."""
        self.service.exit_on_loss = True           # as under twistd's Application
        for name in ("pump-2", "pump-1", "valve"):
            yield self.registry.add_device(name)
        self.break_storage()
        for name in ("pump-2", "pump-1"):
            yield self.assertFailure(self.registry.update_desired(name, {"fan": "on"}),
                                     errors.StoreError)
        yield self.service.stopService()
        level, text = self.last_line()
        self.assertEqual(level, LogLevel.error)
        self.assertNotIn("committed", text)
        self.assertIn("the changes of 2 device(s) could not be stored", text)
        self.assertIn("database or disk is full", text)
        self.assertIn("lost: pump-1, pump-2;", text)
        self.assertIn("the next start is unclean", text)
        self.assertEqual(self.exits, [service_module.UNSTORED])
        self.assertEqual(service_module.UNSTORED, 1)

    @defer.inlineCallbacks
    def test_failed_commit_later_stored_warns_unclean(self):
        """A commit that failed during the run, its change stored since, gives a warning
        that the next start is unclean, the store committed; the exit status is left."""
        self.service.exit_on_loss = True
        yield self.registry.add_device("pump-1")
        broken = self.break_storage()
        yield self.assertFailure(self.registry.update_desired("pump-1", {"fan": "on"}),
                                 errors.StoreError)
        broken.execute("DROP TRIGGER full_disk")
        yield self.registry.update_desired("pump-1", {"fan": "off"})
        yield self.service.stopService()
        level, text = self.last_line()
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("stopped: store committed and closed after", text)
        self.assertIn("the next start is unclean", text)
        self.assertEqual(self.exits, [])


class UnknownReportTests(TestCase):
    """A store that reports nothing of what it holds is never said to be committed."""

    timeout = 30

    @defer.inlineCallbacks
    def test_memory_store_is_not_called_committed(self):
        """The memory store's close fires with None (nothing known): the last line
        says the store closed and that it reports nothing, never "committed"."""
        config = loopback_config(self, ssp={"enabled": False}, registry={"backend": "memory"})
        service = (yield start_broker(self, config)).service
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield service.registry.add_device("pump-1")
        yield service.stopService()
        lines = [(event["log_level"], formatEvent(event)) for event in events
                 if event.get("log_namespace") == "broker.service"]
        level, text = lines[-1]
        self.assertEqual(level, LogLevel.info)
        self.assertTrue(text.startswith("stopped after"), text)
        self.assertIn("store closed (it reports nothing of what it holds)", text)
        self.assertNotIn("committed", text)


class SigintTests(SynchronousTestCase):
    """SIGINT stops the broker as SIGTERM does, so the exit status is the stop's."""

    def installed(self, sigint=None):
        broker, signals = FakeBroker(), FakeSignals()
        if sigint is not None:
            signals.handlers[signal.SIGINT] = sigint
        SignalHandlers(broker, signals).startService()
        broker.reactor.run()
        return broker, signals

    def test_sigint_stops_gracefully_without_an_exit_signal(self):
        """SIGINT (twice) stops the reactor once, through our handler: no exit signal is
        recorded, which twistd would re-raise, killing the process before the exit
        status the stop set."""
        broker, signals = self.installed()
        stops = []
        broker.reactor.stop = lambda: stops.append("stop")
        signals.handlers[signal.SIGINT](signal.SIGINT, None)
        signals.handlers[signal.SIGINT](signal.SIGINT, None)
        self.assertEqual(stops, [], "stopped inside the signal handler")
        broker.reactor.run_thread_calls()
        self.assertEqual(stops, ["stop"])
        self.assertIsNone(getattr(broker.reactor, "_exitSignal", None))

    def test_an_ignored_sigint_stays_ignored(self):
        """A process that ignores SIGINT (a worker: its supervisor stops it) keeps
        ignoring it once the handlers are installed."""
        _, signals = self.installed(sigint=signal.SIG_IGN)
        self.assertIs(signals.handlers[signal.SIGINT], signal.SIG_IGN)
        self.assertNotEqual(signals.handlers[signal.SIGTERM], signal.SIG_IGN)


class LostChangesExitStatusTests(TestCase):
    """A real `twistd broker` (SQLite) whose storage fails, stopped with a signal."""

    timeout = 150

    @defer.inlineCallbacks
    def test_sigint_after_lost_changes_exits_with_status_1(self):
        """SIGINT to a broker whose last try could not store a device's change ends
        with the error line naming the device and exit status 1, not a death by
        SIGINT that hides it."""
        workdir = absolute_temp(self)
        data_dir = os.path.join(workdir, "data")
        admin = AdminDatabase(data_dir, create=True)
        admin.add_device("pump-1")
        _, token = admin.add_token("write")
        admin.close()
        broker = start(self, write_config(workdir, data_dir, ssp={"enabled": False}))
        url = http_url((yield broker.wait_for("broker ready")))
        break_storage(data_dir, self)
        code, _ = yield request("PATCH", url + "/api/v1/devices/pump-1/desired", token,
                                body={"fan": "on"})
        self.assertEqual(code, 503)
        broker.signal("INT")
        ended = yield broker.ended.addTimeout(WAIT, reactor)
        self.assertEqual(ended, (service_module.UNSTORED, None))
        record = yield broker.wait_for("stopped after")
        self.assertIn("could not be stored", record["message"])
        self.assertIn("lost: pump-1;", record["message"])


class UnderTwistdTests(TestCase):
    """Only a broker under twistd's Application sets the process's exit status."""

    timeout = 30

    @defer.inlineCallbacks
    def test_application_parent_sets_exit_on_loss(self):
        """A BrokerService is made to set the exit status on loss only once its parent
        is twistd's Application (tests and other parents keep the process running)."""
        running = yield start_broker(self, loopback_config(self, ssp={"enabled": False}))
        self.assertFalse(running.service.exit_on_loss)
        running.service.setServiceParent(Application("broker"))
        self.assertTrue(running.service.exit_on_loss)


class NameDevicesTests(SynchronousTestCase):
    """The list of lost devices in the last line is bounded."""

    def test_long_list_is_cut_with_a_count(self):
        """Past NAMES_SHOWN names the line gives the first ones and how many more."""
        names = [f"d{i:02}" for i in range(service_module.NAMES_SHOWN + 5)]
        text = service_module.name_devices(names)
        self.assertTrue(text.startswith("d00, d01, "))
        self.assertTrue(text.endswith(f"d{service_module.NAMES_SHOWN - 1:02} and 5 more"))
        self.assertEqual(text.count(","), service_module.NAMES_SHOWN - 1)

    def test_short_list_is_whole(self):
        """Up to NAMES_SHOWN names the line gives them all, with no count."""
        self.assertEqual(service_module.name_devices(["a", "b"]), "a, b")
