"""Build the broker's MultiService from a validated Config, and run its life cycle.

The registry comes first and the endpoints after it. Each part is a named
child service (`service.getServiceNamed("udp")`), and nothing binds a port
until the service starts. Every endpoint package exposes one
`attach_*(broker)` function that adds its children and resources to a
BrokerService; this module only decides the order and what the config
turns off.

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
5. the registry commits everything queued and closes the store.
"""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError, InvalidAddressError
from twisted.logger import ILogObserver, Logger
from twisted.web.resource import Resource

from broker.config import Config, ConfigError, load_config
from broker.lifecycle import reloadable, within
from broker.logs import LogControl
from broker.metrics import InstrumentedStore, Metrics
from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.systemd import INHERITED, Activation, Notifier
from broker.web.health import HealthResource, ReadinessResource
from broker.web.metrics import MetricsResource
from broker.web.site import BrokerSite, ConnectionTracker

log = Logger()

#: listeners that take new clients: closed first on stop.
FRONT_DOORS = ("http", "metrics")


def ensure_private_directory(path: Path) -> Path:
    """Create path with mode 0700 if it is missing; take group and other bits off one that exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


def tune_garbage_collector() -> None:
    """Make the collector cheap for a process that holds a large, long-lived registry.

    Every write in flight holds a few objects until its group commit, which
    with the default thresholds triggers full collections that walk every
    device (measured: a third of the registry's CPU at 10,000 devices).
    Objects alive after startup are moved out of the collector's sight.
    Process-wide, so only the twistd entry points call it, never library code.
    """
    gc.freeze()
    gc.set_threshold(10_000, 50, 10)


def registry_settings(config: Config) -> RegistrySettings:
    """The registry's own settings from the [registry] section."""
    section = config.registry
    return RegistrySettings(history_size=section.history_size,
                            max_state_bytes=section.max_state_bytes,
                            feed_retention=section.feed_retention)


#: [registry] settings naming files the Redis client reads when it connects.
REDIS_FILES = ("redis_password_file", "redis_tls_ca_file", "redis_tls_cert_file",
               "redis_tls_key_file")


def check_readable_files(config: Config, section: str, keys) -> None:
    """Raise ConfigError naming the first key whose file cannot be read (empty: not used)."""
    settings = getattr(config, section)
    for key in keys:
        path = getattr(settings, key)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as problem:
            raise ConfigError(f"{config.source}: {section}.{key}: cannot read {path!r}: "
                              f"{problem.strerror or problem}") from None


def redis_options(config: Config):
    """How to reach Redis, from the [registry] redis_* settings (ConfigError: a file is unreadable)."""
    from broker.registry.redis_store import RedisOptions
    check_readable_files(config, "registry", REDIS_FILES)
    section = config.registry
    return RedisOptions(url=section.redis_url, cluster=section.redis_cluster,
                        key_prefix=section.redis_key_prefix, username=section.redis_username,
                        password_file=section.redis_password_file,
                        tls_ca_file=section.redis_tls_ca_file,
                        tls_cert_file=section.redis_tls_cert_file,
                        tls_key_file=section.redis_tls_key_file,
                        wait_replicas=section.redis_wait_replicas,
                        wait_timeout=section.redis_wait_timeout,
                        stream_length=section.redis_stream_length)


def open_configured_registry(config: Config, data_dir: Path, reactor,
                             metrics: Metrics | None = None) -> DeviceRegistry:
    """The registry over the configured backend (raises StoreError on a bad database).

    With metrics, the store is wrapped so that commits are counted and timed.
    """
    settings = registry_settings(config)
    if config.registry.backend == "redis":
        from broker.registry.shared import open_shared_registry
        wrapper = None if metrics is None else (lambda store: InstrumentedStore(store, metrics))
        return open_shared_registry(redis_options(config), reactor=reactor, settings=settings,
                                    store_wrapper=wrapper,
                                    lease_ttl=config.registry.redis_lease_ttl,
                                    lease_check_interval=config.registry.redis_lease_check_interval)
    if config.registry.backend == "memory":
        store = MemoryStore()
    else:
        from broker.registry.sqlite_store import SQLiteStore
        store = SQLiteStore.in_directory(data_dir, reactor=reactor, settings=settings)
    try:
        wrapped = store if metrics is None else InstrumentedStore(store, metrics)
        return DeviceRegistry(wrapped, clock=reactor, settings=settings)
    except BaseException:
        store.close()
        raise


def when_listening(endpoint_service) -> defer.Deferred:
    """The IListeningPort of a started StreamServerEndpointService, leaving its own result intact."""
    found = defer.Deferred()

    def share(port):
        found.callback(port)
        return port

    def failed(failure):
        found.errback(failure)
        return failure

    endpoint_service._waitingForPort.addCallbacks(share, failed)
    return found


def _address(address) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


class RegistryService(Service):
    """Runs the registry's background work; stopping it commits what is pending."""

    name = "registry"

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    def startService(self) -> None:
        super().startService()
        self.registry.start()

    def stopService(self):
        super().stopService()
        return defer.maybeDeferred(self.registry.stop)


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
        self.metrics = Metrics()
        # Every setting that can be checked without binding is checked before
        # anything is created: endpoint strings (and the TLS files they name) first.
        self._endpoints = self._parse_endpoints()
        self.data_dir = self._data_directory()
        self.registry = open_configured_registry(config, self.data_dir, reactor, self.metrics)
        self.metrics.watch_registry(self.registry)
        self.registry_service = RegistryService(self.registry)
        self.registry_service.setServiceParent(self)
        self.notifier = Notifier(reactor, environ)
        self.notifier.setServiceParent(self)

        self.root = Resource()
        self.readiness = ReadinessResource([self._not_ready])
        self.root.putChild(b"healthz", HealthResource(reactor))
        self.root.putChild(b"readyz", self.readiness)
        self.site = BrokerSite(self.root, metrics=self.metrics, reactor=reactor)
        self._attach_endpoints()
        self._add_metrics()
        self.connections = ConnectionTracker(self.site, reactor)
        self._add_listener("http", self.connections)

    def setServiceParent(self, parent) -> None:
        """Under twistd, hand our log observer to the Application, where its AppLogger looks."""
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    def _attach_endpoints(self) -> None:
        from broker.udp.service import attach_udp
        from broker.web.api import attach_api
        from broker.web.dashboard import attach_dashboard
        from broker.web.websocket import attach_websocket

        if self.config.ssp.enabled:
            attach_udp(self)
            if self.worker is not None:
                self._adopt_worker_udp(self.getServiceNamed("udp"))
        attach_api(self)
        if self.config.websocket.enabled:
            attach_websocket(self)
        attach_dashboard(self)

    def _adopt_worker_udp(self, udp) -> None:
        """A worker's SSP port is the steered socket its supervisor passed (broker.workers)."""
        from broker.systemd import listen_udp

        def get_port():
            return listen_udp(self.reactor, self.activation, udp.endpoint,
                              port=self.config.ssp.port, interface=self.config.ssp.host)
        udp._getPort = get_port

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
        root = Resource()
        root.putChild(b"metrics", resource)
        site = BrokerSite(root, metrics=self.metrics, reactor=self.reactor)
        self._add_listener("metrics", ConnectionTracker(site, self.reactor))

    # -- settings checked before anything starts -------------------------------

    def _data_directory(self) -> Path:
        path = self.config.data_path
        try:
            return ensure_private_directory(path)
        except OSError as problem:
            raise ConfigError(f"{self.config.source}: broker.data_dir: cannot create or use "
                              f"{str(path)!r}: {problem.strerror or problem}") from None

    def _parse_endpoints(self) -> dict:
        """{listener name: (endpoint, raise at start)} for the HTTP and metrics listeners."""
        parsed = {"http": self._parse_endpoint("http", self.config.http.endpoint)}
        metrics = self.config.metrics
        if metrics.enabled and metrics.endpoint:
            parsed["metrics"] = self._parse_endpoint("metrics", metrics.endpoint)
        return parsed

    def _parse_endpoint(self, name: str, description: str):
        key = f"{name}.endpoint"
        try:
            if self.worker is not None and name == "http":
                from broker.workers import ReusePortEndpoint, parse_tcp_endpoint
                host, _, backlog = parse_tcp_endpoint(description)
                return ReusePortEndpoint(self.reactor, host, self.worker[1], backlog), False
            return endpoints.serverFromString(self.reactor, description), True
        except OSError as problem:
            # ssl: endpoints read their certificate and key files while parsing.
            raise ConfigError(f"{self.config.source}: {key}: cannot use {description!r}: cannot "
                              f"read {problem.filename or 'a file it names'}: "
                              f"{problem.strerror or problem}") from None
        except (ValueError, KeyError, IndexError) as problem:
            hint = ""
            if description.startswith("systemd:") and not self.activation.fds:
                hint = " (no socket was passed by systemd: is the .socket unit enabled?)"
            raise ConfigError(f"{self.config.source}: {key}: cannot use {description!r}: "
                              f"{problem!r}{hint}") from None

    def _add_listener(self, name: str, factory) -> None:
        endpoint, raise_at_start = self._endpoints[name]
        listener = StreamServerEndpointService(endpoint, factory)
        # What strports.service sets: a port that cannot be bound raises from
        # (privileged)startService, where _start_child names its setting.
        listener._raiseSynchronously = raise_at_start
        listener.setName(name)
        listener.setServiceParent(self)

    def _listen_problem(self, name: str, problem: Exception) -> str | None:
        """One line naming the setting behind a listener that could not bind, or None."""
        reason = problem.socketError if isinstance(problem, CannotListenError) else problem
        if isinstance(reason, InvalidAddressError):
            text = reason.message
        else:
            text = getattr(reason, "strerror", None) or str(reason)
        if name == "udp":
            ssp = self.config.ssp
            wrong_host = (isinstance(reason, InvalidAddressError)
                          or getattr(reason, "errno", None) == errno.EADDRNOTAVAIL)
            key = "ssp.host" if wrong_host else "ssp.port"
            host = f"[{ssp.host}]" if ":" in ssp.host else ssp.host
            where = f"UDP {host}:{ssp.port}"
        elif name in FRONT_DOORS:
            key = f"{name}.endpoint"
            where = repr(getattr(self.config, name).endpoint)
        else:
            return None
        return f"{self.config.source}: {key}: cannot listen on {where}: {text}"

    def _start_child(self, child, start) -> None:
        """Run a child's (privileged)startService; a port it cannot bind is a ConfigError."""
        try:
            start()
        except (CannotListenError, InvalidAddressError, OSError) as problem:
            message = self._listen_problem(child.name, problem)
            if message is None:
                raise
            raise ConfigError(message) from None

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

        Raises ConfigError naming the setting when a port cannot be bound;
        the children started so far stay started (stopService stops them).
        """
        Service.privilegedStartService(self)
        for child in self:
            self._start_child(child, child.privilegedStartService)

    def startService(self) -> None:
        """Start every child (binding what privilegedStartService did not); see there for errors."""
        self.stopping = False
        Service.startService(self)
        for child in self:
            self._start_child(child, child.startService)
        waits = [when_listening(child).addCallback(self._listening_on, child.name)
                 for child in self._listeners()]
        done = defer.DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        done.addCallbacks(self._ready, self._not_listening)

    def _listening_on(self, port, name: str) -> None:
        self.listening[name] = port

    def _ready(self, _) -> None:
        ports = dict(self.listening)
        udp = self.namedServices.get("udp")
        if udp is not None and getattr(udp, "_port", None) is not None:
            ports["udp"] = udp._port
        where = {name: _address(port.getHost()) for name, port in ports.items()}
        status = "serving " + ", ".join(f"{name} on {address}" for name, address in where.items())
        log.info("broker ready: {status}", status=status, **where)
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
        try:
            loaded = load_config(self.config_path) if self.config_path else self.config
            config, kept = reloadable(self.config, loaded)
            if kept:
                log.warn("reload: these settings need a restart and keep their running values: "
                         "{keys}", keys=", ".join(kept))
            self.config = config
            self.log_control.set_level(config.log.level)
            yield self.registry.reload()
            for reloader in list(self.reloaders):
                try:
                    yield reloader(config)
                except Exception:
                    log.failure("reload: {reloader!r} failed", reloader=reloader)
        except ConfigError as problem:
            self.metrics.reloads.labels(outcome="refused").inc()
            log.error("reload refused, the running configuration stays: {problem}",
                      problem=str(problem))
        else:
            self.metrics.reloads.labels(outcome="applied").inc()
            log.info("configuration reloaded from {path}", path=self.config_path or "<defaults>",
                     log_level_now=config.log.level)
        finally:
            self.notifier.ready("serving (reloaded)")

    # -- graceful stop (SIGTERM) ---------------------------------------------

    def stopService(self):
        if not self.running:
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
        yield self._stop_children([self.registry_service])
        log.info("stopped: store committed and closed after {seconds} s",
                 seconds=round(clock.seconds() - started, 3))

    @staticmethod
    def _stop_children(children) -> defer.Deferred:
        running = [child for child in children if child.running]

        def report(outcomes):
            for child, (ok, result) in zip(running, outcomes):
                if not ok:
                    log.failure("stopping {name} failed", result, name=child.name)

        stops = [defer.maybeDeferred(child.stopService) for child in running]
        return defer.DeferredList(stops, consumeErrors=True).addCallback(report)


def make_service(config: Config, reactor=None, **options) -> BrokerService:
    """The broker service for config (nothing is bound until it starts).

    Options: config_path (re-read on SIGHUP), log_control (the installed log
    observer's level), log_observer (for twistd's Application), activation
    (systemd sockets; default: this process's), environ (for $NOTIFY_SOCKET
    and $WATCHDOG_USEC; default os.environ).
    """
    return BrokerService(config, reactor, **options)
