"""Which browser origins may call the broker: one rule for the REST API and the WebSocket.

Origins are compared as (scheme, host, port) triples, the form Autobahn
matches against, with the scheme's default port filled in, so
``https://dash.example.com`` and ``https://dash.example.com:443`` are the
same origin. Always allowed: no Origin header (not a browser: the token
is what protects the broker) and the broker's own origin (the Host the
browser asked for, on this listener's scheme). The ``null`` origin
(sandboxed frames, file: pages) is never allowed: it names no one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class Refused(Exception):
    """A request the broker refuses before serving it: the HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_origin(text: str) -> tuple:
    """``scheme://host[:port]`` as (scheme, host, port); ValueError if it is no origin."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"origin {text!r} must start with http:// or https://")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"origin {text!r} must be scheme://host:port only")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"origin {text!r} has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"origin {text!r} has no host")
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def _host_origin(host_header: str, secure: bool) -> tuple | None:
    scheme = "https" if secure else "http"
    try:
        return parse_origin(f"{scheme}://{host_header}")
    except ValueError:
        return None


def _origin_part(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class OriginPolicy:
    """Browser origins allowed to call the API and open the WebSocket."""

    allowed: frozenset = frozenset()
    any_origin: bool = False

    @classmethod
    def from_settings(cls, allowed_origins, public_url: str = "") -> "OriginPolicy":
        """Build from [http] allowed_origins ("*" allows any); ValueError names a bad entry."""
        triples = set()
        any_origin = False
        for entry in allowed_origins:
            if entry.strip() == "*":
                any_origin = True
                continue
            triples.add(parse_origin(entry))
        if public_url:
            scheme, host, port = parse_origin(_origin_part(public_url))
            triples.add(({"ws": "http", "wss": "https"}.get(scheme, scheme), host, port))
        return cls(frozenset(triples), any_origin)

    def check(self, origin: str | None, host_header: str | None, secure: bool) -> None:
        """Raise Refused(403) unless a page from ``origin`` may call us."""
        if not origin:
            return
        if origin.strip().lower() == "null":
            raise Refused(403, "origin 'null' is not allowed (open the dashboard from a "
                               "web server listed in http.allowed_origins)")
        try:
            triple = parse_origin(origin)
        except ValueError as problem:
            raise Refused(403, f"invalid Origin header: {problem}") from None
        if self.any_origin or triple in self.allowed:
            return
        if host_header and triple == _host_origin(host_header, secure):
            return
        raise Refused(403, f"origin '{triple[0]}://{triple[1]}:{triple[2]}' is not in "
                           "http.allowed_origins")
