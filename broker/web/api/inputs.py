"""What a request brings: query parameters, a JSON body, and the body size limit.

Every malformed input ends here as an ApiError naming the parameter or
header and what is wrong with it.
"""

from __future__ import annotations

import json
import math

from broker.json_bytes import bytes_hook
from broker.web.responses import NOT_UNICODE, not_unicode

from .errors import ApiError, bad_request

#: media types of a merge patch body; JSON_ONLY: of other bodies (events, commands).
JSON_TYPES = (b"application/json", b"application/merge-patch+json")
JSON_ONLY = (b"application/json",)


# -- query parameters ------------------------------------------------------------

def _arg(request, name: bytes):
    values = request.args.get(name)
    return None if not values else values[-1]


def text_arg(request, name: bytes, max_length: int = 256) -> str | None:
    """A text parameter, or None if absent."""
    raw = _arg(request, name)
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("invalid_parameter", f"{name.decode()} is not UTF-8") from None
    if len(text) > max_length:
        raise bad_request("invalid_parameter",
                          f"{name.decode()} is longer than {max_length} characters")
    return text


def int_arg(request, name: bytes, default, minimum: int, maximum: int):
    """An integer parameter within [minimum, maximum], or default if absent."""
    raw = _arg(request, name)
    if raw is None:
        return default
    return parse_int(raw, name.decode(), minimum, maximum)


def parse_int(raw: bytes, what: str, minimum: int, maximum: int) -> int:
    if not raw.isdigit():
        raise bad_request("invalid_parameter", f"{what} must be a whole number")
    if len(raw) > len(str(maximum)) or not minimum <= int(raw) <= maximum:
        raise bad_request("invalid_parameter", f"{what} must be between {minimum} and {maximum}")
    return int(raw)


#: the spellings of a boolean parameter (exactly these; anything else is refused).
_BOOLEANS = {b"true": True, b"1": True, b"false": False, b"0": False}


def bool_arg(request, name: bytes, default: bool) -> bool:
    """A boolean parameter (true, false, 1 or 0), or default if absent."""
    raw = _arg(request, name)
    if raw is None:
        return default
    value = _BOOLEANS.get(raw)
    if value is None:
        raise bad_request("invalid_parameter",
                          f"{name.decode()} must be true or false (or 1 or 0)")
    return value


def wait_arg(request, max_wait: float) -> float:
    """The ``wait`` parameter in seconds (0 if absent), cut to max_wait."""
    raw = _arg(request, b"wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise bad_request("invalid_parameter", "wait must be a number of seconds >= 0")
    return min(value, max_wait)


# -- JSON bodies ------------------------------------------------------------------

def _no_constants(name):
    raise ValueError(f"{name} is not a JSON number")


def read_json(request, max_bytes: int, media_types=JSON_TYPES):
    """The request's JSON body, checked for size and media type ({"$bytes": b64} -> bytes)."""
    if getattr(request, "body_too_large", False) or declared_length(request) > max_bytes:
        raise ApiError(413, "request_too_large",
                       f"the request body exceeds {max_bytes} bytes")
    media = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if media not in media_types:
        raise ApiError(415, "unsupported_media_type", "send the body as "
                       + " or ".join(kind.decode() for kind in media_types))
    request.content.seek(0)
    raw = request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(413, "request_too_large", f"the request body exceeds {max_bytes} bytes")
    try:
        value = json.loads(raw.decode("utf-8"), object_hook=bytes_hook,
                           parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as problem:
        raise bad_request("invalid_json", f"the body is not valid JSON: {problem}") from None
    if not_unicode(raw, value):
        raise bad_request("invalid_json", NOT_UNICODE)
    return value


def declared_length(request) -> int:
    raw = request.getHeader(b"content-length")
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0
