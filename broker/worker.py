"""One worker process of ``[broker] workers = N``: ``python -m broker.worker``.

Its supervisor (broker/workers.py) passes it the steered UDP socket of its
index (fd 3) and a status pipe (fd 4), and holds the other end of its
stdin: the worker stops when that pipe closes (the supervisor is gone),
and reads the supervisor's restart counts from it. With ``--log-relay``
its stdout and stderr are pipes to the supervisor too: it logs JSON
records there, which the supervisor writes to its own log (broker.logs,
WorkerLogRelay). Those records and the status lines are written without
ever blocking (PipeWriter): a supervisor that stops reading costs log
lines, never the worker's service. A config file or port it cannot use is
one line on stderr and exit status 2, which the supervisor counts as the
worker's failure. A stop that lost changes exits 1 (broker.service.UNSTORED),
which the supervisor makes its own exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import sys
import threading
import time

from prometheus_client.core import CounterMetricFamily
from twisted.internet import error, fdesc
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from broker.config import ConfigError, load_config

log = Logger()

#: seconds between the status lines a worker writes to its supervisor.
STATUS_INTERVAL = 1.0
#: the inherited descriptors of a worker.
UDP_FD = 3
STATUS_FD = 4
#: exit status of a worker whose configuration cannot be used (as broker.tap's REFUSED).
WORKER_REFUSED = 2
#: bytes of log lines a worker keeps waiting beyond what its pipe holds (64 KiB on
#: Linux) while the supervisor does not read; lines beyond are dropped and counted.
LOG_BACKLOG_BYTES = 1 << 20
#: the same for status lines (a snapshot a second: a stale one is worth nothing).
STATUS_BACKLOG_BYTES = 1 << 16
#: seconds a stopping worker waits for the supervisor to take its last lines.
FINAL_FLUSH_TIMEOUT = 1.0


@implementer(IReadDescriptor)
class SupervisorPipe:
    """A worker's stdin: a pipe whose other end only the supervisor holds.

    It reaches end-of-file when the supervisor dies, also by SIGKILL, and the
    worker then stops gracefully: an orphaned worker would keep serving its
    socket of the reuseport group, and a new supervisor's sockets would join
    that group behind the orphans' (the steering program picks among the
    first N), so the new workers would get no datagrams."""

    #: longest line kept from the supervisor (its lines are a few hundred bytes).
    MAX_LINE = 65536

    def __init__(self, reactor, fd=0, on_message=None):
        self.reactor = reactor
        self.fd = fd
        self.stopping = False
        #: called with each JSON object the supervisor writes, one per line.
        self.on_message = on_message
        self._buffer = b""
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
        if not data:
            return error.ConnectionDone()
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > self.MAX_LINE:
            self._buffer = b""
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and self.on_message is not None:
                self.on_message(message)
        return None

    def connectionLost(self, reason):
        # End of the pipe or a hang-up (epoll reports one without a read), not
        # the reactor dropping its readers as it stops.
        if not self.stopping:
            log.warn("the supervisor is gone: stopping this worker")
            self.reactor.stop()


def watch_supervisor(reactor, fd=0, on_message=None):
    """Stop the reactor when the supervisor's pipe on ``fd`` closes, and hand what
    it says to on_message (a no-op when ``fd`` is not a pipe: a worker started by hand)."""
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        reactor.addReader(SupervisorPipe(reactor, fd, on_message))


@implementer(IWriteDescriptor)
class PipeWriter:
    """Lines to a pipe the supervisor reads, written without ever blocking the reactor.

    A supervisor that does not read (stopped, in a debugger, blocked on its
    own output) fills the pipe; a blocking write would then freeze this
    worker's reactor, and its service with it. Here the descriptor is
    non-blocking: what the pipe does not take waits in memory (up to
    ``backlog`` bytes) and goes out when the reactor says the pipe is
    writable; a line that does not fit is dropped whole and counted, and
    once the backlog is written ``notice(count)`` (a line saying so) follows.
    Loggers may call from any thread: the state is behind a lock.
    """

    def __init__(self, reactor, fd, backlog=LOG_BACKLOG_BYTES, notice=None):
        self.reactor = reactor
        self.fd = fd
        self.backlog = backlog
        self.notice = notice
        #: lines dropped since the last notice, and in all.
        self.dropped = 0
        self.dropped_total = 0
        self._pending = bytearray()
        self._watching = False
        self._closed = False
        # Reentrant: the thread writing may log again from within (the garbage
        # collector running a Deferred's __del__, a signal handler); such lines
        # wait in _nested while _depth says a write is under way (write_line).
        self._lock = threading.RLock()
        self._depth = 0
        self._nested = []
        self._home = threading.get_ident()
        fdesc.setNonBlocking(fd)

    # what JSONLinesObserver and the status writer call: one write per line
    def write(self, text: str) -> None:
        self.write_line(text.encode("utf-8", "backslashreplace"))

    def flush(self) -> None:
        pass

    def write_line(self, data: bytes) -> bool:
        """Write or queue one line; False if it was dropped (or nobody reads any more)."""
        with self._lock:
            if self._depth:
                # Logged from within a write on this thread: written now, it could
                # cut the outer line in two; it joins the backlog after it instead.
                self._nested.append(data)
                return True
            with self._held():
                if self._closed:
                    return False
                if self._pending:
                    return self._queue(data)
                written = self._write(data)
                if written is None or written == len(data):
                    return written is not None
                # The rest of a line the pipe took a part of is always kept: a line
                # cut in two would garble the supervisor's next record.
                self._pending += data[written:]
                return True

    @contextlib.contextmanager
    def _held(self):
        """The lock, with a write under way; on release, lines logged meanwhile
        from within join the backlog, and the reactor watches the pipe if need be."""
        watch = False
        try:
            with self._lock:
                self._depth += 1
                try:
                    yield
                finally:
                    self._merge_nested()
                    self._depth -= 1
                    watch = bool(self._pending) and not self._watching and not self._closed
                    if watch:
                        self._watching = True
        finally:
            # Also when the body raised: data that waits is always watched for.
            if watch:
                if threading.get_ident() == self._home:
                    self.reactor.addWriter(self)
                else:
                    self.reactor.callFromThread(self.reactor.addWriter, self)

    def _merge_nested(self) -> None:
        """Lines logged from within a write join the backlog (lock held, depth > 0)."""
        while self._nested:
            lines, self._nested = self._nested, []
            for line in lines:
                if not self._closed:
                    self._queue(line)

    def _queue(self, data) -> bool:
        """Add a line to the backlog, or drop and count it when it is full (lock held)."""
        if len(self._pending) + len(data) > self.backlog:
            self.dropped += 1
            self.dropped_total += 1
            return False
        self._pending += data
        return True

    def _write(self, data) -> int | None:
        """Bytes the pipe took now (0 when full); None once nobody reads (lock held)."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            # EPIPE: the supervisor is gone (and this worker stops: SupervisorPipe).
            self._closed = True
            self._pending.clear()
            return None

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return "supervisor-log-pipe"

    def doWrite(self):
        with self._held():
            written = self._write(self._pending) if self._pending else 0
            if written:
                del self._pending[:written]
            if self._pending and not self._closed:
                return None
            # Under the lock: a line logged meanwhile makes _held watch again.
            self._watching = False
            self.reactor.removeWriter(self)
            dropped, self.dropped = self.dropped, 0
        if dropped and self.notice is not None:
            self.write_line(self.notice(dropped).encode("utf-8", "backslashreplace"))
        return None

    def connectionLost(self, reason):
        # The reactor dropping its writers as it stops: what waits is left for
        # flush_now(). (No lock: this may run inside a write, as the reactor stops.)
        self._watching = False

    def flush_now(self, timeout=FINAL_FLUSH_TIMEOUT) -> bool:
        """Write what waits, for at most ``timeout`` seconds (a stopping worker's last
        lines, the reactor gone); True if nothing is left."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._depth += 1
                try:
                    if self._pending and not self._closed:
                        written = self._write(self._pending)
                        if written:
                            del self._pending[:written]
                finally:
                    self._merge_nested()
                    self._depth -= 1
                if not self._pending or self._closed:
                    return not self._pending
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([], [self.fd], [], left)


class WorkerRestarts:
    """``broker_worker_restarts_total{worker}``: the supervisor's restarts of each
    worker, as it last told this worker. Every worker exports all of them, so a
    scrape of the shared HTTP port sees the same series whichever worker answers."""

    def __init__(self) -> None:
        self.counts = ()

    def update(self, message) -> None:
        counts = message.get("restarts")
        if isinstance(counts, list) and all(type(n) is int for n in counts):
            self.counts = tuple(counts)

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        for index, count in enumerate(self.counts):
            family.add_metric([str(index)], count)
        return [family]

    @staticmethod
    def _family():
        return CounterMetricFamily("broker_worker_restarts", "Restarts of each worker by the "
                                   "supervisor after it died (docs/operations.md).",
                                   labels=["worker"])


class LogLinesDropped:
    """``broker_worker_log_lines_dropped_total``: this worker's log lines dropped because
    the supervisor did not read its pipe (PipeWriter)."""

    def __init__(self, relay) -> None:
        self.relay = relay

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        family.add_metric([], self.relay.dropped_total)
        return [family]

    @staticmethod
    def _family():
        return CounterMetricFamily("broker_worker_log_lines_dropped", "Log lines this worker "
                                   "dropped: the supervisor did not read them in time.")


def ignore_supervisor_signals():
    """Signals meant for the supervisor that a worker must survive: SIGINT (a Ctrl-C in
    a terminal reaches the whole process group; the supervisor stops us), and SIGUSR1
    (log rotation: the supervisor writes the log; ``systemctl kill -s USR1`` signals
    every process of the unit, and its default action would kill us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


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
    """``python -m broker.worker --index I --http-port P [--config PATH]``: one worker."""
    import argparse

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner

    from broker.lifecycle import SignalHandlers
    from broker.logs import (LogControl, dropped_lines_record, make_observer,
                             make_relay_observer)
    from broker.registry.errors import StoreError
    from broker.collector import tune_garbage_collector
    from broker.service import make_service
    from broker.systemd import Activation

    parser = argparse.ArgumentParser(prog="broker.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--log-relay", action="store_true",
                        help="log JSON records on stdout for the supervisor to relay")
    args = parser.parse_args(argv)

    def refuse(problem):
        # One line, and a status the supervisor counts as this worker's failure.
        sys.stderr.write(f"broker worker {args.index}: {problem}\n")
        sys.stderr.flush()

    try:
        # The file is read again at each start: an edit since the supervisor
        # started may have broken it.
        config = load_config(args.config)
    except ConfigError as problem:
        refuse(problem)
        raise SystemExit(WORKER_REFUSED) from None
    control = LogControl(config.log.level)
    relay = None
    if args.log_relay:
        # The supervisor writes these to its own log: its --logfile (a daemon's
        # stdout is /dev/null), in its format, each line tagged with our index.
        relay = PipeWriter(reactor, 1, notice=dropped_lines_record)
        observer = make_relay_observer(control, relay)
    else:
        observer = make_observer(config.log, control, None)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    ignore_supervisor_signals()
    try:
        service = make_service(config, reactor=reactor, config_path=args.config,
                               log_control=control,
                               activation=Activation([UDP_FD] if config.ssp.enabled else [],
                                                     origin="the supervisor's"),
                               worker=(args.index, args.http_port))
    except (ConfigError, StoreError) as problem:
        refuse(problem)
        raise SystemExit(WORKER_REFUSED) from None
    # No Application parent here: a stop that lost changes must still exit with
    # UNSTORED, the status the supervisor passes on to systemd (broker/workers.py).
    service.exit_on_loss = True
    restarts = WorkerRestarts()
    service.metrics.registry.register(restarts)
    if relay is not None:
        service.metrics.registry.register(LogLinesDropped(relay))
    SignalHandlers(service).setServiceParent(service)
    tune_garbage_collector()
    status = PipeWriter(reactor, STATUS_FD, backlog=STATUS_BACKLOG_BYTES)
    write = _status_writer(service, args.index, status)

    refused = []

    def started():
        watch_supervisor(reactor, on_message=restarts.update)
        try:
            service.startService()
        except ConfigError as problem:
            # A port it cannot bind: a worker left half started would never be
            # ready, nor restarted; exiting lets the supervisor count it.
            refuse(problem)
            refused.append(problem)
            reactor.stop()
            return
        loop = LoopingCall(write)
        loop.start(STATUS_INTERVAL, now=False)
        reactor.callLater(0.1, write)
    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    if relay is not None:
        relay.flush_now()
    if refused:
        raise SystemExit(WORKER_REFUSED)


if __name__ == "__main__":
    worker_main()
