"""Build the broker's MultiService from a validated Config, and run its life cycle.

The registry comes first and the endpoints after it. Each part is a named
child service (`service.getServiceNamed("udp")`), and nothing binds a port
until the service starts. Every endpoint package exposes one
`attach_*(broker)` function that adds its children and resources to a
BrokerService; this module only decides the order and what the config
turns off. Opening the registry is broker.backend's job; parsing, binding
and explaining the listening ports is broker.listeners'.

Hooks for the endpoints (register them in attach_*):

* `broker.drains`: callables taking no argument and returning a Deferred
  (or None). On stop they run first, all at once, right after the HTTP
  listeners stopped accepting: close WebSocket clients with 1001 "going
  away", answer waiting long polls, flush what must reach a client. An
  endpoint may instead do this in its child service's stopService, which
  runs next (the "api" and "websocket" services do).
* `broker.reloaders`: callables taking the new Config (may return a
  Deferred), run on SIGHUP after the file was read and checked: new limits,
  rates, token rules. Settings that name sockets or files keep their
  running values (lifecycle.RESTART_ONLY); `broker.config` is the new one.
* `broker.activation` (systemd.Activation): the UDP service gets its port
  from `broker.systemd.listen_udp(reactor, broker.activation, ...)`, which
  adopts the socket-activated UDP socket if there is one.
* `broker.readiness.checks`: callables returning None when ready, else why not.

Stop order (SIGTERM), steps 1-4 within [broker] stop_timeout seconds:
1. the HTTP (and metrics) listeners stop accepting; /readyz says "stopping";
2. the drains run;
3. every other child stops at once (endpoints answer and close their
   clients; the UDP endpoint saves its SSP sessions to the registry);
4. idle HTTP connections are closed as soon as their answers are written,
   the rest (WebSocket close handshakes) are awaited, then cut off;
5. the registry commits everything queued and closes the store, and the
   data directory's lock (one broker per SQLite store) is released. The
   last line says whether the store holds every change: if not, it names
   the devices whose changes are lost, and twistd exits with UNSTORED.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger

from broker.backend import RegistryService, open_configured_registry
from broker.config import Config, ConfigError, load_config
from broker.files import make_private_dirs
from broker.lifecycle import reloadable, within
from broker.listeners import (FRONT_DOORS, add_listener, config_error_on_bind_failure,
                              format_address, parse_endpoints, use_worker_udp_socket,
                              when_listening)
from broker.logs import LogControl
from broker.metrics import Metrics
from broker.registry.sqlite_backup import LOCK_NAME
from broker.registry.close_report import CloseReport
from broker.ssp import speedups
from broker.systemd import INHERITED, Activation, Notifier
from broker.web.dashboard.resource import RootResource
from broker.web.health import HealthResource, ReadinessResource
from broker.web.commands import CommandSender
from broker.web.metrics import MetricsResource
from broker.web.site import BrokerSite, ConnectionTracker
from broker.workers import exit_with_status_at_exit

log = Logger()

#: exit status of a broker that stopped with changes its store could not hold
#: (systemd then shows the unit failed); a clean or merely unclean stop exits 0.
UNSTORED = 1
#: device names the stop's last line lists at most ("and N more").
NAMES_SHOWN = 20


class _ReloadersFailed(Exception):
    """Reload hooks that raised: the reload is reported failed, not "reloaded"."""

    def __init__(self, failed) -> None:
        super().__init__(failed)
        self.failed = failed


def ensure_private_directory(path: Path) -> Path:
    """Create path with mode 0700 if it is missing (parents made on the way too);
    take group and other bits off one that exists."""
    make_private_dirs(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


class BrokerService(MultiService):
    """The whole broker. Endpoints reach shared parts through its attributes:

    config, reactor, metrics, registry, data_dir, root (the HTTP resource
    tree), site, readiness, drains, reloaders, activation (see the module
    docstring for the hooks).
    """

    def __init__(self, config: Config, reactor=None, *, config_path: str | None = None,
                 log_control: LogControl | None = None, activation: Activation | None = None,
                 environ=None, log_observer=None, worker=None) -> None:
        super().__init__()
        #: (index, shared HTTP port) when this process is one of [broker] workers.
        self.worker = worker
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811 - the global one, only when none is given
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.log_control = log_control or LogControl(config.log.level)
        self.log_observer = log_observer
        self.activation = INHERITED if activation is None else activation
        self.drains = []
        self.reloaders = []
        self.stopping = False
        self.listening = {}
        self._lock_fd = None
        self._lock_pid = None    # the pid written in broker.lock
        self._given_back = None  # the clean-up of a failed start (_give_back)
        self.metrics = Metrics()
        # Every setting that can be checked without binding is checked before
        # anything is created: endpoint strings (and the TLS files they name) first.
        self._endpoints = parse_endpoints(config, reactor, self.activation, worker)
        self.data_dir = self._data_directory()
        # The lock before the store: opening it writes (restart.py's marks), and a
        # second broker on this data directory must change nothing of the first's.
        self._lock_data_directory()
        try:
            self.registry = open_configured_registry(config, self.data_dir, reactor,
                                                     self.metrics)
        except BaseException:
            self._unlock_data_directory()
            raise
        try:
            self._assemble(environ)
        except BaseException:
            self._give_back()
            raise

    def _assemble(self, environ) -> None:
        """The children and resources around the open registry."""
        reactor = self.reactor
        self.metrics.watch_registry(self.registry)
        self.registry_service = RegistryService(self.registry)
        self.registry_service.setServiceParent(self)
        self.notifier = Notifier(reactor, environ)
        self.notifier.setServiceParent(self)

        self.root = RootResource()
        # The registry's own check: with Redis, whether Redis lost its data.
        self.readiness = ReadinessResource([self._not_ready, self.registry.readiness])
        self.root.putChild(b"healthz", HealthResource(reactor))
        self.root.putChild(b"readyz", self.readiness)
        self.site = BrokerSite(self.root, metrics=self.metrics, reactor=reactor)
        self._attach_endpoints()
        self._watch_commands()
        self._add_metrics()
        self.connections = ConnectionTracker(self.site, reactor)
        add_listener(self, "http", self._endpoints["http"], self.connections)

    #: whether a stop that lost changes sets the exit status (UNSTORED): true under
    #: twistd (an Application parent); elsewhere (tests) the process runs on.
    exit_on_loss = False

    def setServiceParent(self, parent) -> None:
        """Under twistd, hand our log observer to the Application, where its AppLogger looks."""
        super().setServiceParent(parent)
        if hasattr(parent, "setComponent"):
            self.exit_on_loss = True
            if self.log_observer is not None:
                parent.setComponent(ILogObserver, self.log_observer)

    def _attach_endpoints(self) -> None:
        from broker.udp.service import attach_udp
        from broker.web.api import attach_api
        from broker.web.dashboard import attach_dashboard
        from broker.web.websocket import attach_websocket

        if self.config.ssp.enabled:
            attach_udp(self)
            if self.worker is not None:
                use_worker_udp_socket(self.getServiceNamed("udp"), self.reactor,
                                      self.activation, self.config.ssp)
        attach_api(self)
        if self.config.websocket.enabled:
            attach_websocket(self)
        attach_dashboard(self)

    def _watch_commands(self) -> None:
        """The endpoints' command outcomes in the metrics (broker_commands_total)."""
        self.metrics.watch_commands("http", self.api.commands.counters)
        factory = getattr(self, "websocket_factory", None)
        if factory is not None:
            self.metrics.watch_commands("websocket", factory.commands.counters)
        endpoint = getattr(self, "ssp_endpoint", None)
        if endpoint is not None and hasattr(self.registry, "relay_to"):
            # Commands other processes relay to this one's sessions: a sender of
            # their own, registered after the endpoints' (the registry keeps the
            # last target), so they count as via="relay", not under an endpoint.
            self.relayed_commands = CommandSender(self.registry, endpoint)
            self.metrics.watch_commands("relay", self.relayed_commands.counters)

    def _add_metrics(self) -> None:
        settings = self.config.metrics
        if not settings.enabled:
            return
        resource = MetricsResource(self.metrics,
                                   require_token=lambda: self.config.metrics.require_token,
                                   check_token=self.registry.check_token)
        if not settings.endpoint:
            self.root.putChild(b"metrics", resource)
            return
        root = RootResource()
        root.putChild(b"metrics", resource)
        site = BrokerSite(root, metrics=self.metrics, reactor=self.reactor)
        add_listener(self, "metrics", self._endpoints["metrics"],
                     ConnectionTracker(site, self.reactor))

    # -- settings checked before anything starts -------------------------------

    def _data_directory(self) -> Path:
        path = self.config.data_path
        try:
            return ensure_private_directory(path)
        except (OSError, ValueError) as problem:
            # ValueError: a NUL in the path (the config refuses one; a caller's Config may not).
            reason = getattr(problem, "strerror", None) or problem
            raise ConfigError(f"{self.config.source}: broker.data_dir: cannot create or use "
                              f"{str(path)!r}: {reason}") from None

    def _lock_data_directory(self) -> None:
        """Hold an exclusive lock on the data directory while running (SQLite only).

        Two brokers on one SQLite store would each keep their own registry in
        memory and overwrite each other's versions and cursors; broker-admin
        takes no lock and works beside a running broker (but for ``restore``,
        which takes this one: sqlite_backup.py).
        """
        if self._lock_fd is not None or self.config.registry.backend != "sqlite":
            return
        path = self.data_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as problem:
            raise ConfigError(f"{self.config.source}: broker.data_dir: cannot create "
                              f"{str(path)!r}: {problem.strerror or problem}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{self.config.source}: broker.data_dir: {str(self.data_dir)!r} is "
                              f"in use by another broker (pid {holder}); stop it or give this "
                              "one another data_dir") from None
        self._lock_fd = fd
        self._write_lock_pid()

    def _write_lock_pid(self) -> None:
        """Name this process in broker.lock: at the lock, and again in startService, since
        a daemon (twistd without --nodaemon) forks after makeService took the lock; the
        flock passes to the child with the descriptor, the pid written must too."""
        if self._lock_fd is None or self._lock_pid == os.getpid():
            return
        self._lock_pid = os.getpid()
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{self._lock_pid}\n".encode("ascii"), 0)

    def _unlock_data_directory(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None
            self._lock_pid = None

    # -- readiness -----------------------------------------------------------

    def _listeners(self):
        return [child for child in self if child.name in FRONT_DOORS]

    def _not_ready(self) -> str | None:
        if self.stopping:
            return "stopping"
        if not self.registry_service.running:
            return "registry store not open"
        waiting = [child.name for child in self._listeners() if child.name not in self.listening]
        udp = self.namedServices.get("udp")
        if udp is not None and getattr(udp, "_port", None) is None:
            waiting.append("udp")
        if waiting:
            return "listeners not up: " + ", ".join(waiting)
        return None

    # -- start ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind the ports (twistd calls this before dropping privileges).

        Raises ConfigError naming the setting when a port cannot be bound,
        after giving back what the start took (``_give_back``).
        """
        self._lock_data_directory()
        Service.privilegedStartService(self)
        try:
            for child in self:
                with config_error_on_bind_failure(self.config, child.name):
                    child.privilegedStartService()
        except BaseException:
            self._give_back()
            raise

    def startService(self) -> None:
        """Start every child (binding what privilegedStartService did not); see there for errors."""
        self._lock_data_directory()
        self._write_lock_pid()
        self.stopping = False
        Service.startService(self)
        try:
            for child in self:
                with config_error_on_bind_failure(self.config, child.name):
                    child.startService()
        except BaseException:
            Service.stopService(self)
            self._give_back()
            raise
        waits = [when_listening(child).addCallback(self._listening_on, child.name)
                 for child in self._listeners()]
        done = defer.DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        done.addCallbacks(self._ready, self._not_listening)

    def _give_back(self) -> None:
        """A start that failed gives back what it took: the children started
        so far (their timers, their ports), ports bound but not started, the
        store and the data directory's lock.

        The store is closed, not dropped: a store left open reads as a crash
        at the next start, which skips the change cursors ahead and resets
        every dashboard and long poll (restart.py). With nothing written yet
        the close (the clean-stop mark) is done before this returns. A later
        ``stopService`` waits for all of it (a worker stops its reactor at
        once after a refusal).
        """
        registry_service = getattr(self, "registry_service", None)
        stops = []
        for child in reversed(list(self)):
            if child is registry_service:
                continue
            if child.running:
                stops.append(defer.maybeDeferred(child.stopService))
            else:
                _unbind(child)
        if not getattr(self.reactor, "running", True):
            # Before reactor.run() (twistd's startService): a port's stop
            # would only end on a reactor turn; nothing was written to wait for.
            stops = []
        done = defer.DeferredList(stops, consumeErrors=True)
        done.addCallback(self._close_after_failed_start)
        self._given_back = done

    def _close_after_failed_start(self, outcomes) -> defer.Deferred:
        for ok, result in outcomes:
            if not ok:
                log.failure("stopping a service after a failed start", result)
        service = getattr(self, "registry_service", None)
        if service is not None and service.running:
            closing = defer.maybeDeferred(service.stopService)
        else:
            closing = defer.maybeDeferred(self.registry.stop)
        closing.addErrback(lambda failure: log.failure(
            "closing the store after a failed start", failure))
        # The lock goes once the store is closed (at once, unless a write
        # was in flight).
        return closing.addBoth(lambda _: self._unlock_data_directory())

    def _listening_on(self, port, name: str) -> None:
        self.listening[name] = port

    def _ready(self, _) -> None:
        ports = dict(self.listening)
        udp = self.namedServices.get("udp")
        if udp is not None and getattr(udp, "_port", None) is not None:
            ports["udp"] = udp._port
        where = {name: format_address(port.getHost()) for name, port in ports.items()}
        status = "serving " + ", ".join(f"{name} on {address}" for name, address in where.items())
        log.info("broker ready: {status}", status=status, **where)
        if self.config.ssp.enabled and speedups.fast_receive is None:
            log.warn("the SSP receive path runs in pure Python, several times slower per "
                     "datagram ({reason}); docs/operations.md says how to build the "
                     "compiled one", reason=speedups.unavailable_reason)
        if self.activation.fds and self.config.ssp.enabled:
            left = self.activation.datagram_socket()
            if left is not None:
                log.warn("systemd passed a UDP socket (fd {fd}) that the SSP endpoint did not "
                         "adopt; it bound [ssp] host and port instead", fd=left[0])
        self.notifier.ready(status)

    def _not_listening(self, failure) -> None:
        log.critical("a listener could not start: {problem}", problem=str(failure.value))

    # -- reload (SIGHUP) -----------------------------------------------------

    @defer.inlineCallbacks
    def reload(self):
        """Re-read the config file and the registry's tokens; nobody is disconnected."""
        self.notifier.reloading()
        status = "serving (reloaded)"
        stage = "reading the config file; nothing of it applies"
        try:
            loaded = load_config(self.config_path) if self.config_path else self.config
            config, kept = reloadable(self.config, loaded)
            stage = "re-reading the registry's devices and tokens; nothing of the file applies"
            yield self.registry.reload()
            # Only now: a reload that failed applied nothing (/metrics reads
            # require_token, a stop stop_timeout, from self.config live).
            if kept:
                log.warn("reload: these settings need a restart and keep their running values: "
                         "{keys}", keys=", ".join(kept))
            self.config = config
            self.log_control.set_level(config.log.level)
            failed = []
            for reloader in list(self.reloaders):
                try:
                    yield reloader(config)
                except Exception:
                    # The others still get the file: one endpoint's bug must not
                    # leave the rest on the old limits.
                    log.failure("reload: {reloader!r} failed", reloader=reloader)
                    failed.append(reloader)
            if failed:
                raise _ReloadersFailed(failed)
        except _ReloadersFailed as problem:
            status = "serving (reload failed: see the log)"
            self.metrics.reloads.labels(outcome="failed").inc()
            log.error("reload failed: {count} of the components could not apply the file "
                      "(their tracebacks are above; the others did, and the log level "
                      "changed): fix the cause, then reload again", count=len(problem.failed))
        except ConfigError as problem:
            status = "serving (reload refused, running configuration kept: see the log)"
            self.metrics.reloads.labels(outcome="refused").inc()
            log.error("reload refused, the running configuration stays: {problem}",
                      problem=str(problem))
        except Exception:
            # Not a file it refused: a bug or the registry failing. Never "reloaded".
            status = "serving (reload failed: see the log)"
            self.metrics.reloads.labels(outcome="failed").inc()
            log.failure("reload failed while {stage}: fix the cause, then reload again",
                        stage=stage)
        else:
            self.metrics.reloads.labels(outcome="applied").inc()
            # Not "log_level": twisted.logger reserves the fields starting with "log_".
            log.info("configuration reloaded from {path} (log level {level_now})",
                     path=self.config_path or "<defaults>", level_now=config.log.level)
        finally:
            self.notifier.ready(status)

    # -- graceful stop (SIGTERM) ---------------------------------------------

    def stopService(self):
        if not self.running:
            # After a failed start: its clean-up, or nothing.
            given_back, self._given_back = self._given_back, None
            if given_back is not None:
                result = defer.Deferred()
                given_back.addBoth(lambda _: result.callback(None))
                return result
            return defer.succeed(None)
        Service.stopService(self)
        self.stopping = True
        return self._stop()

    @defer.inlineCallbacks
    def _stop(self):
        timeout = self.config.broker.stop_timeout
        clock = self.reactor
        started = clock.seconds()

        def left():
            return max(0.0, timeout - (clock.seconds() - started))

        self.notifier.stopping()
        log.info("stopping: no new clients; draining for at most {timeout} s", timeout=timeout)
        yield self._stop_children(self._listeners())
        if self.drains:
            drains = [defer.maybeDeferred(drain) for drain in self.drains]
            yield within(defer.DeferredList(drains, consumeErrors=True), left(), clock,
                         "draining clients")
        # The endpoints' own stopService say goodbye too (WebSocket close 1001,
        # long polls answered, SSP sessions saved): they run before the store closes.
        others = [child for child in reversed(list(self))
                  if child.running and child is not self.registry_service]
        yield within(self._stop_children(others), left(), clock, "stopping the endpoints")
        aborted = yield self.connections.close_all(left())
        if aborted:
            log.warn("stopping: cut off {count} connection(s) still open after {timeout} s",
                     count=aborted, timeout=timeout)
        report = yield self._stop_registry()
        self._unlock_data_directory()
        self._say_stopped(report, round(clock.seconds() - started, 3))

    def _stop_registry(self) -> defer.Deferred:
        """Stop the registry service: its CloseReport (SQLite, Redis), None (a store
        that reports nothing: memory), or False (stopping failed, logged)."""
        if not self.registry_service.running:
            return defer.succeed(None)

        def failed(failure):
            log.failure("stopping {name} failed", failure, name=self.registry_service.name)
            return False
        return defer.maybeDeferred(self.registry_service.stopService).addErrback(failed)

    def _say_stopped(self, report, seconds) -> None:
        """The stop's last line: it claims a committed store only if the store said so."""
        if report is False:
            log.error("stopped after {seconds} s; the store may not hold every change "
                      "(stopping the registry failed, see above)", seconds=seconds)
        elif not isinstance(report, CloseReport):
            # Nothing known (the memory store keeps nothing anyway): never "committed".
            log.info("stopped after {seconds} s; store closed (it reports nothing of "
                     "what it holds)", seconds=seconds)
        elif report.unstored:
            names = report.unstored
            unclean = "; the next start is unclean" if report.restart_mark else ""
            log.error("stopped after {seconds} s, but the changes of {count} device(s) could "
                      "not be stored ({error}) and are lost: {devices}{unclean}",
                      seconds=seconds, count=len(names), error=report.error or "see above",
                      devices=name_devices(names), unclean=unclean, exit_status=UNSTORED)
            if self.exit_on_loss:
                exit_with_status_at_exit(UNSTORED)
        elif report.clean:
            log.info("stopped: store committed and closed after {seconds} s", seconds=seconds)
        elif report.restart_mark:
            log.warn("stopped: store committed and closed after {seconds} s; the next start "
                     "is unclean (a commit failed during this run: {error})",
                     seconds=seconds, error=report.error or "see above")
        else:
            # (Redis did not answer the last call, but no change was waiting for it.)
            log.warn("stopped after {seconds} s; the store holds every change it "
                     "acknowledged and none was left to store, but its last call failed "
                     "({error})", seconds=seconds, error=report.error or "see above")

    @staticmethod
    def _stop_children(children) -> defer.Deferred:
        running = [child for child in children if child.running]

        def report(outcomes):
            for child, (ok, result) in zip(running, outcomes):
                if not ok:
                    log.failure("stopping {name} failed", result, name=child.name)

        stops = [defer.maybeDeferred(child.stopService) for child in running]
        return defer.DeferredList(stops, consumeErrors=True).addCallback(report)


def name_devices(names, shown=NAMES_SHOWN) -> str:
    """The first ``shown`` names, then how many more: a bounded log line."""
    text = ", ".join(names[:shown])
    if len(names) > shown:
        text += f" and {len(names) - shown} more"
    return text


def _unbind(child) -> None:
    """Close the port a listener bound in privilegedStartService, if any."""
    waiting = getattr(child, "_waitingForPort", None)  # a StreamServerEndpointService
    if waiting is not None:
        waiting.addCallback(lambda port: port and port.stopListening())
        waiting.addErrback(lambda _: None)  # its own failure is being raised
    port = getattr(child, "_port", None)  # UDPService
    if port is not None:
        port.stopListening()


def make_service(config: Config, reactor=None, **options) -> BrokerService:
    """The broker service for config (nothing is bound until it starts).

    Options: config_path (re-read on SIGHUP), log_control (the installed log
    observer's level), log_observer (for twistd's Application), activation
    (systemd sockets; default: this process's), environ (for $NOTIFY_SOCKET
    and $WATCHDOG_USEC; default os.environ).
    """
    return BrokerService(config, reactor, **options)
