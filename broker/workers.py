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

A worker stops when its supervisor is gone (SupervisorPipe): orphans
would keep their sockets in the group, ahead of a new supervisor's.

HTTP: each worker listens on the HTTP port with its own SO_REUSEPORT
socket, so the kernel spreads connections over the live workers; requests
need no steering because all state is in the shared registry.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys

from twisted.application.service import MultiService
from twisted.internet import defer, error, fdesc, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from broker.config import ConfigError
from broker.listeners import bind_failure
from broker.steering import parse_tcp_endpoint, reserve_tcp_port, steered_udp_sockets

log = Logger()

#: seconds before a crashed worker is started again (doubling up to the max).
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 10.0
#: seconds a worker must have run for its next crash to count as a first one
#: again (restart after RESTART_DELAY, not after the last, longer delay).
STABLE_AFTER = 60.0
#: seconds between the status lines a worker writes to its supervisor.
STATUS_INTERVAL = 1.0
#: the inherited descriptors of a worker.
UDP_FD = 3
STATUS_FD = 4


# -- the supervisor -------------------------------------------------------------


class _Worker(protocol.ProcessProtocol):
    """One worker process as the supervisor sees it: its status lines and its exit."""

    def __init__(self, supervisor, index, started):
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.status = {}
        self.ended = defer.Deferred()
        #: why it ended (ProcessDone: exit status 0), once it has.
        self.reason = None
        self._buffer = b""

    def childDataReceived(self, fd, data):
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

    def processEnded(self, reason):
        self.reason = reason.value
        self.supervisor.worker_ended(self, reason.value)
        self.ended.callback(None)


class SupervisorService(MultiService):
    """Starts N workers, restarts the ones that die, stops them on SIGTERM."""

    def __init__(self, config, config_path, reactor=None, environ=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.environ = dict(os.environ if environ is None else environ)
        # systemd notifications come from the supervisor only.
        self.environ.pop("NOTIFY_SOCKET", None)
        self.count = config.broker.workers
        self.workers = {}
        self.processes = {}
        self.restarts = 0
        self._delay = {}
        self._restarting = {}    # index -> the pending restart call
        self._stopping = False
        host, port, _ = parse_tcp_endpoint(config.http.endpoint)
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

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver
            parent.setComponent(ILogObserver, self.log_observer)

    def startService(self):
        super().startService()
        self._stopping = False
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index):
        worker = _Worker(self, index, self.reactor.seconds())
        args = [sys.executable, "-m", "broker.workers", "--index", str(index),
                "--http-port", str(self.http_port)]
        if self.config_path:
            args += ["--config", os.path.abspath(self.config_path)]
        fds = {0: "w", 1: 1, 2: 2, STATUS_FD: "r"}
        if self.udp_sockets:
            fds[UDP_FD] = self.udp_sockets[index].fileno()
        self.workers[index] = worker
        self.processes[index] = self.reactor.spawnProcess(worker, sys.executable, args,
                                                          env=self.environ, childFDs=fds)
        log.info("worker {index} started (pid {pid})", index=index,
                 pid=self.processes[index].pid)

    def status_changed(self, worker):
        if not self.ready.called and all(w.status.get("ready") for w in self.workers.values()) \
                and len(self.workers) == self.count:
            self.ready.callback(self)

    def worker_ended(self, worker, reason):
        if self.workers.get(worker.index) is not worker:
            return
        if self._stopping:
            return
        if self.reactor.seconds() - worker.started >= self.stable_after:
            self._delay.pop(worker.index, None)
        delay = self._delay.get(worker.index, RESTART_DELAY)
        self._delay[worker.index] = min(RESTART_DELAY_MAX, delay * 2)
        self.restarts += 1
        log.error("worker {index} exited ({reason}); restarting it in {delay} s",
                  index=worker.index, reason=str(reason), delay=delay)
        self._restarting[worker.index] = self.reactor.callLater(delay, self._restart,
                                                                worker.index)

    def _restart(self, index):
        del self._restarting[index]
        if not self._stopping:
            self._spawn(index)

    def signal_worker(self, index, number):
        """Send a signal to one worker (tests kill workers with SIGKILL)."""
        try:
            self.processes[index].signalProcess(number)
        except error.ProcessExitedAlready:
            pass

    def reload(self):
        """SIGHUP: every worker re-reads the config file."""
        for index in list(self.processes):
            self.signal_worker(index, "HUP")

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        for call in self._restarting.values():
            call.cancel()
        self._restarting.clear()
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

    def _kill_all(self):
        for index in list(self.processes):
            self.signal_worker(index, "KILL")


# -- a worker process -------------------------------------------------------------


@implementer(IReadDescriptor)
class SupervisorPipe:
    """A worker's stdin: a pipe whose other end only the supervisor holds.

    It reaches end-of-file when the supervisor dies, also by SIGKILL, and the
    worker then stops gracefully: an orphaned worker would keep serving its
    socket of the reuseport group, and a new supervisor's sockets would join
    that group behind the orphans' (the steering program picks among the
    first N), so the new workers would get no datagrams."""

    def __init__(self, reactor, fd=0):
        self.reactor = reactor
        self.fd = fd
        self.stopping = False
        fdesc.setNonBlocking(fd)
        reactor.addSystemEventTrigger("before", "shutdown", setattr, self, "stopping", True)

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return "supervisor-pipe"

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return error.ConnectionLost()
        return None if data else error.ConnectionDone()

    def connectionLost(self, reason):
        # End of the pipe or a hang-up (epoll reports one without a read), not
        # the reactor dropping its readers as it stops.
        if not self.stopping:
            log.warn("the supervisor is gone: stopping this worker")
            self.reactor.stop()


def watch_supervisor(reactor, fd=0):
    """Stop the reactor when the supervisor's pipe on ``fd`` closes (a no-op
    when ``fd`` is not a pipe: a worker started by hand)."""
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        reactor.addReader(SupervisorPipe(reactor, fd))


def _status_writer(service, index, stream):
    def write(ready=True):
        udp = getattr(service, "ssp_endpoint", None)
        status = {"index": index, "pid": os.getpid(), "ready": ready,
                  "sessions": len(udp) if udp is not None else 0,
                  "counters": dict(udp.counters) if udp is not None else {},
                  "devices": sorted(getattr(udp.table, "_sessions", ())) if udp is not None
                  and os.environ.get("SSP_WORKER_REPORT_DEVICES") else None}
        try:
            stream.write(json.dumps(status) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass
    return write


def worker_main(argv=None):
    """``python -m broker.workers --index I --http-port P [--config PATH]``: one worker."""
    import argparse

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner

    from broker.config import load_config
    from broker.lifecycle import SignalHandlers
    from broker.logs import LogControl, make_observer
    from broker.service import make_service, tune_garbage_collector
    from broker.systemd import Activation

    parser = argparse.ArgumentParser(prog="broker.workers")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    control = LogControl(config.log.level)
    globalLogBeginner.beginLoggingTo([make_observer(config.log, control, None)],
                                     redirectStandardIO=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    service = make_service(config, reactor=reactor, config_path=args.config, log_control=control,
                           activation=Activation([UDP_FD] if config.ssp.enabled else []),
                           worker=(args.index, args.http_port))
    SignalHandlers(service).setServiceParent(service)
    tune_garbage_collector()
    status = os.fdopen(STATUS_FD, "w")
    write = _status_writer(service, args.index, status)

    def started():
        watch_supervisor(reactor)
        service.startService()
        loop = LoopingCall(write)
        loop.start(STATUS_INTERVAL, now=False)
        reactor.callLater(0.1, write)
    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    worker_main()
