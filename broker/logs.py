"""Where the broker's log events go: plain text for humans or JSON lines for shippers.

Every component logs `twisted.logger` events with fields. This module builds
the one observer twistd installs ([log] format and level), keeps the level
changeable at run time (SIGHUP), and guarantees that no secret reaches a log:
fields named like a secret are masked and bytes values are never printed,
whatever the format string says.

twistd creates its logger only after options are parsed: `broker.tap`
puts an `ObserverFactory` in twistd's "logger" option, which
`twisted.application.app.AppLogger` calls instead of its own default.

With ``[broker] workers``, a worker writes its events as JSON lines to a
pipe (`make_relay_observer`) and its supervisor turns each line back into
an event of its own (`WorkerLogRelay`), tagged with the worker's index: so
the workers' lines go where the supervisor's go (its ``--logfile``, rotated,
or its standard output), in its format.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime, timezone

from twisted.logger import (FilteringLogObserver, ILogObserver, InvalidLogLevelError, LogLevel,
                            LogLevelFilterPredicate, formatEvent, globalLogPublisher,
                            textFileLogObserver)
from twisted.python.failure import Failure
from zope.interface import implementer

from broker.config import LogSettings
from broker.logfile import AppendingLogFile

#: field names whose values are never written.
SENSITIVE_FIELDS = frozenset({"secret", "token", "password", "authorization", "cookie",
                              "session_key", "key_text", "credentials"})
_SENSITIVE_SUFFIXES = ("_secret", "_token", "_password")
MASK = "[redacted]"

# Keys of events that come from the legacy twisted.python.log API: already
# part of the message, or internal bookkeeping.
_LEGACY_KEYS = frozenset({"message", "time", "system", "isError", "format", "why", "failure",
                          "logLevel", "printed"})
_RECORD_KEYS = ("time", "level", "namespace", "message", "failure")


def is_sensitive(name: str) -> bool:
    """Whether a field of this name may hold a secret (device key, token, password)."""
    name = name.lower()
    return name in SENSITIVE_FIELDS or name.endswith(_SENSITIVE_SUFFIXES)


def redact(event: dict) -> dict:
    """The event with secret-looking fields masked and bytes values summarised (a copy if needed)."""
    changed = None
    for key, value in event.items():
        if key.startswith("log_"):
            continue
        if is_sensitive(key):
            replacement = MASK
        elif isinstance(value, (bytes, bytearray, memoryview)):
            replacement = f"<{len(value)} bytes>"
        else:
            continue
        if changed is None:
            changed = dict(event)
        changed[key] = replacement
    return event if changed is None else changed


@implementer(ILogObserver)
class RedactingObserver:
    """Passes every event to observer once secrets are masked."""

    def __init__(self, observer) -> None:
        self.observer = observer

    def __call__(self, event: dict) -> None:
        self.observer(redact(event))


def _jsonable(value, depth: int = 0):
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item, depth + 1) for item in value]
    if depth < 4 and isinstance(value, dict):
        return {str(key): (MASK if is_sensitive(str(key)) else _jsonable(item, depth + 1))
                for key, item in value.items()}
    return str(value)


def json_record(event: dict) -> dict:
    """One event as a flat JSON-ready dict: time, level, namespace, message, then its fields."""
    when = event.get("log_time")
    level = event.get("log_level")
    record = {
        "time": (datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
                 .replace("+00:00", "Z") if when is not None else None),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    legacy = event.get("log_namespace") == "log_legacy"
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY_KEYS):
            continue
        record[key + "_" if key in _RECORD_KEYS else key] = _jsonable(value)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes one JSON object per line (no record separators: what log shippers read)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __call__(self, event: dict) -> None:
        self.stream.write(json_line(event))
        self.stream.flush()


def json_line(event: dict) -> str:
    """An event as one line of JSON, its newline included."""
    return json.dumps(json_record(event), ensure_ascii=False, separators=(",", ":"),
                      default=str) + "\n"


class LogControl:
    """The level filter of the installed observer, changeable while the broker runs."""

    def __init__(self, level: str = "info") -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))

    @property
    def level(self) -> str:
        return self.predicate.logLevelForNamespace("").name

    def set_level(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LogLevel.levelWithName(level))


def make_observer(settings: LogSettings, control: LogControl, stream=None):
    """The broker's observer: level filter, then redaction, then text or JSON lines on stream."""
    stream = sys.stdout if stream is None else stream
    if settings.format == "json":
        writer = JSONLinesObserver(stream)
    else:
        writer = textFileLogObserver(stream)
    return FilteringLogObserver(RedactingObserver(writer), [control.predicate])


