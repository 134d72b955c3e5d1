"""JSON bodies and errors, one shape for every HTTP resource of the broker.

Also how JSON from clients is read, one way for the REST API and the
WebSocket: text that is not Unicode (bytes: broker/json_bytes.py).
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from twisted.web.iweb import IRequest

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


def json_bytes(body: Any) -> bytes:
    """Compact UTF-8 JSON and a newline: every JSON answer's bytes (shared, so written once)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def set_status(request: IRequest, status: int) -> None:
    """The status with its standard reason phrase (Twisted knows none for
    some, 429 among them, and would say "Unknown Status")."""
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = None
    request.setResponseCode(status, phrase)


def json_headers(request: IRequest, status: int = 200) -> None:
    """Status, JSON content type and no caching: the headers of every JSON answer."""
    set_status(request, status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")


def json_body(request: IRequest, body: Any, status: int = 200) -> bytes:
    """Set status and content type on request and return body encoded as JSON."""
    json_headers(request, status)
    return json_bytes(body)


def json_error(request: IRequest, status: int, code: str, message: str, **details: Any) -> bytes:
    """An error answer: {"error": {"code": ..., "message": ..., details...}} with its status."""
    return json_body(request, {"error": {"code": code, "message": message, **details}}, status)


#: The message of an error answering JSON whose text is not Unicode (see not_unicode).
NOT_UNICODE = r"text with an unpaired \uD800-\uDFFF escape is not Unicode"
#: A JSON escape of a UTF-16 surrogate: only text holding one can be non-Unicode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def not_unicode(raw: bytes, value) -> bool:
    """Whether decoded JSON holds text with an unpaired surrogate escape (``"\\ud800"``).

    Such text is valid JSON but no Unicode string: it cannot be stored or
    sent again. ``raw`` is the JSON text, so that only bodies with a
    surrogate escape are walked (without recursion: depth is the parser's).
    """
    if not _SURROGATE_ESCAPE.search(raw):
        return False
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
    return False
