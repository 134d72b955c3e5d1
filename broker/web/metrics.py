"""GET /metrics: the broker's figures in the Prometheus text exposition format.

Who may read them ([metrics] require_token, read on every request so a
SIGHUP reload applies at once): with a token, any valid dashboard token as
`Authorization: Bearer <token>`; without, only clients on a loopback address
(a scraper on the same host, or a reverse proxy there that guards access).
"""

from __future__ import annotations

import ipaddress
from typing import Callable

from twisted.logger import Logger
from twisted.web.resource import Resource

from broker.metrics import CONTENT_TYPE_LATEST, Metrics
from broker.web.credentials import bearer_token
from broker.web.responses import json_error

#: the methods /metrics answers (HEAD: twisted.web answers it with GET's headers).
ALLOW = b"GET, HEAD"


def is_loopback(address) -> bool:
    """Whether an IAddress is on 127.0.0.0/8 or ::1 (IPv4-mapped included); UNIX sockets count."""
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) is not None  # AF_UNIX: local by nature
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class MetricsResource(Resource):
    """Renders a Metrics registry for a scraper that is allowed to read it."""

    isLeaf = True
    log = Logger()

    def __init__(self, metrics: Metrics, *, require_token: Callable[[], bool],
                 check_token: Callable[[str], "str | None"]) -> None:
        super().__init__()
        self.metrics = metrics
        self.require_token = require_token
        self.check_token = check_token

    def render(self, request):
        """GET and HEAD; any other method gets the API's JSON 405, not twisted.web's HTML page."""
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", ALLOW)
            method = request.method.decode("latin-1")[:16]
            return json_error(request, 405, "method_not_allowed",
                              f"{method} is not allowed here; use {ALLOW.decode()}")
        return super().render(request)

    def render_GET(self, request):
        if self.require_token():
            token = bearer_token(request)
            if token is None:
                request.setHeader(b"www-authenticate", b'Bearer realm="metrics"')
                return json_error(request, 401, "unauthorized",
                                  "send a dashboard token as 'Authorization: Bearer <token>'")
            if self.check_token(token) is None:
                request.setHeader(b"www-authenticate", b'Bearer realm="metrics", error="invalid_token"')
                return json_error(request, 401, "invalid_token", "the token is unknown or revoked")
        elif not is_loopback(request.getClientAddress()):
            return json_error(request, 403, "forbidden",
                              "metrics are served to loopback clients only unless "
                              "[metrics] require_token is set")
        body = self.metrics.render()
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