class ObserverFactory:
    """What twistd's "logger" option holds: called once by AppLogger.start().

    A --logfile behaves as twistd's own: rotated at 1 MB and on SIGUSR1
    (which would otherwise kill the process), but created 0600, as the
    first-run line carries a dashboard token, and opened for appending, so
    that logrotate's copytruncate or create + SIGUSR1 work (broker.logfile).
    """

    def __init__(self, settings: LogSettings, control: LogControl, path: str | None = None) -> None:
        self.settings = settings
        self.control = control
        self.path = path
        #: how the SIGUSR1 handler hands the rotation to the reactor thread (tests replace it).
        self.call_from_thread = None

    def __call__(self):
        stream = None
        if self.path and self.path != "-":
            # Unbuffered: a crash loses no complete line.
            stream = AppendingLogFile.fromFullPath(self.path, defaultMode=0o600)
            self._rotate_on_sigusr1(stream)
        return make_observer(self.settings, self.control, stream)

    def _rotate_on_sigusr1(self, stream: AppendingLogFile) -> None:
        if signal.getsignal(signal.SIGUSR1):
            return  # someone else's handler, or ignored: leave it, as twistd does
        call = self.call_from_thread
        if call is None:
            from twisted.internet import reactor
            call = reactor.callFromThread
        signal.signal(signal.SIGUSR1, lambda number, frame: call(stream.rotate))


# -- worker processes: their events through the supervisor's log ---------------


class _PipeLinesObserver(JSONLinesObserver):
    """JSON lines to the supervisor (through broker.worker.PipeWriter, which never
    blocks); once it is gone there is nowhere to write (and the worker stops:
    broker.worker.SupervisorPipe)."""

    def __call__(self, event: dict) -> None:
        try:
            super().__call__(event)
        except (OSError, ValueError):
            pass


def make_relay_observer(control: LogControl, stream):
    """A worker's observer: level filter and redaction here (no secret crosses the
    pipe), then one JSON record per line on stream, for its supervisor's WorkerLogRelay."""
    return FilteringLogObserver(RedactingObserver(_PipeLinesObserver(stream)),
                                [control.predicate])


def dropped_lines_record(count: int) -> str:
    """The line a worker writes once its pipe drained after dropping ``count`` lines."""
    return json_line({"log_level": LogLevel.warn, "log_namespace": "broker.worker",
                      "log_time": time.time(), "dropped": count,
                      "log_format": "{dropped} log lines dropped: the supervisor did not read"})


class WorkerLogged(Exception):
    """The failure a worker logged, as its supervisor relays it (its traceback text)."""


class RelayedFailure(Failure):
    """A worker's failure: what observers print of it is the worker's traceback."""

    def __init__(self, traceback: str) -> None:
        last = traceback.strip().splitlines()[-1:] or ["failure"]
        super().__init__(WorkerLogged(last[0]), WorkerLogged)
        self.traceback = traceback

    def getTraceback(self, *args, **kwargs) -> str:
        return self.traceback

    def printTraceback(self, file=None, *args, **kwargs) -> None:
        (file or sys.stderr).write(self.traceback)


def _event_time(text) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def relayed_event(record: dict, index: int) -> dict:
    """A worker's JSON record (json_record) as an event of the supervisor, tagged
    with the worker's index: the field ``worker``, and ``[worker I ...]`` in text."""
    try:
        level = LogLevel.levelWithName(str(record.get("level")))
    except InvalidLogLevelError:
        level = LogLevel.info
    namespace = str(record.get("namespace") or "broker.worker")
    event = {key: value for key, value in record.items() if key not in _RECORD_KEYS}
    event.update(worker=index, log_level=level, log_namespace=namespace,
                 log_time=_event_time(record.get("time")), log_format="{log_relayed}",
                 log_relayed=str(record.get("message", "")),
                 log_system=f"worker {index} {namespace}#{level.name}")
    failure = record.get("failure")
    if isinstance(failure, str):
        event["log_failure"] = RelayedFailure(failure)
    return event


class WorkerLogRelay:
    """The supervisor's end of one worker's standard output (its JSON events) and
    standard error (plain lines: a refusal, a crash's traceback), each line logged
    here as an event tagged with the worker's index."""

    #: longest line kept whole; a longer one is logged in pieces as it comes.
    MAX_LINE = 1 << 20
    STDOUT, STDERR = 1, 2

    def __init__(self, index: int, publish=None) -> None:
        self.index = index
        self.publish = globalLogPublisher if publish is None else publish
        self._partial = {}

    def received(self, fd: int, data: bytes) -> None:
        *lines, rest = (self._partial.get(fd, b"") + data).split(b"\n")
        if len(rest) > self.MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        for line in lines:
            self._line(fd, line)

    def closed(self, fd: int) -> None:
        """The pipe closed: its last line, if it had no newline."""
        rest = self._partial.pop(fd, b"")
        if rest:
            self._line(fd, rest)

    def _line(self, fd: int, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        record = None
        if fd == self.STDOUT and text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:
                pass
        if isinstance(record, dict):
            event = relayed_event(record, self.index)
        else:
            stream = "stderr" if fd == self.STDERR else "stdout"
            event = {"worker": self.index, "log_namespace": "broker.worker",
                     "log_level": LogLevel.error if fd == self.STDERR else LogLevel.info,
                     "log_time": time.time(), "log_format": "{log_relayed}",
                     "log_relayed": text, "log_system": f"worker {self.index} {stream}"}
        self.publish(event)
