"""GET /dashboard/session: what the page needs to know before it connects.

The page sends its token (``Authorization: Bearer``) and learns whether
it is valid and its role (``read`` shows the page read-only), and which
transports this broker offers, so that it goes straight to long polling
when the WebSocket is turned off instead of failing first. A browser
cannot read why a WebSocket handshake failed, so the page also asks here
after a failure: a 401 tells "wrong or revoked token" apart from "the
WebSocket is blocked on the way".
"""

from __future__ import annotations

from twisted.web.resource import Resource

from broker.web.credentials import bearer_token
from broker.web.responses import json_body, json_error

from .resource import method_not_allowed, plain_error, set_security_headers

_WWW_AUTHENTICATE = b'Bearer realm="ssp-broker"'


class SessionResource(Resource):
    """Answers a token's role and the transports on offer, or 401."""

    isLeaf = True

    def __init__(self, registry, config) -> None:
        """``config`` returns the broker's current Config (it changes on reload)."""
        super().__init__()
        self._registry = registry
        self._config = config

    def render(self, request):
        if request.postpath not in ([], [b""]):
            return plain_error(request, 404, "no such file")
        if request.method != b"GET":
            return method_not_allowed(request, (b"GET",))
        set_security_headers(request)
        token = bearer_token(request)
        if token is None:
            request.setHeader(b"www-authenticate", _WWW_AUTHENTICATE)
            return json_error(request, 401, "missing_credentials",
                              "send Authorization: Bearer <token>")
        role = self._registry.check_token(token)
        if role is None:
            request.setHeader(b"www-authenticate", _WWW_AUTHENTICATE)
            return json_error(request, 401, "invalid_token",
                              "the access token is not valid (mistyped, or revoked)")
        config = self._config()
        transports = {"websocket": config.websocket.enabled, "polling": config.polling.enabled}
        return json_body(request, {"role": role, "token_id": token.partition(".")[0],
                                   "transports": transports, "max_wait": config.polling.max_wait})
