"""With [broker] workers, the workers' log lines reach the supervisor's log.

A worker writes JSON records on its stdout (a pipe); the supervisor turns
each line, and each line of the worker's stderr, into an event of its own
tagged with the worker's index (broker.logs.WorkerLogRelay), so they go to
its --logfile (a daemon's stdout is /dev/null) or its stdout. In process
first, then a real `twistd broker --logfile` with two workers on Redis.
"""

import io
import os
import re
import stat
import sys

from twisted.internet import defer, reactor
from twisted.logger import (LogLevel, Logger, formatEvent, formatEventAsClassicLogText,
                            globalLogPublisher)
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.config import load_config
from broker.logs import LogControl, WorkerLogRelay, json_record, make_relay_observer
from broker.workers import SupervisorService
from tests.ops.test_lifecycle import wait_until
from tests.ops.test_process import TWISTD, BrokerProcess, write_config


def worker_output(*events, level="info"):
    """The bytes a worker's relay observer writes for events (logged with Logger kwargs)."""
    stream = io.StringIO()
    observer = make_relay_observer(LogControl(level), stream)
    log = Logger(namespace="broker.service", observer=observer)
    for method, text, fields in events:
        if method == "failure":
            try:
                raise ValueError("the store said no")
            except ValueError:
                log.failure(text, **fields)
        else:
            getattr(log, method)(text, **fields)
    return stream.getvalue().encode("utf-8")


class WorkerLogRelayTests(SynchronousTestCase):
    """A worker's records become the supervisor's events, tagged, whatever the chunking."""

    def relay(self, index=3):
        events = []
        return WorkerLogRelay(index, publish=events.append), events

    def test_records_become_events_tagged_with_the_worker_index(self):
        """Level, namespace, message and fields survive the pipe; the text line says
        "[worker 3 ...]" and the JSON record has "worker": 3, bytes split anywhere."""
        data = worker_output(("info", "broker ready: {status}", {"status": "serving"}),
                             ("debug", "not at info", {}),
                             ("warn", "First run: open {dashboard_url}",
                              {"dashboard_url": "http://127.0.0.1:1/#token=t"}))
        relay, events = self.relay()
        for start in range(0, len(data), 7):
            relay.received(1, data[start:start + 7])
        self.assertEqual([event["log_level"] for event in events], [LogLevel.info, LogLevel.warn])
        self.assertEqual(formatEvent(events[0]), "broker ready: serving")
        self.assertEqual(events[0]["log_namespace"], "broker.service")
        self.assertIn("[worker 3 broker.service#info] broker ready: serving",
                      formatEventAsClassicLogText(events[0]))
        record = json_record(events[1])
        self.assertEqual((record["worker"], record["level"], record["namespace"]),
                         (3, "warn", "broker.service"))
        self.assertEqual(record["dashboard_url"], "http://127.0.0.1:1/#token=t")
        self.assertIn("#token=t", record["message"])

    def test_secrets_are_masked_before_the_pipe_and_failures_keep_their_traceback(self):
        """A secret field never crosses the pipe, and a logged failure arrives with the
        worker's traceback, which the text and JSON formats print."""
        data = worker_output(("info", "token {token} used", {"token": "s3cret"}),
                             ("failure", "write failed for {name}", {"name": "pump-1"}))
        self.assertNotIn(b"s3cret", data)
        relay, events = self.relay()
        relay.received(1, data)
        self.assertEqual(formatEvent(events[0]), "token [redacted] used")
        self.assertEqual(events[1]["log_level"], LogLevel.critical)
        text = formatEventAsClassicLogText(events[1])
        self.assertIn("write failed for pump-1", text)
        self.assertIn("ValueError: the store said no", text)
        self.assertIn("ValueError: the store said no", json_record(events[1])["failure"])

    def test_stderr_and_unfinished_lines(self):
        """stderr lines (a refusal, a traceback) are error events; a line without its
        newline is logged when the pipe closes; stray stdout text is an info event."""
        relay, events = self.relay(index=1)
        relay.received(2, b"broker worker 1: broker.toml: [brokr]: unknown section\nTrace")
        relay.received(2, b"back (most recent call last):")
        relay.received(1, b"printed by someone\n")
        relay.closed(2)
        self.assertEqual([(formatEvent(e), e["log_level"], e["worker"]) for e in events], [
            ("broker worker 1: broker.toml: [brokr]: unknown section", LogLevel.error, 1),
            ("printed by someone", LogLevel.info, 1),
            ("Traceback (most recent call last):", LogLevel.error, 1)])
        self.assertIn("[worker 1 stderr]", formatEventAsClassicLogText(events[0]))


