"""Browsers on other origins: the origin rule (shared with the WebSocket) and preflights."""

from __future__ import annotations

from broker.web.origins import Refused

from .errors import forbidden

ALLOW_HEADERS = (b"authorization, content-type, if-match, if-none-match, last-event-id, "
                 b"idempotency-key")
EXPOSE_HEADERS = (b"etag, retry-after, x-poll-interval, www-authenticate, "
                  b"idempotent-replayed")
PREFLIGHT_MAX_AGE = b"600"


def check_origin(request, policy) -> bytes | None:
    """The request's Origin if it may call us (CORS headers set), None if it sent none.

    The rules are the WebSocket's (broker.web.origins.OriginPolicy):
    the broker's own origin, [http] public_url and allowed_origins ("*":
    any) pass, compared as (scheme, host, port); "null" never does. Other
    origins get ApiError 403.
    """
    origin = request.getHeader(b"origin")
    if origin is None:
        return None
    host = request.getHeader(b"host")
    try:
        policy.check(origin.decode("latin-1"), host.decode("latin-1") if host else None,
                     request.isSecure())
    except Refused as refusal:
        raise forbidden("origin_not_allowed", refusal.reason) from None
    request.setHeader(b"access-control-allow-origin", origin)
    request.setHeader(b"access-control-expose-headers", EXPOSE_HEADERS)
    request.setHeader(b"vary", b"Origin")
    return origin


def allowed_methods(methods) -> bytes:
    """The Allow header of a path: its methods, HEAD where GET is, and OPTIONS (every path)."""
    allowed = set(methods) | {b"OPTIONS"}
    if b"GET" in allowed:
        allowed.add(b"HEAD")
    return b", ".join(sorted(allowed))


def preflight(request, methods) -> bytes:
    """The answer to a CORS preflight (or a plain OPTIONS): 204 with what is allowed."""
    allow = allowed_methods(methods)
    request.setResponseCode(204)
    request.setHeader(b"allow", allow)
    if request.getHeader(b"origin") is not None:
        request.setHeader(b"access-control-allow-methods", allow)
        request.setHeader(b"access-control-allow-headers", ALLOW_HEADERS)
        request.setHeader(b"access-control-max-age", PREFLIGHT_MAX_AGE)
    return b""
