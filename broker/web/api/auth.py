"""Who is asking: dashboard tokens (Bearer) and device keys (Device), and what each may do.

* ``Authorization: Bearer <token>``: a dashboard token from
  ``registry.add_token(role)``; role ``read`` or ``write``. Requests that
  only read (GET, HEAD) may pass it as ``?token=`` instead (EventSource
  cannot set headers), unless the broker's ``[http] query_tokens`` is
  false. Any other request with ``?token=`` is refused, even beside a
  header: its URL, token included, may already be in a log.
* ``Authorization: Device <key>``: a device's own 22-character key; it
  reaches only that device's resources. The key is compared with
  ``hmac.compare_digest``, and an unknown device costs the same compare,
  so an unauthenticated client learns nothing about which names exist.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from broker.registry.secrets import parse_key
from broker.web.credentials import split_authorization

from .errors import ApiError, forbidden, unauthorized

#: what a route needs
READ = "read"
WRITE = "write"
DEVICE = "device"
DEVICE_OR_READ = "device_or_read"

_DUMMY_SECRET = bytes(16)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a token role or a device, and its rate-limit key."""

    role: str           # "read", "write" or "device"
    key: str            # token id, or "device:<name>"
    device: str | None = None
    #: the token's text, so a long-lived answer (an event stream) can see it revoked.
    token: str | None = field(default=None, repr=False)


def authenticate(request, registry, device_name: str | None, allow_query_token: bool,
                 query_tokens: bool = True) -> Principal:
    """The Principal of a request, or ApiError 401.

    ``allow_query_token``: the request may carry ``?token=`` (GET, HEAD);
    ``query_tokens``: the broker takes them at all ([http] query_tokens).
    """
    # Refused even beside a header: the URL (and the token) is in a log already.
    if b"token" in request.args:
        if not query_tokens:
            raise unauthorized("token_in_query",
                               "this broker takes tokens only in the Authorization header "
                               "([http] query_tokens = false); send Authorization: Bearer <token>")
        if not allow_query_token:
            raise unauthorized("token_in_query",
                               "?token= is accepted only by GET and HEAD requests; "
                               "send Authorization: Bearer <token>")
    authorization = split_authorization(request.getHeader(b"authorization"))
    if authorization is not None:
        scheme, credentials = authorization
        if scheme == "bearer":
            return _token(registry, credentials)
        if scheme == "device":
            return _device(registry, device_name, credentials)
        raise unauthorized("unsupported_scheme",
                           "the Authorization scheme must be Bearer (token) or Device (device key)")
    token = request.args.get(b"token")
    if token is not None:
        return _token(registry, token[-1].decode("latin-1"))
    raise unauthorized("missing_credentials",
                       "send Authorization: Bearer <token> or Device <key>")


def _token(registry, text: str) -> Principal:
    role = registry.check_token(text) if text else None
    if role is None:
        raise unauthorized("invalid_token", "the access token is not valid")
    return Principal(role, text.partition(".")[0], token=text)


def _device(registry, device_name: str | None, credentials: str) -> Principal:
    if device_name is None:
        raise unauthorized("invalid_device_key",
                           "a device key is accepted only on its own /api/v1/devices/NAME paths")
    try:
        presented = parse_key(credentials)
    except ValueError:
        raise unauthorized("invalid_device_key",
                           "a device key is its 22-character base64 form") from None
    view = registry.device(device_name)
    secret = registry.secret_for(view.device_number) if view is not None else None
    # Same work whether or not the device exists.
    matches = hmac.compare_digest(presented, secret if secret is not None else _DUMMY_SECRET)
    if not matches or secret is None:
        raise unauthorized("invalid_device_key", "the device key does not match this device")
    return Principal("device", "device:" + device_name, device_name)


def authorize(principal: Principal, needs: str) -> None:
    """Raise ApiError 403 unless the principal may use a route that needs ``needs``."""
    role = principal.role
    if needs == READ and role in (READ, WRITE):
        return
    if needs == WRITE and role == WRITE:
        return
    if needs == DEVICE and role == DEVICE:
        return
    if needs == DEVICE_OR_READ and role in (READ, WRITE, DEVICE):
        return
    raise _refusal(role, needs)


def _refusal(role: str, needs: str) -> ApiError:
    if needs == DEVICE:
        return forbidden("device_only", "only the device itself, with its key, reports its state")
    if role == DEVICE and needs == WRITE:
        return forbidden("forbidden", "writing desired state or sending commands needs a write "
                         "token; a device key reads its own device and reports its state")
    if role == DEVICE:
        return forbidden("forbidden", "this needs a read or write token; a device key reads "
                         "its own device and reports its state")
    return forbidden("forbidden", "this token's role is read; writing needs a write token")
