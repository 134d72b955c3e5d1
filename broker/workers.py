"""Worker processes on one host: ``[broker] workers = N``.

The supervisor (what ``twistd broker`` runs when workers > 1) opens N UDP
sockets on the SSP port with SO_REUSEPORT and attaches a classic BPF
program to the group (SO_ATTACH_REUSEPORT_CBPF, broker/steering.py) that
picks the socket from the device number in the datagram's header (wire.md 1). Worker i inherits
socket i. So every datagram of a device reaches the same worker, whatever
its source address: roaming keeps the session on its worker.

The supervisor keeps its copy of every socket open. When a worker dies,
its socket stays in the group (the kernel would otherwise renumber the
group and move other workers' devices); datagrams wait in its buffer until
the restarted worker adopts the same socket and resumes the sessions from
their records in the shared registry (Redis).

A worker that keeps failing is not restarted forever: after
``[broker] worker_failure_limit`` failures within ``worker_failure_window``
seconds without a stable run, the supervisor gives up, stops the other
workers and makes the broker exit with status 1 (GAVE_UP), so that systemd
sees a failure instead of an "active" service flapping inside. Under
systemd the supervisor, not a worker, says READY=1 and pets the watchdog.
For the same reason a worker whose stop fails (exit status 1: changes lost)
makes the broker exit with that status (``stop_status``).

A worker stops when its supervisor is gone (broker.worker.SupervisorPipe): orphans
would keep their sockets in the group, ahead of a new supervisor's. The
same pipe carries the supervisor's restart counts, which every worker
exports (broker_worker_restarts_total), whichever of them a scrape reaches.

Logs: a worker's stdout and stderr are pipes to the supervisor, which
writes every line to its own log, tagged with the worker's index
(broker.logs.WorkerLogRelay): the workers' lines reach the supervisor's
--logfile (rotated by it), or its stdout (the journal).

HTTP: each worker listens on the HTTP port with its own SO_REUSEPORT
socket, so the kernel spreads connections over the live workers; requests
need no steering because all state is in the shared registry.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import sys

from twisted.application.service import MultiService
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from broker.config import ConfigError, load_config
from broker.lifecycle import reloadable
from broker.listeners import bind_failure
from broker.logs import WorkerLogRelay
from broker.steering import (parse_tcp_endpoint, reserve_tcp_port, steered_udp_sockets,
                             worker_metrics_address)
from broker.systemd import INHERITED, Notifier
from broker.worker import STATUS_FD, UDP_FD

log = Logger()

#: seconds before a crashed worker is started again (doubling up to the max).
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 10.0
#: seconds a worker must have run for its next crash to count as a first one
#: again (restart after RESTART_DELAY, not after the last, longer delay; its
#: earlier failures no longer count towards [broker] worker_failure_limit).
STABLE_AFTER = 60.0
#: exit status of a broker whose supervisor gave up on a failing worker.
GAVE_UP = 1
#: exit status of a broker whose worker was killed during the stop (its changes
#: may be lost); a worker that exits non-zero during the stop gives its own
#: (broker.service.UNSTORED, 1, when it lost changes).
STOP_KILLED = 1
#: the one critical line of a supervisor that gives up on a worker.
GIVE_UP_MESSAGE = (
    "worker {index} failed {failures} times in {span} s without a stable run (last: "
    "{status}): giving up, stopping the other workers and exiting with status "
    "{exit_status}; the worker's own log lines above say why it fails (a config file it "
    "re-read, the registry, a missing resource): fix that, then start the broker again "
    "([broker] worker_failure_limit and worker_failure_window set this limit)")


def describe_exit(reason) -> str:
    """How a process ended, for the operator: "exit status 2", "killed by signal 9 (SIGKILL)"."""
    if isinstance(reason, OSError):
        # spawnProcess refused: fork or a pipe (a task or descriptor limit).
        return f"could not be started ({reason.strerror or reason})"
    number = getattr(reason, "signal", None)
    if number:
        try:
            return f"killed by signal {number} ({signal.Signals(number).name})"
        except ValueError:
            return f"killed by signal {number}"
    code = getattr(reason, "exitCode", None)
    return f"exit status {code}" if code is not None else str(reason)


def exit_with_status_at_exit(status: int) -> None:
    """Make this process exit with ``status`` once twistd has returned.

    twistd exits 0 after a reactor stop, whatever stopped it, and catches
    every exception raised while the reactor runs; the only place left is
    the interpreter's exit. Handlers run last registered first, so this one
    runs before the rest, which it skips (ours are done: the log is closed).
    """
    def leave():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    atexit.register(leave)


# -- the supervisor -------------------------------------------------------------


class _Worker(protocol.ProcessProtocol):
    """One worker process as the supervisor sees it: its status and log lines, its exit."""

    def __init__(self, supervisor, index, started):
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.status = {}
        self.ended = defer.Deferred()
        #: why it ended (ProcessDone: exit status 0), once it has.
        self.reason = None
        self._buffer = b""
        #: its stdout (JSON log records) and stderr, into the supervisor's log.
        self.logs = WorkerLogRelay(index)

    def childDataReceived(self, fd, data):
        if fd in (1, 2):
            self.logs.received(fd, data)
            return
        if fd != STATUS_FD:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                self.status = json.loads(line)
            except ValueError:
                continue
            self.supervisor.status_changed(self)

    def childConnectionLost(self, fd):
        if fd in (1, 2):
            self.logs.closed(fd)

    def processEnded(self, reason):
        self.reason = reason.value
        self.supervisor.worker_ended(self, reason.value)
        self.ended.callback(None)


class SupervisorService(MultiService):
    """Starts N workers, restarts the ones that die, stops them on SIGTERM."""

    def __init__(self, config, config_path, reactor=None, environ=None, activation=None,
                 log_control=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        #: the level of the supervisor's own log lines (a reload sets it), if any.
        self.log_control = log_control
        refuse_socket_activation(config, INHERITED if activation is None else activation)
        self.environ = dict(os.environ if environ is None else environ)
        # systemd notifications come from the supervisor only (NotifyAccess=main).
        self.notifier = Notifier(reactor, dict(self.environ))
        self.notifier.setServiceParent(self)
        self.environ.pop("NOTIFY_SOCKET", None)
        self.count = config.broker.workers
        self.failure_limit = config.broker.worker_failure_limit
        self.failure_window = config.broker.worker_failure_window
        self.workers = {}
        self.processes = {}
        #: restarts of each worker, told to every worker (its metrics).
        self.restart_counts = [0] * self.count
        self._delay = {}
        self._failures = {}      # index -> times of its failures since its last stable run
        self._restarting = {}    # index -> the pending restart call
        self._reload_pending = set()   # indexes of workers to send SIGHUP once ready
        self._stopping = False
        #: the first non-zero exit status of a worker during the stop, if any.
        self.stop_status = None
        #: the critical line, once the supervisor gave up on a worker.
        self.gave_up = None
        #: fires with that line once the supervisor gave up and has stopped.
        self.given_up = defer.Deferred()
        host, port, _ = parse_tcp_endpoint(config.http.endpoint, source=config.source)
        if config.metrics.enabled and config.metrics.endpoint:
            # Refused once here, not by every worker at its start.
            worker_metrics_address(config.metrics.endpoint, 0, self.count, config.source)
        try:
            self.udp_sockets = (steered_udp_sockets(config.ssp.host, config.ssp.port, self.count)
                                if config.ssp.enabled else [])
        except OSError as problem:
            raise ConfigError(bind_failure(config, "udp", problem)) from None
        try:
            self.http_reservation = reserve_tcp_port(host, port)
        except OSError as problem:
            for sock in self.udp_sockets:
                sock.close()
            raise ConfigError(bind_failure(config, "http", problem)) from None
        self.http_port = self.http_reservation.getsockname()[1]
        self.udp_port = self.udp_sockets[0].getsockname()[1] if self.udp_sockets else None
        self.ready = defer.Deferred()

    #: twistd's log observer (set by broker.tap), handed to the Application.
    log_observer = None
    stable_after = STABLE_AFTER
    #: whether giving up stops the reactor and sets the exit status: true under
    #: twistd (an Application parent); elsewhere (tests) only this service stops.
    exit_on_give_up = False
    #: whether a worker's failed stop (stop_status) sets the exit status: the same.
    exit_on_loss = False

    @property
    def restarts(self):
        """Worker restarts since the supervisor started, all workers together."""
        return sum(self.restart_counts)

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        if hasattr(parent, "setComponent"):
            self.exit_on_give_up = self.exit_on_loss = True
            if self.log_observer is not None:
                from twisted.logger import ILogObserver
                parent.setComponent(ILogObserver, self.log_observer)

    @property
    def stopping(self) -> bool:
        """Whether a stop has begun (the SIGHUP handler reloads nothing then)."""
        return self._stopping

    def startService(self):
        super().startService()
        self._stopping = False
        self.stop_status = None
        for index in range(self.count):
            self._spawn(index)
        self._tell_restarts()

    def _spawn(self, index):
        worker = _Worker(self, index, self.reactor.seconds())
        # A new process reads the config file at its start: no older reload to pass on.
        self._reload_pending.discard(index)
        args = [sys.executable, "-m", "broker.worker", "--index", str(index),
                "--http-port", str(self.http_port), "--log-relay"]
        if self.config_path:
            args += ["--config", os.path.abspath(self.config_path)]
        # stdout and stderr are read into our log (_Worker.logs), not inherited:
        # a daemon's are /dev/null, and --logfile (rotated) is ours to write.
        fds = {0: "w", 1: "r", 2: "r", STATUS_FD: "r"}
        if self.udp_sockets:
            fds[UDP_FD] = self.udp_sockets[index].fileno()
        self.workers[index] = worker
        self.processes[index] = self.reactor.spawnProcess(worker, sys.executable, args,
                                                          env=self.environ, childFDs=fds)
        log.info("worker {index} started (pid {pid})", index=index,
                 pid=self.processes[index].pid)

    def _tell_restarts(self):
        """Send the restart counts down every worker's stdin (broker.worker.SupervisorPipe)."""
        line = json.dumps({"restarts": self.restart_counts}).encode() + b"\n"
        for process in self.processes.values():
            process.write(line)

    def status_changed(self, worker):
        if (worker.index in self._reload_pending and worker.status.get("ready")
                and self.workers.get(worker.index) is worker):
            self._reload_pending.discard(worker.index)
            self.signal_worker(worker.index, "HUP")
        if not self.ready.called and all(w.status.get("ready") for w in self.workers.values()) \
                and len(self.workers) == self.count:
            self.ready.callback(self)
            where = f"HTTP on port {self.http_port}" + (
                f", SSP on UDP port {self.udp_port}" if self.udp_port is not None else "")
            self.notifier.ready(f"{self.count} workers ready; {where}")

    def worker_ended(self, worker, reason):
        if self.workers.get(worker.index) is not worker:
            return
        status = describe_exit(reason)
        if self._stopping:
            self._stopped(worker.index, reason, status)
            return
        now = self.reactor.seconds()
        failures = self._failures.setdefault(worker.index, collections.deque())
        if now - worker.started >= self.stable_after:
            # A stable run: this crash is a first one again.
            self._delay.pop(worker.index, None)
            failures.clear()
        failures.append(now)
        while now - failures[0] > self.failure_window:
            failures.popleft()
        if self.failure_limit and len(failures) >= self.failure_limit:
            self._give_up(worker.index, status, now - failures[0])
            return
        delay = self._delay.get(worker.index, RESTART_DELAY)
        self._delay[worker.index] = min(RESTART_DELAY_MAX, delay * 2)
        self.restart_counts[worker.index] += 1
        log.error("worker {index} exited ({status}); restarting it in {delay} s "
                  + ("(failure {failures}; the supervisor gives up at {limit} within {window} s)"
                     if self.failure_limit else "(worker_failure_limit = 0: never given up)"),
                  index=worker.index, status=status, delay=delay, failures=len(failures),
                  limit=self.failure_limit, window=self.failure_window)
        self._restarting[worker.index] = self.reactor.callLater(delay, self._restart,
                                                                worker.index)

    def _stopped(self, index, reason, status):
        """A worker ended during the stop. Exit status 0 is a clean stop, and so is
        SIGTERM's default action (a worker still starting, that served nothing);
        any other end is the broker's failure too: a worker that lost changes
        exits 1, and systemd watches the supervisor, not the workers."""
        code = getattr(reason, "exitCode", None)
        number = getattr(reason, "signal", None)
        failed = code if code else (STOP_KILLED if number and number != signal.SIGTERM
                                    else None)
        if failed is None:
            log.info("worker {index} stopped ({status})", index=index, status=status)
            return
        if self.stop_status is None:
            self.stop_status = failed
        log.error("worker {index} stopped ({status}): its stop failed, its own lines above "
                  "say why (exit status 1: changes it could not store are lost); the broker "
                  "exits with status {exit_status}", index=index, status=status,
                  exit_status=self.stop_status if self.gave_up is None else GAVE_UP)

    def _restart(self, index):
        del self._restarting[index]
        if self._stopping:
            return
        try:
            self._spawn(index)
        except OSError as problem:
            # fork or a pipe refused (a task or descriptor limit): a failure of
            # this worker, tried again after the next delay or given up, as a crash.
            self.workers[index].processEnded(Failure(problem))
            return
        self._tell_restarts()

    def _give_up(self, index, status, span):
        """Stop restarting: a worker that keeps failing needs the operator."""
        fields = {"index": index, "failures": self.failure_limit, "span": round(span, 1),
                  "status": status, "exit_status": GAVE_UP}
        self.gave_up = GIVE_UP_MESSAGE.format(**fields)
        log.critical(GIVE_UP_MESSAGE, **fields)
        self.notifier.send(f"STATUS=gave up: worker {index} keeps failing ({status})")
        if not self.exit_on_give_up:
            self.stopService().addErrback(
                lambda failure: log.failure("stopping after giving up failed", failure))
            return
        exit_with_status_at_exit(GAVE_UP)
        try:
            self.reactor.stop()    # twistd stops the Application, hence this service
        except error.ReactorNotRunning:
            pass

    def signal_worker(self, index, number):
        """Send a signal to one worker (tests kill workers with SIGKILL)."""
        try:
            self.processes[index].signalProcess(number)
        except error.ProcessExitedAlready:
            pass

    def reload(self):
        """SIGHUP: every worker re-reads the config file, and so does the supervisor
        for what it uses itself: stop_timeout, the failure limit, the log level.

        A worker not ready yet gets its SIGHUP once it is: until then its
        handlers are not installed, and SIGHUP's default action would kill it.
        systemd hears RELOADING=1, then READY=1 once the signals are sent and
        the supervisor checked the file (each worker applies it just after).
        """
        self.notifier.reloading()
        for index in list(self.processes):
            if self.workers[index].status.get("ready"):
                self.signal_worker(index, "HUP")
            else:
                self._reload_pending.add(index)
        status = f"{self.count} workers serving (reloaded)"
        try:
            loaded = load_config(self.config_path) if self.config_path else self.config
        except ConfigError as problem:
            # The workers log the same refusal and keep their settings; so do we.
            log.error("reload refused, the running configuration stays: {problem}",
                      problem=str(problem))
            status = (f"{self.count} workers serving (reload refused, running configuration "
                      "kept: see the log)")
        except Exception:
            # Not a refusal: a bug. Logged with its traceback, and never "reloaded".
            log.failure("reload failed, the supervisor keeps its running configuration")
            status = f"{self.count} workers serving (reload failed: see the log)"
        else:
            try:
                self._apply(loaded)
            except Exception:
                log.failure("reload failed, the supervisor applied part of the file at most")
                status = f"{self.count} workers serving (reload failed: see the log)"
        self.notifier.ready(status)

    def _apply(self, loaded):
        """What the supervisor takes of a reloaded file itself."""
        # The workers log the settings that need a restart; the supervisor keeps them too.
        self.config, _ = reloadable(self.config, loaded)
        self.failure_limit = self.config.broker.worker_failure_limit
        self.failure_window = self.config.broker.worker_failure_window
        if self.log_control is not None:
            self.log_control.set_level(self.config.log.level)

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        for call in self._restarting.values():
            call.cancel()
        self._restarting.clear()
        if self.gave_up is None:
            self.notifier.stopping()
        else:
            self.notifier.send("STOPPING=1")
        yield super().stopService()
        ends = [w.ended for w in self.workers.values() if not w.ended.called]
        for index in list(self.processes):
            self.signal_worker(index, "TERM")
        timeout = self.config.broker.stop_timeout + 5.0
        killer = self.reactor.callLater(timeout, self._kill_all)
        yield defer.DeferredList(ends)
        if killer.active():
            killer.cancel()
        for sock in self.udp_sockets:
            sock.close()
        self.http_reservation.close()
        if self.stop_status is not None and self.gave_up is None and self.exit_on_loss:
            exit_with_status_at_exit(self.stop_status)
        if self.gave_up is not None and not self.given_up.called:
            self.given_up.callback(self.gave_up)

    def _kill_all(self):
        for index in list(self.processes):
            self.signal_worker(index, "KILL")


def refuse_socket_activation(config, activation) -> None:
    """ConfigError when systemd passed sockets (broker.socket) to a supervisor: it binds
    the ports itself, to share them among the workers, and would find them taken."""
    if activation.fds:
        raise ConfigError(
            f"{config.source}: broker.workers: systemd passed {len(activation.fds)} "
            "listening socket(s) (socket activation, broker.socket), which workers > 1 "
            "cannot use: the supervisor binds the ports itself to share them among the "
            "workers. Disable broker.socket (systemctl disable --now broker.socket) and "
            "give http.endpoint a tcp:PORT, or set workers = 1 (docs/operations.md, "
            "\"Socket activation\")")
