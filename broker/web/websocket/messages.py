"""The dashboard protocol's messages: requests checked on the way in, JSON out.

Sans-IO: bytes in, a `Request` or a `ProtocolError` out; dicts and views
in, UTF-8 JSON bytes out. The whole protocol is described with an example
of every message in docs/websocket.md; the codes below are its error codes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from broker.registry.provisioning import NAME_RE
from broker.json_bytes import BadBytes, bytes_hook
from broker.web.responses import NOT_UNICODE, not_unicode

#: The one subprotocol spoken; a client must offer it.
SUBPROTOCOL = "ssp-broker.v1.json"
#: A subprotocol offered as ``bearer.<token>`` carries the browser's access token.
TOKEN_SUBPROTOCOL_PREFIX = "bearer."

#: Application close codes (RFC 6455 section 7.4.2 leaves 4000-4999 to us).
CLOSE_TOKEN_REVOKED = 4001
CLOSE_TOO_SLOW = 4008
CLOSE_TOO_MANY_REPLIES = 4009
CLOSE_GOING_AWAY = 1001

#: Longest request id echoed back (characters).
MAX_ID_LENGTH = 128
#: Longest subscription pattern (characters).
MAX_PATTERN_LENGTH = 128
#: Device names plus the fnmatch characters ``* ? [ ] !``.
_PATTERN_RE = re.compile(r"[A-Za-z0-9._\-*?\[\]!]+\Z")
_GLOB_CHARS = frozenset("*?[")

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class ProtocolError(Exception):
    """A request the broker refuses: a stable ``code`` and a one-line message."""

    def __init__(self, code: str, message: str, *, request_id=None, op=None, **details) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.op = op
        self.details = details


@dataclass(frozen=True, slots=True)
class Request:
    """One checked client request: its operation, echoed id and arguments."""

    op: str
    request_id: object = None
    args: dict = field(default_factory=dict)


# Each operation: {field: (checker, required)}.
def _patterns(value, name):
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{name}' must be a non-empty array of strings")
    for pattern in value:
        if not isinstance(pattern, str):
            raise ValueError(f"'{name}' must be an array of strings, found {_json_type(pattern)}")
        if len(pattern) > MAX_PATTERN_LENGTH or not _PATTERN_RE.match(pattern):
            raise _PatternError(f"invalid pattern {pattern[:MAX_PATTERN_LENGTH]!r}: 1-"
                                f"{MAX_PATTERN_LENGTH} of A-Z a-z 0-9 . _ - and the glob "
                                "characters * ? [ ] !")
    return tuple(dict.fromkeys(value))   # first occurrence kept, in order, in linear time


def _too_many_patterns(message: dict, op: str, request_id, max_patterns: int) -> None:
    """Refuse a pattern list longer than a connection may hold, before reading its items.

    A 64 kB message holds thousands of patterns; checking them all, only to
    refuse the subscribe for their number, would cost every other client.
    """
    patterns = message.get("patterns")
    if not isinstance(patterns, list) or len(patterns) <= max_patterns:
        return
    if op == "subscribe":
        raise ProtocolError("too_many_subscriptions",
                            f"at most {max_patterns} patterns per connection: this request "
                            f"names {len(patterns)}", request_id=request_id, op=op,
                            field="patterns")
    raise ProtocolError("invalid_field", f"'patterns' names {len(patterns)} patterns: a "
                        f"connection holds at most {max_patterns}", request_id=request_id,
                        op=op, field="patterns")


def _cursor(value, name):
    if type(value) is not int or value < 0:
        raise ValueError(f"'{name}' must be an integer >= 0, not {_shown(value)}")
    return value


def _optional_version(value, name):
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValueError(f"'{name}' must be an integer >= 0 or null, not {_shown(value)}")
    return value


def _boolean(value, name):
    if type(value) is not bool:
        raise ValueError(f"'{name}' must be a boolean, not {_json_type(value)}")
    return value


def _name(value, name):
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{name}' must be a non-empty string, not {_shown(value)}")
    if not value.isascii() or NAME_RE.match(value) is None:
        raise _NameError(f"{value[:64]!r} is not a device name: 1-64 of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit")
    return value


def _object(value, name):
    if not isinstance(value, dict):
        raise ValueError(f"'{name}' must be an object, not {_json_type(value)}")
    return value


def _command(value, name):
    if value is None:
        raise ValueError(f"'{name}' must be a JSON value other than null")
    return value   # its limits are the registry's, checked by broker.web.commands


class _PatternError(ValueError):
    """A pattern with characters no device name has."""


class _NameError(ValueError):
    """A name no device can have (the registry's naming rule)."""


OPERATIONS = {
    "subscribe": {"patterns": (_patterns, True), "cursor": (_cursor, False),
                  "history": (_boolean, False)},
    "unsubscribe": {"patterns": (_patterns, True)},
    "get": {"name": (_name, True)},
    "set_desired": {"name": (_name, True), "desired": (_object, True),
                    "expected_version": (_optional_version, False)},
    "command": {"device": (_name, True), "command": (_command, True)},
    "ping": {},
}
#: Operations that change state or reach devices: refused to ``read`` tokens.
WRITE_OPERATIONS = frozenset({"set_desired", "command"})


def _json_type(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shown(value) -> str:
    """A refused value as an error names it: an integer by its value, "" as empty, else its type."""
    if type(value) is int:
        text = str(value)
        return text if len(text) <= 20 else text[:20] + "..."
    if value == "":
        return "an empty string"
    return _json_type(value)


def _valid_id(request_id) -> bool:
    return request_id is None or type(request_id) is int or (
        isinstance(request_id, str) and len(request_id) <= MAX_ID_LENGTH)


def _bad_bytes(payload: bytes, problem: BadBytes) -> ProtocolError:
    """invalid_json for a {"$bytes"} value that is not base64, naming the request if it can."""
    # The hook ran before the parser saw the rest: that rest may not be JSON.
    try:
        message = json.loads(payload.decode("utf-8"))
    except RecursionError:
        return ProtocolError("invalid_json", "message is not valid JSON: nested too deeply")
    except ValueError as later:
        return ProtocolError("invalid_json", f"message is not valid JSON: {later}")
    request_id = op = None
    if isinstance(message, dict):
        request_id = message.get("id")
        if not _valid_id(request_id) or not_unicode(payload, request_id):
            request_id = None
        op = message.get("op")
        op = op if isinstance(op, str) and op in OPERATIONS else None
    return ProtocolError("invalid_json", str(problem), request_id=request_id, op=op)


def parse_request(payload: bytes, max_patterns: int = 100) -> Request:
    """The checked request in a text message, or ProtocolError saying what is wrong.

    ``payload`` is UTF-8 (RFC 8259 section 8.1; Autobahn has validated a text
    frame's UTF-8): it is decoded as such before parsing, because
    ``json.loads`` would take bytes in UTF-16 or UTF-32 as well.
    ``max_patterns`` is the connection's ``max_subscriptions``.
    """
    try:
        message = json.loads(payload.decode("utf-8"), object_hook=bytes_hook)
    except RecursionError:
        raise ProtocolError("invalid_json", "message is not valid JSON: nested too deeply") from None
    except BadBytes as problem:
        raise _bad_bytes(payload, problem) from None
    except ValueError as problem:
        # JSONDecodeError and UnicodeDecodeError are both ValueErrors.
        raise ProtocolError("invalid_json", f"message is not valid JSON: {problem}") from None
    if not_unicode(payload, message):
        request_id = message.get("id") if isinstance(message, dict) else None
        if not _valid_id(request_id) or not_unicode(payload, request_id):
            request_id = None
        raise ProtocolError("invalid_json", NOT_UNICODE, request_id=request_id)
    if not isinstance(message, dict):
        raise ProtocolError("invalid_message",
                            f"a message must be a JSON object, not {_json_type(message)}")
    request_id = message.get("id")
    if not _valid_id(request_id):
        shown = (f"a string of {len(request_id)} characters" if isinstance(request_id, str)
                 else _json_type(request_id))
        raise ProtocolError("invalid_field", f"'id' must be a string of at most {MAX_ID_LENGTH} "
                            f"characters or an integer, not {shown}", field="id")
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError("invalid_message", "missing field 'op' (a string)"
                            if op is None else f"'op' must be a string, not {_json_type(op)}",
                            request_id=request_id)
    spec = OPERATIONS.get(op)
    if spec is None:
        raise ProtocolError("unknown_op", f"unknown op {op[:64]!r} (known: "
                            f"{', '.join(sorted(OPERATIONS))})", request_id=request_id)
    if "patterns" in spec:
        _too_many_patterns(message, op, request_id, max_patterns)
    args = {}
    for key, value in message.items():
        if key in ("op", "id"):
            continue
        if key not in spec:
            known = ", ".join(["id", "op", *spec]) if spec else "id, op"
            raise ProtocolError("invalid_field", f"unknown field {key[:64]!r} for op {op!r} "
                                f"(known: {known})", request_id=request_id, op=op, field=key)
        check, _ = spec[key]
        try:
            args[key] = check(value, key)
        except _PatternError as problem:
            raise ProtocolError("invalid_pattern", str(problem), request_id=request_id,
                                op=op, field=key) from None
        except _NameError as problem:
            raise ProtocolError("invalid_name", str(problem), request_id=request_id,
                                op=op, field=key) from None
        except ValueError as problem:
            raise ProtocolError("invalid_field", str(problem), request_id=request_id,
                                op=op, field=key) from None
    for key, (_, required) in spec.items():
        if required and key not in args:
            raise ProtocolError("invalid_field", f"missing field {key!r} for op {op!r}",
                                request_id=request_id, op=op, field=key)
    return Request(op, request_id, args)


def is_glob(pattern: str) -> bool:
    """Whether a pattern has fnmatch characters (else it names one device)."""
    return not _GLOB_CHARS.isdisjoint(pattern)


# -- broker to client ------------------------------------------------------

def encode(message: dict) -> bytes:
    """One message as compact UTF-8 JSON."""
    return _encode(message).encode("utf-8")


def device_json(view, history: bool = True) -> str:
    """A device as the JSON text of DeviceView.to_json() (optionally without history).

    Without history the view is copied with an empty one first: encoding the
    history is most of to_json()'s cost, and it would be thrown away.
    """
    if not history and view.history:
        view = dataclasses.replace(view, history=())
    body = view.to_json()
    if not history:
        del body["history"]
    return _encode(body)


def update_message(device: str, cursor: int) -> bytes:
    """The update sent for one device change; ``device`` is already JSON text."""
    return f'{{"type":"update","cursor":{cursor},"device":{device}}}'.encode("utf-8")


def snapshot_message(request_id, devices: list[str], *, full: bool, done: bool,
                     cursor: int, reset: dict | None = None) -> bytes:
    """One page of a subscription's snapshot (full) or of its missed changes."""
    head = {"type": "snapshot", "id": request_id, "full": full, "done": done, "cursor": cursor}
    if reset is not None:
        head["reset"] = reset
    text = _encode(head)
    return f'{text[:-1]},"devices":[{",".join(devices)}]}}'.encode("utf-8")


def result_message(request_id, op: str, **body) -> bytes:
    """The answer to a request that succeeded."""
    return encode({"type": "result", "id": request_id, "op": op, **body})


def error_message(code: str, message: str, request_id=None, op=None, **details) -> bytes:
    """The answer to a request that failed: its id, a precise code and a message."""
    return encode({"type": "error", "id": request_id, "op": op, "code": code,
                   "message": message, **details})


def error_from(problem: ProtocolError) -> bytes:
    """error_message for a ProtocolError."""
    return error_message(problem.code, problem.message, problem.request_id, problem.op,
                         **problem.details)
