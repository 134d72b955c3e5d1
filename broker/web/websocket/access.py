"""Who may open the dashboard WebSocket: origin, subprotocol and access token.

Pure functions over the handshake's headers, so the policy is tested
without sockets. The adapter turns a refusal into an HTTP error answer
(`autobahn.websocket.types.ConnectionDeny`) before any WebSocket frame.
The origin rule is the REST API's too (broker/web/origins.py).
"""

from __future__ import annotations

from broker.web.credentials import split_authorization
from broker.web.origins import Refused

from .messages import SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX


def choose_subprotocol(offered) -> str:
    """The subprotocol to answer with; Refused(400) if the client did not offer ours."""
    if SUBPROTOCOL not in offered:
        shown = ", ".join(p for p in offered if not p.startswith(TOKEN_SUBPROTOCOL_PREFIX))
        raise Refused(400, f"subprotocol '{SUBPROTOCOL}' required (offered: {shown or 'none'})")
    return SUBPROTOCOL


def bearer_token(headers: dict, offered) -> str:
    """The access token of a handshake; Refused(401) if there is none.

    From ``Authorization: Bearer <token>`` (programs), else from an offered
    subprotocol ``bearer.<token>`` (browsers cannot set headers on a
    WebSocket). The token never goes in the URL, where logs keep it.
    """
    authorization = split_authorization(headers.get("authorization") or None)
    if authorization is not None:
        scheme, token = authorization
        if scheme != "bearer" or not token:
            raise Refused(401, "Authorization header must be 'Bearer <token>'")
        return token
    for protocol in offered:
        if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return protocol[len(TOKEN_SUBPROTOCOL_PREFIX):]
    raise Refused(401, "access token required: 'Authorization: Bearer <token>' or "
                       f"subprotocol '{TOKEN_SUBPROTOCOL_PREFIX}<token>'")


def authorize(registry, token: str) -> str:
    """The role of a valid token; Refused(401) for an unknown or revoked one."""
    role = registry.check_token(token)
    if role is None:
        raise Refused(401, "invalid or revoked access token")
    return role

