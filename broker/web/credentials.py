"""The Authorization header, read one way by every HTTP resource of the broker.

The REST API, the WebSocket handshake, the dashboard's session check and
/metrics all take ``Authorization: <scheme> <credentials>``; each then
decides what the credentials are worth, but the header is parsed here, so
that a scheme's case, extra blanks and non-ASCII bytes mean the same to all.
"""

from __future__ import annotations


def split_authorization(header: bytes | str | None) -> tuple[str, str] | None:
    """(scheme in lower case, credentials stripped) of an Authorization value, or None if absent.

    Bytes are read as Latin-1 (what HTTP allows), so no header fails to decode.
    """
    if header is None:
        return None
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, credentials = header.strip().partition(" ")
    return scheme.lower(), credentials.strip()


def bearer_token(request) -> str | None:
    """The token of a request's ``Authorization: Bearer <token>`` header, or None."""
    parts = split_authorization(request.getHeader(b"authorization"))
    if parts is None or parts[0] != "bearer" or not parts[1]:
        return None
    return parts[1]
