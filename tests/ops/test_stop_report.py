"""Tests for the broker's last line on stop (broker.service): it claims a committed
store only when the store holds every change, and names the devices it lost."""

import os
import sqlite3

from twisted.application.service import Application
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker import service as service_module
from broker.registry import errors
from broker.registry.database import DB_NAME
from tests.helpers import loopback_config, start_broker


class StopReportTests(TestCase):
    """A broker over SQLite stopped on the real reactor, its log lines captured."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        config = loopback_config(self, ssp={"enabled": False}, broker={"stop_timeout": 2.0})
        self.running = yield start_broker(self, config)
        self.service = self.running.service
        self.registry = self.service.registry
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.exits = []
        self.patch(service_module, "exit_with_status_at_exit", self.exits.append)

    def break_storage(self):
        """Make every write of a device's row fail, as a full disk would."""
        conn = sqlite3.connect(os.path.join(self.service.data_dir, DB_NAME), isolation_level=None)
        self.addCleanup(conn.close)
        conn.execute("CREATE TRIGGER full_disk BEFORE UPDATE ON devices"
                     " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        return conn

    def last_line(self):
        """(level, text) of the stop's last line."""
        lines = [(event["log_level"], formatEvent(event)) for event in self.events
                 if event.get("log_namespace") == "broker.service"]
        self.assertTrue(lines and lines[-1][1].startswith("stopped"), lines)
        return lines[-1]

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