class RecordingClock:
    """Wraps the stand-in WorkerClock, keeping the arguments of every spawn."""

    def __init__(self, clock):
        self.clock = clock
        self.spawns = []

    def __getattr__(self, name):
        return getattr(self.clock, name)

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        self.spawns.append((args, dict(childFDs)))
        return self.clock.spawnProcess(protocol, executable, args, env, childFDs)


class SupervisorRelayTests(SynchronousTestCase):
    """The supervisor reads its workers' stdout and stderr into its own log."""

    def test_workers_write_through_pipes_into_the_supervisors_log(self):
        """Workers get pipes as stdout and stderr (not the supervisor's descriptors) and
        --log-relay; what they write is logged by the supervisor with their index."""
        from tests.scale.test_supervision import WorkerClock

        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write('[registry]\nbackend = "redis"\n[http]\nendpoint = '
                         '"tcp:0:interface=127.0.0.1"\n[ssp]\nport = 0\n[broker]\nworkers = 2\n')
        clock = RecordingClock(WorkerClock())
        supervisor = SupervisorService(load_config(path), path, reactor=clock)
        supervisor.startService()
        self.addCleanup(self.stop, supervisor, clock.clock)
        for args, fds in clock.spawns:
            self.assertIn("--log-relay", args)
            self.assertEqual((fds[1], fds[2]), ("r", "r"))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        supervisor.workers[1].childDataReceived(
            1, worker_output(("info", "broker ready: {status}", {"status": "serving"})))
        supervisor.workers[0].childDataReceived(2, b"broker worker 0: no Redis\n")
        relayed = [(event["worker"], formatEvent(event)) for event in events if "worker" in event]
        self.assertEqual(relayed, [(1, "broker ready: serving"), (0, "broker worker 0: no Redis")])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def stop(self, supervisor, clock):
        stopped = supervisor.stopService()
        clock.advance(supervisor.config.broker.stop_timeout + 5.0)
        clock.advance(0)
        self.successResultOf(stopped)


class TwistdLogfileTests(TestCase):
    """A real `twistd --nodaemon --logfile=F broker` with two workers on Redis."""

    timeout = 120

    @defer.inlineCallbacks
    def test_worker_lines_reach_the_logfile_tagged(self):
        """Both workers' "broker ready" lines and the first-run dashboard line reach the
        --logfile (mode 0600), tagged "[worker N ...]", and nothing reaches stdout."""
        from tests.scale.redis_support import start_single

        url = start_single(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = write_config(directory, os.path.join(directory, "data"),
                              broker={"workers": 2}, log={"format": "text", "level": "info"},
                              registry={"backend": "redis", "redis_url": url})
        logfile = os.path.join(directory, "broker.log")
        process = BrokerProcess()
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        reactor.spawnProcess(process, sys.executable,
                             [sys.executable, *TWISTD, "--nodaemon", "--pidfile=",
                              f"--logfile={logfile}", "broker", "--config", config],
                             env=environ, path=directory, childFDs={0: "w", 1: "r", 2: "r"})
        self.addCleanup(lambda: process.ended.called or process.signal("KILL"))

        def lines(word):
            if not os.path.exists(logfile):
                return []
            with open(logfile, encoding="utf-8") as handle:
                return [line for line in handle if word in line]
        yield wait_until(lambda: len(lines("broker ready")) == 2 and lines("First run"),
                         timeout=60)
        process.signal("TERM")
        exit_code, _ = yield process.ended
        self.assertEqual(exit_code, 0, process.output.decode(errors="replace")[-2000:])
        tags = sorted(re.search(r"\[worker (\d+) broker\.service#info\] broker ready", line)
                      .group(1) for line in lines("broker ready"))
        self.assertEqual(tags, ["0", "1"])
        self.assertTrue(all("[worker " in line for line in lines("First run")))
        self.assertEqual(stat.S_IMODE(os.stat(logfile).st_mode), 0o600)
        self.assertNotIn(b"broker ready", bytes(process.output))
        self.assertNotIn(b"First run", bytes(process.output))
        self.assertTrue(any("[worker " in line for line in lines("stopped: store committed")))
