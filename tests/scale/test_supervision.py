"""The worker supervisor: its restart and give-up rules on a Clock with stand-in
processes, then with real worker processes (python -m broker.worker), and a
real `twistd broker` whose failing worker makes it exit with status 1."""

import errno
import json
import os
import signal
import socket
import sys
import tomllib

import treq
from twisted.application.service import Application
from twisted.internet import defer, error, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker import workers
from broker.config import load_config, parse_config
from broker.steering import reserve_tcp_port
from broker.worker import STATUS_FD, SupervisorPipe, WorkerRestarts
from broker.workers import GAVE_UP, SupervisorService, describe_exit
from tests.ops.test_process import start as start_twistd
from tests.ops.test_systemd import notify_socket

from .redis_support import start_single
from .support import wait_until, write_worker_config

#: lines that make a broker config file unusable (an unknown section).
BROKEN = "\n[brokr]\nworkers = 2\n"


# -- stand-ins for worker processes, on a Clock ---------------------------------------


class StandInProcess:
    """What spawnProcess returns, for a worker that never runs: stdin writes and
    signals are recorded; TERM ends it with status 0 on the next turn."""

    def __init__(self, clock, worker, pid):
        self.clock = clock
        self.worker = worker
        self.pid = pid
        self.stdin = b""
        self.signals = []
        self.gone = False

    def write(self, data):
        self.stdin += data

    def signalProcess(self, name):
        if self.gone:
            raise error.ProcessExitedAlready()
        self.signals.append(name)
        if name == "TERM":
            self.clock.callLater(0, self.exit, 0)

    def exit(self, code=2, number=None):
        """End it: exit status ``code`` (0: ProcessDone), or killed by signal ``number``."""
        if self.gone:
            return    # a second TERM before the first one's exit
        self.gone = True
        reason = (error.ProcessDone(0) if code == 0 and number is None
                  else error.ProcessTerminated(exitCode=None if number else code, signal=number))
        self.worker.processEnded(Failure(reason))

    def ready(self):
        """The worker's first status line: ready."""
        line = json.dumps({"index": self.worker.index, "ready": True}) + "\n"
        self.worker.childDataReceived(STATUS_FD, line.encode())


