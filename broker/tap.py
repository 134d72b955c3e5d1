"""`twistd broker`: command-line options and the service they build."""

from __future__ import annotations

# First: snapshot systemd's socket-activation variables before anything
# imports twisted.internet.endpoints, which removes them from the environment.
import broker.systemd  # noqa: F401,I001

import sys

from twisted.python import usage

from broker.config import ConfigError, load_config
from broker.lifecycle import SignalHandlers
from broker.logs import LogControl, ObserverFactory
from broker.registry.errors import StoreError
from broker.service import make_service, tune_garbage_collector


class Options(usage.Options):
    """Options of `twistd broker`; everything else lives in the TOML config file."""

    synopsis = "[--config PATH]"
    longdesc = ("Run the ssp-broker: the UDP SSP endpoint for sensor nodes, and the HTTP "
                "port with the REST API, long polling, WebSocket and dashboard.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded defaults)."],
    ]

    def postOptions(self) -> None:
        try:
            self["settings"] = settings = load_config(self["config"])
        except ConfigError as problem:
            # One line naming file, key and problem: twistd would bury it under the usage text.
            sys.stderr.write(f"twistd broker: {problem}\n")
            raise SystemExit(2) from None
        self["log_control"] = control = LogControl(settings.log.level)
        self["log_factory"] = self._log_factory(settings, control)

    def _log_factory(self, settings, control) -> ObserverFactory | None:
        """Our observer, unless twistd's --logger or --syslog asked for another one.

        twistd's AppLogger starts after makeService and installs the
        Application's ILogObserver component when no --logger was given;
        BrokerService sets that component when twistd parents it.
        """
        parent = self.parent
        if parent is None:
            return ObserverFactory(settings.log, control)
        if parent.get("logger") or parent.get("syslog"):
            return None
        path = parent.get("logfile")
        if not path and not parent.get("nodaemon"):
            path = "twistd.log"  # twistd's own default for a daemon
        return ObserverFactory(settings.log, control, path)


def makeService(options: Options):
    """Called by twistd with parsed options; a store or endpoint that cannot be used stops startup."""
    factory = options.get("log_factory")
    settings = options["settings"]
    if settings.broker.workers > 1:
        return _supervisor(options, factory)
    try:
        service = make_service(options["settings"], config_path=options["config"],
                               log_control=options.get("log_control"),
                               log_observer=factory() if factory is not None else None)
    except (StoreError, ConfigError) as problem:
        sys.stderr.write(f"twistd broker: {problem}\n")
        raise SystemExit(2) from None
    SignalHandlers(service).setServiceParent(service)
    tune_garbage_collector()
    return service


def _supervisor(options: Options, factory):
    """workers > 1: this process only runs the workers (broker.workers)."""
    from broker.workers import SupervisorService

    try:
        service = SupervisorService(options["settings"], options["config"])
    except (ConfigError, OSError) as problem:
        sys.stderr.write(f"twistd broker: {problem}\n")
        raise SystemExit(2) from None
    if factory is not None and hasattr(service, "setServiceParent"):
        service.log_observer = factory()
    SignalHandlers(service).setServiceParent(service)
    return service
