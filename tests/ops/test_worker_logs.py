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
import subprocess
import sys
import threading

from twisted.internet import defer, reactor
from twisted.logger import (LogLevel, Logger, formatEvent, formatEventAsClassicLogText,
                            globalLogPublisher)
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.config import load_config
from broker.logs import (LogControl, WorkerLogRelay, dropped_lines_record, json_record,
                         make_relay_observer)
from broker.worker import PipeWriter
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


class WriterReactor:
    """The part of a reactor a PipeWriter uses: the writers it watches, and the calls
    handed over from other threads (run by run_handed_over)."""

    def __init__(self):
        self.writers = set()
        self.handed_over = []

    def addWriter(self, writer):
        self.writers.add(writer)

    def removeWriter(self, writer):
        self.writers.discard(writer)

    def callFromThread(self, function, *args):
        self.handed_over.append((function, args))

    def run_handed_over(self):
        calls, self.handed_over = self.handed_over, []
        for function, args in calls:
            function(*args)


def read_all(fd):
    """Everything waiting in the non-blocking read end of a pipe."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class PipeWriterTests(SynchronousTestCase):
    """A worker's log relay never blocks on a supervisor that does not read its pipe."""

    def pipe(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        os.set_blocking(read_end, False)
        return read_end, write_end

    def reentering(self, writer, inner=b"inner\n"):
        """Make the writer's next pipe write log a line first, from within, as the
        garbage collector (a Deferred's __del__) or a signal handler may."""
        write = writer._write
        entered = []

        def reentrant(data):
            if not entered:
                entered.append(writer.write_line(inner))
            return write(data)
        writer._write = reentrant
        return entered

    def test_a_line_logged_from_within_a_write_waits_its_turn(self):
        """A log call made on the writing thread while it writes (GC, a signal) neither
        waits for ever on the writer's own lock nor cuts the line being written: it
        comes out whole, right after it."""
        read_end, write_end = self.pipe()
        reactor = WriterReactor()
        writer = PipeWriter(reactor, write_end)
        entered = self.reentering(writer)
        # On a thread of its own, so that a deadlock fails the test instead of hanging it.
        thread = threading.Thread(target=writer.write_line, args=(b"outer line\n",),
                                  daemon=True)
        thread.start()
        thread.join(10)
        self.assertFalse(thread.is_alive(), "the writer waited on its own lock")
        self.assertEqual(entered, [True])
        reactor.run_handed_over()
        data = read_all(read_end)
        while reactor.writers:
            writer.doWrite()
            data += read_all(read_end)
        self.assertEqual(data, b"outer line\ninner\n")

    def test_a_write_that_raises_leaves_its_nested_line_watched(self):
        """Should a write raise after a line was logged from within it, that line still
        waits with the pipe watched, never pending unwatched for good."""
        read_end, write_end = self.pipe()
        reactor = WriterReactor()
        writer = PipeWriter(reactor, write_end)

        def raising(data):
            writer.write_line(b"nested\n")
            raise RuntimeError("a signal handler that raised")
        writer._write = raising
        self.assertRaises(RuntimeError, writer.write_line, b"outer\n")
        self.assertEqual((bytes(writer._pending), reactor.writers), (b"nested\n", {writer}))

    def test_a_line_logged_from_within_a_drain_is_written_too(self):
        """A line logged from within doWrite (the pipe draining) is not left behind with
        the writer unwatched: it goes out with the next writable pipe."""
        read_end, write_end = self.pipe()
        reactor = WriterReactor()
        writer = PipeWriter(reactor, write_end, backlog=1 << 20)
        chunk = b"y" * 4095 + b"\n"
        while writer._pending == bytearray():
            writer.write_line(chunk)                 # until the pipe is full
        self.assertEqual(reactor.writers, {writer})
        read_all(read_end)
        self.reentering(writer, b"from the drain\n")
        out = []

        def drain():
            for _ in range(100):
                if not reactor.writers:
                    break
                writer.doWrite()
                reactor.run_handed_over()       # (this thread is not the reactor's)
                out.append(read_all(read_end))
        thread = threading.Thread(target=drain, daemon=True)   # a deadlock fails, not hangs
        thread.start()
        thread.join(10)
        self.assertFalse(thread.is_alive(), "the writer waited on its own lock")
        data = b"".join(out)
        self.assertEqual(reactor.writers, set())
        self.assertTrue(data.endswith(b"from the drain\n"), data[-40:])

    def test_a_pipe_nobody_reads_costs_lines_not_the_reactor(self):
        """Logging 3000 lines (600 KB) into a pipe nobody reads returns each time: the
        pipe and a 16 KiB backlog fill, the rest is dropped and counted; once the
        supervisor reads again the backlog goes out whole, then a warning saying how
        many lines were dropped, and every line relays as a whole record."""
        read_end, write_end = self.pipe()
        reactor = WriterReactor()
        writer = PipeWriter(reactor, write_end, backlog=16384, notice=dropped_lines_record)
        self.assertFalse(os.get_blocking(write_end))
        log = Logger(namespace="broker.web.site.BrokerSite",
                     observer=make_relay_observer(LogControl("debug"), writer))
        for number in range(3000):
            log.debug("GET /healthz answered 200 ({number}) " + "x" * 150, number=number)
        self.assertGreater(writer.dropped, 0)
        self.assertEqual(writer.dropped, writer.dropped_total)
        self.assertEqual(reactor.writers, {writer})
        dropped = writer.dropped
        data = read_all(read_end)
        while reactor.writers:
            writer.doWrite()
            data += read_all(read_end)
        events = []
        relay = WorkerLogRelay(2, publish=events.append)
        relay.received(1, data)
        relay.closed(1)
        numbers = [event["number"] for event in events[:-1]]
        self.assertEqual(numbers, list(range(len(numbers))))
        self.assertEqual(len(numbers) + dropped, 3000)
        self.assertEqual(formatEvent(events[-1]),
                         f"{dropped} log lines dropped: the supervisor did not read")
        self.assertEqual((events[-1]["log_level"], events[-1]["worker"]), (LogLevel.warn, 2))
        self.assertEqual((writer.dropped, writer.dropped_total), (0, dropped))

    def test_a_line_the_pipe_took_in_part_is_finished_not_dropped(self):
        """A line larger than what the pipe has room for is written in part and its rest
        kept, whatever the backlog: the supervisor never reads half a record."""
        read_end, write_end = self.pipe()
        reactor = WriterReactor()
        writer = PipeWriter(reactor, write_end, backlog=10)
        line = b"y" * 200_000 + b"\n"
        self.assertTrue(writer.write_line(line))
        self.assertFalse(writer.write_line(b"next\n"))
        data = b""
        while reactor.writers:
            data += read_all(read_end)
            writer.doWrite()
        data += read_all(read_end)
        self.assertEqual(data, line)
        self.assertEqual(writer.dropped_total, 1)

    def test_a_thread_hands_the_watch_to_the_reactor_thread(self):
        """A line logged from another thread that the pipe cannot take at once asks the
        reactor thread to watch the pipe (callFromThread), never the reactor directly."""
        read_end, write_end = self.pipe()
        reactor = WriterReactor()
        writer = PipeWriter(reactor, write_end)
        line = b"z" * 100_000 + b"\n"
        thread = threading.Thread(target=writer.write_line, args=(line,))
        thread.start()
        thread.join()
        self.assertEqual(reactor.writers, set())
        reactor.run_handed_over()
        self.assertEqual(reactor.writers, {writer})
        data = read_all(read_end)
        writer.doWrite()
        self.assertEqual(data + read_all(read_end), line)
        self.assertEqual(reactor.writers, set())

    def test_a_stopping_worker_flushes_what_waits_within_a_bound(self):
        """After the reactor stopped, flush_now writes the backlog once the supervisor
        reads, and gives up after its timeout when it does not."""
        read_end, write_end = self.pipe()
        writer = PipeWriter(WriterReactor(), write_end)
        writer.write_line(b"a" * 100_000 + b"\n")
        self.assertFalse(writer.flush_now(timeout=0))
        got = read_all(read_end)
        self.assertTrue(writer.flush_now(timeout=0))
        self.assertEqual(got + read_all(read_end), b"a" * 100_000 + b"\n")

    def test_a_closed_pipe_drops_silently(self):
        """Once the supervisor is gone (EPIPE), lines are dropped without an exception."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        os.close(read_end)
        writer = PipeWriter(WriterReactor(), write_end)
        self.assertFalse(writer.write_line(b"lost\n"))
        self.assertFalse(writer.write_line(b"lost too\n"))


class WorkerSignalTests(SynchronousTestCase):
    """Signals meant for the supervisor do not kill a worker."""

    def test_sigusr1_and_sigint_do_not_kill_a_worker(self):
        """A process that set a worker's signal dispositions survives SIGUSR1 (log
        rotation: `systemctl kill -s USR1` signals every process of the unit) and SIGINT."""
        code = ("import os, signal; from broker.worker import ignore_supervisor_signals; "
                "ignore_supervisor_signals(); os.kill(os.getpid(), signal.SIGUSR1); "
                "os.kill(os.getpid(), signal.SIGINT); print('alive')")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        process = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                 timeout=60, cwd=root, stdin=subprocess.DEVNULL,
                                 env=dict(os.environ, PYTHONPATH=root))
        self.assertEqual((process.returncode, process.stdout), (0, b"alive\n"),
                         process.stderr.decode(errors="replace")[-1000:])


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