class WorkerClock(Clock):
    """A Clock that starts stand-in processes and records a reactor stop."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.stopped = False
        self.triggers = []
        #: how many of the next spawns fail as fork() does under a task limit.
        self.refuse_spawns = 0

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        if self.refuse_spawns:
            self.refuse_spawns -= 1
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        process = StandInProcess(self, protocol, 1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append(process)
        return process

    def stop(self):
        self.stopped = True

    def addSystemEventTrigger(self, *args):
        self.triggers.append(args)


def worker_settings(**broker):
    """Two workers on loopback ports chosen by the kernel, with [broker] settings changed."""
    return parse_config({"broker": {"workers": 2, **broker}, "registry": {"backend": "redis"},
                         "http": {"endpoint": "tcp:0:interface=127.0.0.1"},
                         "ssp": {"port": 0}})


def logged(testcase, level):
    """The log events of ``level`` emitted during the test."""
    events = []

    def observe(event):
        if event.get("log_level") == level:
            events.append(event)
    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class GiveUpTests(SynchronousTestCase):
    """The supervisor's failure count, window, stable-run reset and give-up, on a Clock."""

    def start(self, config_path=None, environ=None, **broker):
        self.clock = WorkerClock()
        supervisor = SupervisorService(worker_settings(**broker), config_path, reactor=self.clock,
                                       environ=environ or {})
        supervisor.startService()
        self.addCleanup(self.stop, supervisor)
        return supervisor

    def stop(self, supervisor):
        d = supervisor.stopService()
        self.clock.advance(0)
        self.successResultOf(d)

    def fail_at_once(self, supervisor, index, times, ran=1.0, code=2):
        """Let worker ``index`` run ``ran`` seconds then exit, ``times`` times, each
        restart waited for (the last failure's restart is left pending)."""
        for time in range(times):
            self.clock.advance(ran)
            supervisor.processes[index].exit(code)
            if time < times - 1:
                self.assertIn(index, supervisor._restarting)
                self.clock.advance(supervisor._restarting[index].getTime() - self.clock.seconds())

    def test_a_hup_while_the_supervisor_stops_reloads_nothing(self):
        """Once the supervisor stops (as when it gave up), the SIGHUP handler sees it
        stopping and forwards no reload to the workers left."""
        from broker.lifecycle import SignalHandlers
        supervisor = self.start()
        other = supervisor.processes[0]
        other.ready()
        handlers = SignalHandlers(supervisor)
        handlers._reload()
        self.assertEqual(other.signals, ["HUP"])   # while running: forwarded
        supervisor._stopping = True               # what stopService sets first
        handlers._reload()
        self.assertEqual(other.signals, ["HUP"])
        supervisor._stopping = False

    def test_gives_up_after_the_limit_and_stops_the_others(self):
        """A worker failing 5 times in a row within the window is not restarted: one critical
        line names it, its last exit status and the remedy; the other worker is stopped
        gracefully and the supervisor stops."""
        events = logged(self, LogLevel.critical)
        errors = logged(self, LogLevel.error)
        supervisor = self.start()
        other = supervisor.processes[0]
        self.fail_at_once(supervisor, 1, 4)
        self.assertIsNone(supervisor.gave_up)
        self.clock.advance(supervisor._restarting[1].getTime() - self.clock.seconds())
        self.clock.advance(1.0)
        supervisor.processes[1].exit(number=signal.SIGSEGV)
        self.assertEqual(supervisor._restarting, {})
        self.assertEqual(other.signals, ["TERM"])
        self.clock.advance(0)
        message = self.successResultOf(supervisor.given_up)
        self.assertEqual(len(events), 1)
        self.assertEqual(formatEvent(events[0]), message)
        self.assertEqual((events[0]["index"], events[0]["status"]),
                         (1, "killed by signal 11 (SIGSEGV)"))
        self.assertNotIn("\n", message)
        for words in ("worker 1 failed 5 times", "killed by signal 11 (SIGSEGV)",
                      "fix that", "worker_failure_limit", f"status {GAVE_UP}"):
            self.assertIn(words, message)
        self.assertTrue(other.gone)
        self.assertFalse(supervisor.running)
        self.assertEqual(supervisor.restart_counts, [0, 4])
        self.assertEqual(len(self.clock.spawned), 6)
        self.assertFalse(self.clock.stopped)
        self.assertEqual(formatEvent(errors[1]), "worker 1 exited (exit status 2); restarting "
                         "it in 1.0 s (failure 2; the supervisor gives up at 5 within 300.0 s)")

    def test_failures_spread_wider_than_the_window_are_restarted(self):
        """A worker whose failures never number the limit within the window (here it dies
        after 20 s, so at most 3 fall within 60 s) is restarted again and again."""
        supervisor = self.start(worker_failure_limit=4, worker_failure_window=60.0)
        self.fail_at_once(supervisor, 0, 12, ran=20.0)
        self.assertIsNone(supervisor.gave_up)
        self.assertIn(0, supervisor._restarting)
        self.assertEqual(supervisor.restart_counts, [12, 0])

    def test_a_stable_run_starts_the_count_again(self):
        """Failures before a run of stable_after seconds no longer count: 2 quick failures,
        a stable run and its failure, then 1 more are restarted under a limit of 3; the
        next quick failure reaches it."""
        supervisor = self.start(worker_failure_limit=3)
        self.fail_at_once(supervisor, 0, 2)
        self.clock.advance(supervisor._restarting[0].getTime() - self.clock.seconds())
        self.fail_at_once(supervisor, 0, 1, ran=supervisor.stable_after)
        self.clock.advance(supervisor._restarting[0].getTime() - self.clock.seconds())
        self.fail_at_once(supervisor, 0, 1)
        self.assertIsNone(supervisor.gave_up)
        self.assertEqual(supervisor._restarting[0].getTime() - self.clock.seconds(), 1.0)
        self.clock.advance(1.0)
        self.fail_at_once(supervisor, 0, 1)
        self.assertIn("worker 0 failed 3 times", supervisor.gave_up)

    def test_a_limit_of_zero_restarts_forever(self):
        """worker_failure_limit = 0 keeps the old rule: restart, however often it fails."""
        errors = logged(self, LogLevel.error)
        supervisor = self.start(worker_failure_limit=0)
        self.fail_at_once(supervisor, 1, 30)
        self.assertIsNone(supervisor.gave_up)
        self.assertIn(1, supervisor._restarting)
        self.assertEqual(formatEvent(errors[-1]), "worker 1 exited (exit status 2); restarting "
                         "it in 10.0 s (worker_failure_limit = 0: never given up)")

    def test_restart_counts_are_told_to_every_worker(self):
        """After each restart every live worker's stdin gets the restart counts of all."""
        supervisor = self.start()
        self.assertEqual(supervisor.processes[0].stdin, b'{"restarts": [0, 0]}\n')
        self.fail_at_once(supervisor, 1, 2)
        self.clock.advance(supervisor._restarting[1].getTime() - self.clock.seconds())
        for process in supervisor.processes.values():
            self.assertTrue(process.stdin.endswith(b'{"restarts": [0, 2]}\n'), process.stdin)

    def test_under_twistd_giving_up_stops_the_reactor_with_exit_status_1(self):
        """Under twistd (an Application parent) giving up stops the reactor, which stops
        the Application, and sets the process's exit status to 1."""
        statuses = []
        self.patch(workers, "exit_with_status_at_exit", statuses.append)
        supervisor = self.start(worker_failure_limit=1)
        supervisor.setServiceParent(Application("broker"))
        self.fail_at_once(supervisor, 0, 1)
        self.assertTrue(self.clock.stopped)
        self.assertEqual(statuses, [1])

    def test_systemd_hears_ready_the_give_up_and_the_stop(self):
        """The supervisor sends READY=1 once every worker is ready, then the give-up as
        STATUS, then STOPPING=1 (NotifyAccess=main: workers send nothing)."""
        sock, path = notify_socket(self)
        supervisor = self.start(environ={"NOTIFY_SOCKET": path}, worker_failure_limit=1)
        self.assertNotIn("NOTIFY_SOCKET", supervisor.environ)
        supervisor.processes[0].ready()
        supervisor.processes[1].ready()
        ready = sock.recv(4096).decode()
        self.assertTrue(ready.startswith("READY=1\nSTATUS=2 workers ready"), ready)
        self.fail_at_once(supervisor, 1, 1)
        self.assertEqual(sock.recv(4096),
                         b"STATUS=gave up: worker 1 keeps failing (exit status 2)")
        self.assertEqual(sock.recv(4096), b"STOPPING=1")

    def test_reload_reads_the_failure_limit(self):
        """SIGHUP gives the supervisor the file's new failure limit; a file that cannot be
        used leaves the running limit."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("[broker]\nworker_failure_limit = 2\nworker_failure_window = 30.0\n")
        supervisor = self.start(path)
        for process in supervisor.processes.values():
            process.ready()
        supervisor.reload()
        self.assertEqual((supervisor.failure_limit, supervisor.failure_window), (2, 30.0))
        self.assertEqual(supervisor.processes[1].signals, ["HUP"])
        with open(path, "a") as handle:
            handle.write(BROKEN)
        supervisor.reload()
        self.assertEqual(supervisor.failure_limit, 2)
        self.fail_at_once(supervisor, 1, 2)
        self.assertIn("worker 1 failed 2 times", supervisor.gave_up)


    def test_reload_waits_until_a_starting_worker_is_ready(self):
        """SIGHUP reaches a worker only once it said it is ready, then at once: before,
        its handlers are not installed and SIGHUP's default action kills it (a reload
        during a worker's restart cost a crash and a counted failure)."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("[broker]\nworker_failure_limit = 5\n")
        supervisor = self.start(path)
        first, second = supervisor.processes[0], supervisor.processes[1]
        first.ready()
        supervisor.reload()
        self.assertEqual((first.signals, second.signals), (["HUP"], []))
        second.ready()
        second.ready()
        self.assertEqual(second.signals, ["HUP"])
        self.fail_at_once(supervisor, 1, 1)
        self.clock.advance(supervisor._restarting[1].getTime() - self.clock.seconds())
        restarted = supervisor.processes[1]
        supervisor.reload()
        self.assertEqual(restarted.signals, [])
        restarted.ready()
        self.assertEqual(restarted.signals, ["HUP"])
        self.assertEqual(first.signals, ["HUP", "HUP"])

    def test_a_reload_while_a_worker_is_down_is_not_replayed(self):
        """A worker restarted after a reload reads the file at its start: it gets no
        SIGHUP of that older reload once ready."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("[broker]\n")
        supervisor = self.start(path)
        supervisor.reload()
        supervisor.processes[0].exit(2)
        self.clock.advance(supervisor._restarting[0].getTime() - self.clock.seconds())
        supervisor.processes[0].ready()
        self.assertEqual(supervisor.processes[0].signals, [])

    def test_a_restart_that_cannot_create_the_process_is_tried_again(self):
        """A restart whose process cannot be created (fork refused: EAGAIN under a task
        limit) counts as the worker's failure and is tried again after the next delay,
        and the worker runs once fork works; before, the error escaped the timer and
        the worker was never restarted nor given up, its devices unserved for good."""
        errors = logged(self, LogLevel.error)
        supervisor = self.start()
        self.fail_at_once(supervisor, 0, 1)
        self.clock.refuse_spawns = 1
        self.clock.advance(supervisor._restarting[0].getTime() - self.clock.seconds())
        self.assertIn("could not be started (Resource temporarily unavailable)",
                      formatEvent(errors[-1]))
        self.assertEqual(supervisor._restarting[0].getTime() - self.clock.seconds(), 1.0)
        self.clock.advance(1.0)
        self.assertEqual(len(self.clock.spawned), 3)
        self.assertIs(supervisor.workers[0].transport, self.clock.spawned[-1])
        self.assertEqual(supervisor.restart_counts, [2, 0])
        self.assertIsNone(supervisor.gave_up)

    def test_a_worker_that_can_never_be_created_is_given_up(self):
        """Restarts that keep failing to create the process reach the failure limit and
        the supervisor gives up, saying why, and stops (nothing left waiting)."""
        supervisor = self.start(worker_failure_limit=3)
        self.fail_at_once(supervisor, 1, 1)
        self.clock.refuse_spawns = 10
        for _ in range(2):
            self.clock.advance(supervisor._restarting[1].getTime() - self.clock.seconds())
        self.assertIn("worker 1 failed 3 times", supervisor.gave_up)
        self.assertIn("could not be started", supervisor.gave_up)
        self.clock.advance(0)
        self.assertFalse(supervisor.running)
        self.successResultOf(supervisor.given_up)


class SupervisorPipeTests(SynchronousTestCase):
    """A worker's end of its stdin pipe: the supervisor's messages and its going away."""

    def test_restart_counts_become_a_metric(self):
        """JSON lines from the supervisor, however split into reads, become the
        broker_worker_restarts_total series; other lines are ignored; end of file ends it."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        open_ends = [write]
        self.addCleanup(lambda: [os.close(fd) for fd in open_ends])
        restarts = WorkerRestarts()
        pipe = SupervisorPipe(WorkerClock(), read, restarts.update)
        os.write(write, b'{"restarts": [1, 0]}\nnot json\n{"restarts": [3')
        self.assertIsNone(pipe.doRead())
        self.assertEqual(restarts.counts, (1, 0))
        os.write(write, b', 1]}\n{"restarts": ["x"]}\n')
        self.assertIsNone(pipe.doRead())
        [family] = restarts.collect()
        self.assertEqual(family.name, "broker_worker_restarts")
        self.assertEqual([(s.name, s.labels, s.value) for s in family.samples],
                         [("broker_worker_restarts_total", {"worker": "0"}, 3),
                          ("broker_worker_restarts_total", {"worker": "1"}, 1)])
        os.close(open_ends.pop())
        self.assertIsInstance(pipe.doRead(), error.ConnectionDone)


