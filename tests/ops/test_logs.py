"""The log observer: text or JSON lines, level filtering at run time, and no secrets (broker.logs)."""

import io
import json
import os
import signal
from pathlib import Path

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from broker import tap
from broker.config import LogSettings
from broker.logs import LogControl, ObserverFactory, json_record, make_observer, redact

SECRET = bytes(range(16))
TOKEN = "tok_live_4f9c2e7a1b3d5f60"


def capture(format="text", level="info"):
    """(a Logger publishing to a broker observer, the control, the output stream)."""
    stream = io.StringIO()
    control = LogControl(level)
    publisher = LogPublisher(make_observer(LogSettings(level=level, format=format), control,
                                           stream))
    return Logger(namespace="test", observer=publisher), control, stream


class RedactTests(SynchronousTestCase):
    def test_secret_fields_masked(self):
        """Fields named like secrets are masked, and bytes are never printed, whatever the key."""
        event = {"log_format": "x", "token": TOKEN, "device_secret": "abc", "blob": SECRET,
                 "name": "kitchen"}
        masked = redact(event)
        self.assertEqual(masked["token"], "[redacted]")
        self.assertEqual(masked["device_secret"], "[redacted]")
        self.assertEqual(masked["blob"], "<16 bytes>")
        self.assertEqual(masked["name"], "kitchen")
        self.assertEqual(event["token"], TOKEN, "the caller's event was changed")

    def test_clean_event_not_copied(self):
        """An event without anything to mask passes through as it is (no copy per event)."""
        event = {"log_format": "x", "name": "kitchen", "token_id": "t1"}
        self.assertIs(redact(event), event)


class FormatTests(SynchronousTestCase):
    def test_text_masks_secrets_in_messages(self):
        """A format string naming a secret field renders the mask, in text and in JSON."""
        for format in ("text", "json"):
            log, _, stream = capture(format)
            log.info("provisioned {name} with {secret} using {token}", name="kitchen",
                     secret=SECRET, token=TOKEN)
            output = stream.getvalue()
            self.assertIn("kitchen", output)
            self.assertNotIn(TOKEN, output)
            self.assertNotIn(repr(SECRET), output)
            self.assertNotIn(SECRET.hex(), output)

    def test_json_lines(self):
        """JSON format writes one object per line with time, level, namespace, message and fields."""
        log, _, stream = capture("json")
        log.info("device {name} online", name="kitchen", rtt=0.012)
        log.warn("second")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "test")
        self.assertEqual(first["message"], "device kitchen online")
        self.assertEqual((first["name"], first["rtt"]), ("kitchen", 0.012))
        self.assertTrue(first["time"].endswith("Z"))
        self.assertEqual(json.loads(lines[1])["level"], "warn")

    def test_json_failure_and_odd_values(self):
        """A logged failure carries its traceback; values JSON cannot hold become text."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = json_record({"log_format": "boom {thing}", "log_level": LogLevel.error,
                              "log_namespace": "n", "log_time": 0.0, "log_failure": failure,
                              "thing": object, "message": "clash"})
        self.assertIn("ZeroDivisionError", record["failure"])
        self.assertEqual(record["thing"], str(object))
        self.assertEqual(record["message_"], "clash")
        json.dumps(record)


class LevelTests(SynchronousTestCase):
    def test_level_filters_and_changes_at_run_time(self):
        """Events below the level are dropped; set_level changes that without a new observer."""
        log, control, stream = capture("json", level="warn")
        log.info("hidden")
        log.error("shown")
        control.set_level("debug")
        log.debug("now shown")
        messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
        self.assertEqual(messages, ["shown", "now shown"])
        self.assertEqual(control.level, "debug")


class TwistdLoggerTests(SynchronousTestCase):
    def setUp(self):
        # An observer writing to a --logfile installs a process-wide SIGUSR1 handler.
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def parse(self, *argv, config=""):
        path = self.mktemp()
        Path(path).write_text(config)
        options = ServerOptions()
        options.parseOptions([*argv, "broker", "--config", path])
        return options

    def test_broker_observer_chosen(self):
        """Under twistd the broker's options hand over an observer factory with the config's format."""
        options = self.parse("--nodaemon", config='[log]\nformat = "json"\nlevel = "warn"\n')
        factory = options.subOptions["log_factory"]
        self.assertIsInstance(factory, ObserverFactory)
        self.assertEqual((factory.settings.format, factory.path), ("json", None))
        self.assertEqual(options.subOptions["log_control"].level, "warn")

    def test_logfile_respected(self):
        """twistd --logfile makes the broker's observer write to that file."""
        path = self.mktemp()
        options = self.parse("--nodaemon", "--logfile", path)
        observer = options.subOptions["log_factory"]()
        Logger(namespace="t", observer=observer).info("to the file")
        self.assertIn("to the file", Path(path).read_text())

    def test_logfile_private_and_rotated_on_sigusr1(self):
        """--logfile is created 0600 (the first-run URL carries a token) and SIGUSR1 rotates it, as twistd's own does."""
        path = self.mktemp()
        options = self.parse("--nodaemon", "--logfile", path)
        factory = options.subOptions["log_factory"]
        queued = []
        factory.call_from_thread = queued.append
        log = Logger(namespace="t", observer=factory())
        log.info("before the rotation")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        handler = signal.getsignal(signal.SIGUSR1)
        self.assertTrue(callable(handler), "SIGUSR1 would kill the broker")
        handler(signal.SIGUSR1, None)
        for call in queued:
            call()
        log.info("after the rotation")
        self.assertIn("before the rotation", Path(path + ".1").read_text())
        self.assertNotIn("before the rotation", Path(path).read_text())
        self.assertIn("after the rotation", Path(path).read_text())

    def test_explicit_logger_wins(self):
        """An operator's --logger (or --syslog) keeps twistd's choice: the broker adds no observer."""
        options = self.parse("--nodaemon", "--logger", "twisted.logger.textFileLogObserver")
        self.assertIsNone(options.subOptions["log_factory"])

    def test_service_gives_observer_to_application(self):
        """makeService's service sets the observer as the Application's ILogObserver for AppLogger."""
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        options = self.parse("--nodaemon", config=f'[broker]\ndata_dir = "{self.mktemp()}"\n'
                                                  '[registry]\nbackend = "memory"\n')
        service = tap.makeService(options.subOptions)
        application = Application("broker")
        service.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), service.log_observer)
        self.assertIsNotNone(service.log_observer)
