"""Where the broker's log events go: plain text for humans or JSON lines for shippers.

Every component logs `twisted.logger` events with fields. This module builds
the one observer twistd installs ([log] format and level), keeps the level
changeable at run time (SIGHUP), and guarantees that no secret reaches a log:
fields named like a secret are masked and bytes values are never printed,
whatever the format string says.

twistd creates its logger only after options are parsed: `broker.tap`
puts an `ObserverFactory` in twistd's "logger" option, which
`twisted.application.app.AppLogger` calls instead of its own default.
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime, timezone

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEvent, textFileLogObserver)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from broker.config import LogSettings

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
        line = json.dumps(json_record(event), ensure_ascii=False, separators=(",", ":"),
                          default=str)
        self.stream.write(line + "\n")
        self.stream.flush()


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
    first-run line carries a dashboard token.
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
            stream = LogFile.fromFullPath(self.path, defaultMode=0o600)
            self._rotate_on_sigusr1(stream)
        return make_observer(self.settings, self.control, stream)

    def _rotate_on_sigusr1(self, stream: LogFile) -> None:
        if signal.getsignal(signal.SIGUSR1):
            return  # someone else's handler, or ignored: leave it, as twistd does
        call = self.call_from_thread
        if call is None:
            from twisted.internet import reactor
            call = reactor.callFromThread
        signal.signal(signal.SIGUSR1, lambda number, frame: call(stream.rotate))