class SupervisionTests(TestCase):
    """A supervisor with one real worker on a real Redis."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.path = path = write_worker_config(self, start_single(self), workers=1)
        self.supervisor = SupervisorService(load_config(path), path, reactor=reactor)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)
        yield self.supervisor.ready

    @defer.inlineCallbacks
    def test_a_worker_stops_when_its_supervisor_is_gone(self):
        """A worker whose supervisor died (its end of the worker's stdin pipe closed,
        as on SIGKILL) stops gracefully by itself instead of living on as an orphan
        that keeps its socket of the UDP port's reuseport group."""
        worker = self.supervisor.workers[0]
        self.supervisor.processes[0].closeStdin()
        yield wait_until(self, lambda: worker.ended.called, timeout=20,
                         what="the orphaned worker to exit")
        self.assertIsInstance(worker.reason, error.ProcessDone)

    @defer.inlineCallbacks
    def test_stopping_cancels_a_pending_restart(self):
        """A supervisor stopped while a dead worker waits for its restart spawns no
        worker afterwards and leaves no timer behind."""
        worker = self.supervisor.workers[0]
        self.supervisor.signal_worker(0, "KILL")
        yield worker.ended
        self.assertEqual(len(self.supervisor._restarting), 1)
        yield self.supervisor.stopService()
        self.assertEqual(self.supervisor._restarting, {})
        self.assertIs(self.supervisor.workers[0], worker)

    @defer.inlineCallbacks
    def kill_and_wait_restart(self):
        """SIGKILL worker 0; the delay of its restart, once the new one is ready."""
        worker = self.supervisor.workers[0]
        self.supervisor.signal_worker(0, "KILL")
        yield worker.ended
        delay = self.supervisor._restarting[0].getTime() - reactor.seconds()
        yield wait_until(self, lambda: self.supervisor.workers[0] is not worker
                         and self.supervisor.workers[0].status.get("ready"),
                         what="worker 0 restarted")
        return delay

    @defer.inlineCallbacks
    def test_restart_delay_doubles_and_starts_over_after_a_stable_run(self):
        """A worker that keeps dying is restarted after 0.5 s, then 1 s; one that ran
        for stable_after seconds before dying is restarted after 0.5 s again."""
        first = yield self.kill_and_wait_restart()
        second = yield self.kill_and_wait_restart()
        self.assertEqual(round(first, 1), 0.5)
        self.assertEqual(round(second, 1), 1.0)
        self.supervisor.stable_after = 0.0
        third = yield self.kill_and_wait_restart()
        self.assertEqual(round(third, 1), 0.5)
        self.assertEqual(self.supervisor.restarts, 3)

    @defer.inlineCallbacks
    def test_a_reload_spares_a_restarting_worker(self):
        """A reload (SIGHUP) just after a worker's restart began does not kill the new
        process before its handlers are up: it becomes ready, takes the SIGHUP and
        lives on, the only restart."""
        worker = self.supervisor.workers[0]
        self.supervisor.signal_worker(0, "KILL")
        yield worker.ended
        yield wait_until(self, lambda: self.supervisor.workers[0] is not worker,
                         what="worker 0 respawned")
        restarted = self.supervisor.workers[0]
        self.supervisor.reload()
        yield wait_until(self, lambda: restarted.status.get("ready") or restarted.ended.called,
                         what="the restarted worker ready or dead")
        seen = restarted.status
        yield wait_until(self, lambda: restarted.status is not seen or restarted.ended.called,
                         what="a status line after the SIGHUP")
        self.assertFalse(restarted.ended.called, describe_exit(restarted.reason))
        self.assertIs(self.supervisor.workers[0], restarted)
        self.assertEqual(self.supervisor.restarts, 1)

    @defer.inlineCallbacks
    def test_stop_ends_each_worker_gracefully(self):
        """Stopping the supervisor (its SIGTERM) stops each worker with SIGTERM, and the
        worker exits with status 0 (a graceful stop, not a kill)."""
        worker = self.supervisor.workers[0]
        yield self.supervisor.stopService()
        self.assertTrue(worker.ended.called)
        self.assertIsInstance(worker.reason, error.ProcessDone)

    @defer.inlineCallbacks
    def test_a_worker_failing_at_every_start_is_given_up(self):
        """A real worker that fails at every start (its config file broken since the
        supervisor started: exit status 2) is restarted until it failed failure_limit
        times, then given up: no restart is pending and the supervisor has stopped."""
        self.supervisor.failure_limit = 3
        with open(self.path, "a") as handle:
            handle.write(BROKEN)
        self.supervisor.signal_worker(0, "KILL")
        message = yield self.supervisor.given_up.addTimeout(60, reactor)
        self.assertIn("worker 0 failed 3 times", message)
        self.assertIn("(last: exit status 2)", message)
        self.assertEqual(self.supervisor.restart_counts, [2])
        self.assertEqual(self.supervisor._restarting, {})
        self.assertFalse(self.supervisor.running)

    @defer.inlineCallbacks
    def test_restarts_are_a_metric(self):
        """After a restart the worker's /metrics (on the shared HTTP port) says
        broker_worker_restarts_total{worker="0"} 1.0."""
        yield self.kill_and_wait_restart()
        url = f"http://127.0.0.1:{self.supervisor.http_port}/metrics"
        sample = 'broker_worker_restarts_total{worker="0"} 1.0'
        for _ in range(50):
            response = yield treq.get(url, persistent=False)
            body = yield response.text()
            if sample in body:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertIn(sample, body)


