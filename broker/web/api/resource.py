"""The /api resource: routing, CORS, authentication, rate limits and JSON errors.

One leaf resource routes every /api/v1 path itself, so that an unknown
path (404), a wrong method (405, with Allow) and every other failure are
answered in the same JSON error shape, never with twisted.web's HTML pages.

HEAD is served wherever GET is (RFC 9110 9.3.2): the GET endpoint runs and
its status and headers are sent, Content-Length included, without the
body; a HEAD never waits (no long poll, no event stream).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from broker.web.responses import json_error, json_headers, set_status

from . import endpoints
from .auth import DEVICE, DEVICE_OR_READ, READ, WRITE, authenticate, authorize
from .cors import allowed_methods, check_origin, preflight
from .errors import ApiError, not_found
from .ratelimit import retry_after

#: path (with "*" for the device name) -> {method: (what it needs, endpoint function)}
ROUTES = {
    ("devices",): {b"GET": (READ, endpoints.list_devices)},
    ("devices", "*"): {b"GET": (DEVICE_OR_READ, endpoints.get_device)},
    ("devices", "*", "desired"): {b"PATCH": (WRITE, endpoints.update_desired)},
    ("devices", "*", "reported"): {b"POST": (DEVICE, endpoints.post_reported)},
    ("devices", "*", "events"): {b"POST": (DEVICE, endpoints.post_events)},
    ("devices", "*", "commands"): {b"POST": (WRITE, endpoints.post_command)},
    ("changes",): {b"GET": (READ, endpoints.changes)},
    ("events",): {b"GET": (READ, endpoints.events)},
}
INTERNAL_ERROR = ApiError(500, "internal_error", "the broker failed; see its log")


def route(postpath):
    """(methods table, device name or None) for the path below /api, or ApiError 404."""
    segments = list(postpath)
    if segments and segments[-1] == b"":
        segments.pop()                       # one trailing slash is the same path
    if len(segments) < 2 or segments[0] != b"v1":
        raise not_found("not_found", "no such API path; the API lives under /api/v1/")
    try:
        parts = [segment.decode("utf-8") for segment in segments[1:]]
    except UnicodeDecodeError:
        raise not_found("not_found", "no such API path") from None
    name = None
    if len(parts) >= 2 and parts[0] == "devices":
        name, parts[1] = parts[1], "*"
    methods = ROUTES.get(tuple(parts))
    if methods is None:
        raise not_found("not_found", "no such API path")
    return methods, name


def _headless(request, body: bytes) -> bytes:
    """The body to render: none for HEAD, whose Content-Length is the GET body's.

    (Rendering a body for HEAD works too, but twisted.web logs each one.)
    """
    if request.method != b"HEAD":
        return body
    request.setHeader(b"content-length", b"%d" % len(body))
    return b""



def _named(request) -> dict:
    """The method and path of a request for a log line, as text (the log's redaction
    shows bytes values only by their length). The path, never the URI: its query may
    hold a ?token=."""
    return {"method": request.method.decode("ascii", "replace"),
            "path": request.path.decode("utf-8", "replace")}

class ApiResource(Resource):
    """Everything under /api."""

    isLeaf = True
    log = Logger()

    def __init__(self, api) -> None:
        super().__init__()
        self.api = api

    def render(self, request):
        try:
            result = self._dispatch(request)
        except ApiError as error:
            return _headless(request, self._error(request, error))
        except Exception:
            self.log.failure("API request {method} {path} failed", **_named(request))
            return _headless(request, self._error(request, INTERNAL_ERROR))
        if result is NOT_DONE_YET:
            return result
        if isinstance(result, defer.Deferred):
            self._later(request, result)
            return NOT_DONE_YET
        status, body, headers = result
        if status == 304:
            # Finished here: twisted.web would add "Content-Length: 0", which a
            # 304 must not send (RFC 9110 8.6: only the 200's own length).
            self._body(request, status, body, headers)
            request.finish()
            return NOT_DONE_YET
        return _headless(request, self._body(request, status, body, headers))

    def _dispatch(self, request):
        api = self.api
        check_origin(request, api.origins)
        methods, name = route(request.postpath)
        method = request.method
        if method == b"OPTIONS":
            return 204, preflight(request, methods), None
        if method == b"HEAD" and b"GET" in methods:
            method = b"GET"          # the endpoints see request.method: HEAD never waits
        if method not in methods:
            allow = allowed_methods(methods)
            raise ApiError(405, "method_not_allowed",
                           f"{method.decode('latin-1')} is not allowed here; use {allow.decode()}",
                           headers={b"allow": allow})
        needs, endpoint = methods[method]
        principal = authenticate(request, api.registry, name,
                                 allow_query_token=method == b"GET",
                                 query_tokens=api.settings.query_tokens)
        authorize(principal, needs)
        wait = api.limiter.check(principal.key)
        if wait > 0:
            raise ApiError(429, "rate_limited",
                           f"more than {api.settings.max_requests_per_second:g} requests a second "
                           "with these credentials", headers={b"retry-after": retry_after(wait)})
        return endpoint(api, request, principal, name)

    # -- answering ---------------------------------------------------------------

    def _body(self, request, status, body, headers):
        if status in (204, 304):
            set_status(request, status)
        else:
            json_headers(request, status)
        for key, value in (headers or {}).items():
            request.setHeader(key, value)
        return body

    def _error(self, request, error: ApiError):
        for key, value in error.headers.items():
            request.setHeader(key, value)
        return json_error(request, error.status, error.code, error.message, **error.details)

    def _later(self, request, d):
        """Finish request with the outcome of d, unless the client left meanwhile."""
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(result):
            status, body, headers = result
            return self._body(request, status, body, headers)

        def failed(failure):
            if failure.check(ApiError):
                return self._error(request, failure.value)
            self.log.failure("API request {method} {path} failed", failure,
                             **_named(request))
            return self._error(request, INTERNAL_ERROR)

        def write(body):
            if not gone:
                request.write(_headless(request, body))
                request.finish()

        d.addCallbacks(answer, failed).addCallback(write)

    def respond(self, request, status, body, headers=None):
        """Answer a request that waited (the WaitingRoom calls this)."""
        if status != 304:
            request.setHeader(b"content-length", b"%d" % len(body))
        request.write(self._body(request, status, body, headers))
        request.finish()
