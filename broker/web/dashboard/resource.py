"""The resources serving the dashboard: the page at / and its files under /dashboard/.

Every answer, errors included, carries a strict Content-Security-Policy:
scripts, styles and connections only from the broker's own origin (which
covers its ws:/wss: URL in current browsers), no inline script or style,
no plugins, no framing, and Trusted Types so the page cannot turn a
string into HTML. The page's code builds the DOM with text nodes only.
Files are revalidated on every load (ETag, 304) so an upgraded broker
never serves a stale mix of modules.
"""

from __future__ import annotations

from twisted.web.resource import Resource

from broker.web.responses import set_status

from .files import StaticFile

#: The policy of the page and of everything else served here.
CONTENT_SECURITY_POLICY = b"; ".join([
    b"default-src 'none'",
    b"script-src 'self'",
    b"style-src 'self'",
    b"img-src 'self' data:",
    b"connect-src 'self'",
    b"base-uri 'none'",
    b"form-action 'none'",
    b"frame-ancestors 'none'",
    b"require-trusted-types-for 'script'",
    b"trusted-types 'none'",
])
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
ALLOWED_METHODS = (b"GET", b"HEAD")
_TEXT = b"text/plain; charset=utf-8"


def set_security_headers(request) -> None:
    """Put the dashboard's security headers on an answer."""
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)


def plain_error(request, status: int, message: str) -> bytes:
    """A short text/plain error answer with the security headers."""
    set_status(request, status)
    set_security_headers(request)
    request.setHeader(b"content-type", _TEXT)
    request.setHeader(b"cache-control", b"no-store")
    return message.encode("utf-8") + b"\n"


def method_not_allowed(request, allowed=ALLOWED_METHODS) -> bytes:
    """405 naming the methods that are allowed (also in the Allow header)."""
    names = b", ".join(allowed)
    request.setHeader(b"allow", names)
    return plain_error(request, 405, f"{request.method.decode('latin-1')} is not allowed here; "
                                     f"use {names.decode('ascii').replace(', ', ' or ')}")


def _matches(if_none_match: bytes, etag: bytes) -> bool:
    """Whether an If-None-Match header names etag (weak comparison, RFC 9110 13.1.2)."""
    for tag in if_none_match.split(b","):
        tag = tag.strip()
        if tag == b"*" or tag.removeprefix(b"W/") == etag:
            return True
    return False


class FileResource(Resource):
    """Serves one StaticFile (GET, HEAD), with conditional GET."""

    isLeaf = True

    def __init__(self, file: StaticFile) -> None:
        super().__init__()
        self.file = file

    def render(self, request):
        if request.method not in ALLOWED_METHODS:
            return method_not_allowed(request)
        if request.postpath not in ([], [b""]):
            return plain_error(request, 404, "no such file")
        file = self.file
        set_security_headers(request)
        request.setHeader(b"etag", file.etag)
        request.setHeader(b"cache-control", b"no-cache")
        condition = request.getHeader(b"if-none-match")
        if condition is not None and _matches(condition, file.etag):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-type", file.content_type)
        request.setHeader(b"content-length", b"%d" % len(file.body))
        return file.body if request.method == b"GET" else b""


class NotFoundResource(Resource):
    """404 for any method, with the security headers (no directory listing, ever)."""

    isLeaf = True

    def __init__(self, message: str = "no such file") -> None:
        super().__init__()
        self._message = message

    def render(self, request):
        return plain_error(request, 404, self._message)


class RootResource(Resource):
    """The site's root: its named children (the API, the dashboard, health,
    metrics); any other path is a short text 404 with the security headers,
    not Twisted's HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self._not_found = NotFoundResource("no such resource")

    def getChild(self, path, request):
        return self._not_found


class AssetsResource(Resource):
    """/dashboard/<file>: the page's modules, style sheet and icon; 404 for anything else.

    Named children (putChild, e.g. the session resource) come first; the
    folder itself and every path deeper than one segment answer 404.
    """

    def __init__(self, files: dict[str, StaticFile]) -> None:
        super().__init__()
        self._files = {name.encode("ascii"): FileResource(file) for name, file in files.items()}
        self._not_found = NotFoundResource()

    def getChild(self, path, request):
        if request.postpath:
            return self._not_found
        return self._files.get(path, self._not_found)

    def render(self, request):
        return plain_error(request, 404, "no such file")
