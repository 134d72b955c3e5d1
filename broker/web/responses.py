"""JSON bodies and errors, one shape for every HTTP resource of the broker."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


def json_body(request: IRequest, body: Any, status: int = 200) -> bytes:
    """Set status and content type on request and return body encoded as JSON."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def json_error(request: IRequest, status: int, code: str, message: str, **details: Any) -> bytes:
    """An error answer: {"error": {"code": ..., "message": ..., details...}} with its status."""
    return json_body(request, {"error": {"code": code, "message": message, **details}}, status)
