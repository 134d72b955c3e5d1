"""Signals: SIGTERM and SIGINT stop gracefully (exit status 0, or 1 when the
store lost changes: service.py), SIGHUP reloads the configuration (except once
a stop has begun).

Twisted's own SIGTERM and SIGINT handlers record the signal and twistd then
kills itself with it, so a clean stop would look like a crash to anything
that reads the exit status, and a stop that lost changes could not say so
(the exit status it set is never reached). Ours asks the reactor to stop and
lets twistd exit once BrokerService.stopService has drained clients and
closed the store. A SIGINT that is ignored (a worker: the supervisor stops
it, broker/worker.py) stays ignored.

Handlers run the real work on the reactor thread (`callFromThread`), never
inside the signal handler, and are installed only once the reactor runs
(after Twisted installed its own, which ours replace).
"""

from __future__ import annotations

import dataclasses
import signal

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from broker.config import Config

log = Logger()

#: settings a reload cannot change: they name sockets, files or the process shape, or
#: size a structure built once (the SSP cipher cache, the WebSocket send buffers).
RESTART_ONLY = {
    "broker": ("data_dir", "workers"),
    "log": ("format",),
    "http": ("endpoint",),
    "ssp": ("enabled", "host", "port", "receive_buffer_bytes", "cipher_cache_size",
            "max_pending_commands"),
    "registry": None,  # all of it: the store and its limits are built once
    "websocket": ("enabled", "send_buffer_bytes"),
    "polling": ("enabled",),
    "metrics": ("enabled", "endpoint"),
}


def reloadable(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """(the config to run with, keys that changed but need a restart) for a reload."""
    kept = []
    changes = {}
    for section, names in RESTART_ONLY.items():
        old, new = getattr(running, section), getattr(loaded, section)
        fields = [f.name for f in dataclasses.fields(old)] if names is None else names
        revert = {name: getattr(old, name) for name in fields
                  if getattr(old, name) != getattr(new, name)}
        if revert:
            kept += [f"{section}.{name}" for name in revert]
            changes[section] = dataclasses.replace(new, **revert)
    return dataclasses.replace(loaded, **changes), kept


def within(d: defer.Deferred, seconds: float, clock, what: str) -> defer.Deferred:
    """Fires with None when d does or after seconds, whichever comes first; never fails.

    d itself is not cancelled: work it queued (store writes) still completes.
    """
    result = defer.Deferred()

    def late():
        log.warn("{what}: not finished after {seconds} s, going on", what=what, seconds=seconds)
        result.callback(None)

    timer = clock.callLater(seconds, late)

    def finished(outcome):
        if isinstance(outcome, Failure):
            log.failure("{what} failed", outcome, what=what)
        if timer.active():
            timer.cancel()
            result.callback(None)

    d.addBoth(finished)
    return result


class SignalHandlers(Service):
    """SIGTERM, SIGINT: graceful stop, exit 0 (1: changes lost). SIGHUP: broker.reload().
    Only twistd (and a worker) adds this service."""

    name = "signals"

    def __init__(self, broker, signals=signal) -> None:
        self.broker = broker
        self.signals = signals
        self._previous = {}
        self._terminating = False

    def startService(self) -> None:
        super().startService()
        self.broker.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running:
            return
        for number, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_term),
                                (signal.SIGHUP, self._on_hup)):
            self._previous[number] = self.signals.signal(number, handler)
        if self._previous[signal.SIGINT] is signal.SIG_IGN:
            self.signals.signal(signal.SIGINT, signal.SIG_IGN)   # ignored on purpose: kept

    def stopService(self):
        super().stopService()
        # SIGHUP during the stop would otherwise kill the process (default action).
        if signal.SIGHUP in self._previous:
            self.signals.signal(signal.SIGHUP, signal.SIG_IGN)

    def _on_term(self, number, frame) -> None:
        self.broker.reactor.callFromThread(self._terminate, signal.Signals(number).name)

    def _on_hup(self, number, frame) -> None:
        self.broker.reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        # A reload during the drain would tell systemd READY=1 after STOPPING=1.
        if self._terminating or getattr(self.broker, "stopping", False):
            log.info("SIGHUP while stopping: not reloaded")
            return
        self.broker.reload()

    def _terminate(self, name="SIGTERM") -> None:
        if self._terminating:
            log.info("{signal}: already stopping", signal=name)
            return
        self._terminating = True
        log.info("{signal}: stopping gracefully", signal=name)
        self.broker.reactor.stop()