def consecutive_free_ports(count):
    """A loopback TCP port P with P .. P + count - 1 all free just now."""
    for _ in range(50):
        probes = []
        try:
            first = socket.socket()
            probes.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + count - 1 > 65535:
                continue
            for offset in range(1, count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no run of free ports")


class WorkerMetricsTests(TestCase):
    """Two real workers with a metrics listener of their own (real Redis)."""

    timeout = 120

    @defer.inlineCallbacks
    def test_each_worker_serves_metrics_on_its_own_port(self):
        """With metrics.endpoint tcp:P, worker i serves /metrics on P + i (a scrape
        target each); before, every worker tried P and all but one failed."""
        port = consecutive_free_ports(2)
        path = write_worker_config(self, start_single(self), workers=2)
        with open(path, "a") as handle:
            handle.write(f'[metrics]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
        supervisor = SupervisorService(load_config(path), path, reactor=reactor)
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        yield supervisor.ready
        for index in range(2):
            response = yield treq.get(f"http://127.0.0.1:{port + index}/metrics",
                                      persistent=False)
            body = yield response.text()
            self.assertEqual(response.code, 200)
            self.assertIn("broker_worker_restarts_total", body)
        self.assertEqual(supervisor.restart_counts, [0, 0])

    def test_a_metrics_endpoint_workers_cannot_share_is_refused_once(self):
        """The supervisor refuses a metrics endpoint that is not tcp:PORT, or whose
        port range overflows, naming the setting, before any worker starts."""
        for endpoint, words in (("unix:/run/broker-metrics", "plain tcp:PORT"),
                                ("tcp:65535:interface=127.0.0.1", "up to 65536")):
            config = parse_config(tomllib.loads(f"""
[broker]
workers = 2
[http]
endpoint = "tcp:0:interface=127.0.0.1"
[ssp]
enabled = false
[metrics]
endpoint = "{endpoint}"
[registry]
backend = "redis"
redis_url = "redis://127.0.0.1:1"
"""))
            with self.assertRaises(workers.ConfigError) as caught:
                SupervisorService(config, None, reactor=reactor)
            self.assertIn("metrics.endpoint", str(caught.exception))
            self.assertIn(words, str(caught.exception))


class Collector(ProcessProtocol):
    """A process's stderr and how it ended."""

    def __init__(self):
        self.stderr = b""
        self.ended = defer.Deferred()

    def errReceived(self, data):
        self.stderr += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class WorkerProcessTests(TestCase):
    """A real worker process (python -m broker.worker) started without its supervisor."""

    timeout = 90

    @defer.inlineCallbacks
    def test_a_worker_that_cannot_bind_exits_2(self):
        """A worker whose metrics port is taken says so in one line and exits with status
        2, which its supervisor counts as a failure, instead of living on half started,
        never ready."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        http = reserve_tcp_port("127.0.0.1", 0)
        self.addCleanup(http.close)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write(f"""
[broker]
data_dir = "{os.path.abspath(self.mktemp())}"
[log]
level = "warn"
[ssp]
enabled = false
[metrics]
endpoint = "tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
[registry]
backend = "memory"
""")
        worker = Collector()
        process = reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-m", "broker.worker", "--index", "0",
                                     "--http-port", str(http.getsockname()[1]), "--config", path],
            env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r", STATUS_FD: "r"})
        self.addCleanup(lambda: worker.ended.called or process.signalProcess("KILL"))
        reason = yield worker.ended.addTimeout(60, reactor)
        self.assertEqual(getattr(reason, "exitCode", None), 2, worker.stderr)
        lines = [line for line in worker.stderr.decode().splitlines()
                 if line.startswith("broker worker 0: ")]
        self.assertEqual(len(lines), 1, worker.stderr)
        self.assertIn("metrics.endpoint: cannot listen on", lines[0])


class TwistdGiveUpTests(TestCase):
    """A real `twistd broker` with two workers, one of which keeps failing."""

    timeout = 150

    def write_config(self, url):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "broker.toml")
        with open(path, "w") as handle:
            handle.write(f"""
[broker]
data_dir = "{os.path.join(directory, 'data')}"
workers = 2
stop_timeout = 2.0
worker_failure_limit = 2
[log]
format = "json"
[http]
endpoint = "tcp:0:interface=127.0.0.1"
[ssp]
port = 0
[registry]
backend = "redis"
redis_url = "{url}"
""")
        return path

    @defer.inlineCallbacks
    def test_the_broker_exits_1_when_it_gives_up_on_a_worker(self):
        """When worker 0 keeps failing, the broker logs one critical line naming it and
        its exit status, stops worker 1 gracefully (exit status 0) and exits with
        status 1: the failure systemd's Restart=on-failure and start limits act on."""
        path = self.write_config(start_single(self))
        broker = start_twistd(self, path)
        started = yield broker.wait_for("worker 0 started", timeout=60)
        yield wait_until(self, lambda: sum(1 for r in broker.records if str(
            r.get("message", "")).startswith("broker ready")) == 2, timeout=60,
            what="both workers ready")
        with open(path, "a") as handle:
            handle.write(BROKEN)
        os.kill(started["pid"], signal.SIGKILL)
        exit_code, killed_by = yield broker.ended.addTimeout(90, reactor)
        output = broker.output.decode(errors="replace")
        self.assertEqual((exit_code, killed_by), (1, None), output[-3000:])
        critical = [r for r in broker.records if r.get("level") == "critical"
                    and r.get("namespace") == "broker.workers"]
        self.assertEqual(len(critical), 1, output[-3000:])
        self.assertTrue(critical[0]["message"].startswith("worker 0 failed 2 times"))
        self.assertEqual(critical[0]["status"], "exit status 2")
        self.assertIn("broker worker 0: ", output)
        self.assertIn("[brokr]: unknown section", output)
        self.assertIn("worker 1 stopped (exit status 0)",
                      [r.get("message") for r in broker.records])
