"""JSON bodies and errors, one shape for every HTTP resource of the broker."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


def json_bytes(body: Any) -> bytes:
    """Compact UTF-8 JSON and a newline: every JSON answer's bytes (shared, so written once)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def json_headers(request: IRequest, status: int = 200) -> None:
    """Status, JSON content type and no caching: the headers of every JSON answer."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")


def json_body(request: IRequest, body: Any, status: int = 200) -> bytes:
    """Set status and content type on request and return body encoded as JSON."""
    json_headers(request, status)
    return json_bytes(body)


def json_error(request: IRequest, status: int, code: str, message: str, **details: Any) -> bytes:
    """An error answer: {"error": {"code": ..., "message": ..., details...}} with its status."""
    return json_body(request, {"error": {"code": code, "message": message, **details}}, status)
