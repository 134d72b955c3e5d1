"""`twistd broker`: command-line options and the service they build.

A setting the broker cannot use stops startup with one line on stderr,
"twistd broker: FILE: KEY: PROBLEM", and exit status 2: `refuse` is the only
way out for a ConfigError (or a store that cannot be opened), whether it is
found while reading the file, while building the service, or while binding
the ports when twistd starts it.
"""

from __future__ import annotations

# First: snapshot systemd's socket-activation variables before anything
# imports twisted.internet.endpoints, which removes them from the environment.
import broker.systemd  # noqa: F401,I001

import os
import sys
from typing import NoReturn

from twisted.python import usage

from broker.collector import tune_garbage_collector
from broker.config import ConfigError, load_config
from broker.lifecycle import SignalHandlers
from broker.logs import LogControl, ObserverFactory
from broker.registry.errors import StoreError
from broker.service import BrokerService

#: exit status of a broker that refused to start.
REFUSED = 2


def refuse(problem, stream=None) -> NoReturn:
    """Write one line naming the file, key and problem, and exit with status 2.

    twistd would bury the line under its usage text or a traceback.
    """
    (stream or sys.stderr).write(f"twistd broker: {problem}\n")
    raise SystemExit(REFUSED)


class Options(usage.Options):
    """Options of `twistd broker`; everything else lives in the TOML config file."""

    synopsis = "[--config PATH]"
    longdesc = ("Run the ssp-broker: the UDP SSP endpoint for sensor nodes, and the HTTP "
                "port with the REST API, long polling, WebSocket and dashboard.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded defaults)."],
    ]

    def postOptions(self) -> None:
        if self["config"] == "":
            # open("") would say "cannot read" without naming any file.
            refuse("--config: the path is empty (leave the option out for the embedded defaults)")
        try:
            self["settings"] = settings = load_config(self["config"])
        except ConfigError as problem:
            refuse(problem)
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


class TwistdBrokerService(BrokerService):
    """The broker as twistd runs it: a port it cannot bind ends startup like a bad setting.

    twistd binds the ports after makeService returned, in
    privilegedStartService, with its log already capturing sys.stderr: the
    one line goes to the process's real stderr. A daemon's stderr is
    /dev/null, so there the ConfigError goes on to twistd, which hands it to
    the waiting parent process ("An error has occurred: ...").
    """

    def __init__(self, *args, twistd_options=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.twistd_options = twistd_options

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ConfigError as problem:
            self._refuse(problem)

    def startService(self) -> None:
        try:
            super().startService()
        except ConfigError as problem:
            self._refuse(problem)

    def _refuse(self, problem: ConfigError) -> NoReturn:
        twistd = self.twistd_options
        if twistd is None:
            refuse(problem)
        if not twistd.get("nodaemon"):
            raise problem
        pidfile = twistd.get("pidfile")
        if pidfile:
            # twistd removes it only for an Exception, and we leave with SystemExit.
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        refuse(problem, sys.__stderr__)


def makeService(options: Options):
    """Called by twistd with parsed options; a store or endpoint that cannot be used stops startup."""
    factory = options.get("log_factory")
    settings = options["settings"]
    if settings.broker.workers > 1:
        return _supervisor(options, factory)
    # Absolute: twistd's --rundir changes directory after makeService, before any SIGHUP.
    config_path = os.path.abspath(options["config"]) if options["config"] else None
    observer = _observer(factory)
    try:
        service = TwistdBrokerService(settings, config_path=config_path,
                                      log_control=options.get("log_control"),
                                      log_observer=observer, twistd_options=options.parent)
    except (StoreError, ConfigError) as problem:
        refuse(problem)
    except OSError as problem:
        # A store file the broker's user may not touch (owned by another user).
        where = repr(problem.filename) if problem.filename else repr(settings.broker.data_dir)
        refuse(f"{settings.source}: broker.data_dir: cannot use {where}: "
               f"{problem.strerror or problem}")
    SignalHandlers(service).setServiceParent(service)
    tune_garbage_collector()
    return service


def _observer(factory):
    """Our log observer (None: twistd's own), opening --logfile; one line if it cannot."""
    if factory is None:
        return None
    try:
        return factory()
    except OSError as problem:
        refuse(f"--logfile: cannot open {factory.path!r}: {problem.strerror or problem}")


def _supervisor(options: Options, factory):
    """workers > 1: this process only runs the workers (broker.workers)."""
    from broker.workers import SupervisorService

    try:
        config = options["config"]
        service = SupervisorService(options["settings"], config and os.path.abspath(config),
                                    log_control=options.get("log_control"))
    except (ConfigError, OSError) as problem:
        refuse(problem)
    if factory is not None and hasattr(service, "setServiceParent"):
        service.log_observer = _observer(factory)
    SignalHandlers(service).setServiceParent(service)
    return service
