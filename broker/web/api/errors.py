"""Precise API errors: each has an HTTP status, a stable code and a one-line message.

Handlers raise ApiError; the resource turns it into the JSON error body of
`broker.web.responses.json_error`. Registry errors map to statuses here,
in one table, so that every endpoint answers the same failure the same way.
"""

from __future__ import annotations

from broker.registry import errors as registry_errors
from broker.registry.updates import NotDurable


class ApiError(Exception):
    """An error answer: status, code, message, extra headers and extra JSON fields."""

    def __init__(self, status: int, code: str, message: str, *, headers=None, **details):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details


#: Registry error type -> HTTP status. Versions are preconditions (If-Match),
#: a state that would grow too large conflicts with what is stored.
_STATUS = (
    (registry_errors.UnknownDevice, 404),
    (registry_errors.VersionConflict, 412),
    (registry_errors.StateTooLarge, 409),
    (registry_errors.InvalidKey, 400),
    (registry_errors.InvalidValue, 400),
    (registry_errors.InvalidName, 400),
    (registry_errors.StoreError, 503),
)


def from_registry(error: registry_errors.RegistryError) -> ApiError:
    """The ApiError answering a registry error."""
    status = next((code for kind, code in _STATUS if isinstance(error, kind)), 400)
    if isinstance(error, registry_errors.VersionConflict):
        return ApiError(status, error.code, error.message,
                        headers={b"etag": etag(error.current_version)},
                        current_version=error.current_version)
    if isinstance(error, NotDurable):
        return not_durable()
    if isinstance(error, registry_errors.OutcomeUnknown):
        return outcome_unknown()
    if status == 503:
        # store_error: nothing of the request was applied; sending it again is safe.
        return ApiError(status, error.code, error.message, headers={b"retry-after": b"1"})
    return ApiError(status, error.code, error.message)


def not_durable() -> ApiError:
    """503 for a write applied in memory whose store write failed (NotDurable).

    No Retry-After: sending the request again would apply it twice; the
    same request with its Idempotency-Key is safe, and answers 200 once
    the change is stored (idempotency.py).
    """
    return ApiError(503, "not_durable",
                    "the change is applied and visible, but the store failed: it is stored "
                    "once the store recovers (lost if the broker stops before). Do not send "
                    "it again, unless with the same Idempotency-Key", applied=True)


def outcome_unknown() -> ApiError:
    """503 for a write the store may or may not have applied (OutcomeUnknown).

    Neither "nothing applied" nor "applied": no Retry-After, for sending it
    again blindly could apply it twice. A retry with its Idempotency-Key is
    answered the same (idempotency.py); the client reads the device to tell.
    """
    return ApiError(503, "outcome_unknown",
                    "the store failed before it said whether the change was applied: it may "
                    "or may not be. Read the device to see, before sending it again (with an "
                    "If-Match naming the version read, it is applied at most once)")


def etag(version: int) -> bytes:
    """The strong entity tag of a device version."""
    return b'"%d"' % version


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={
        b"www-authenticate": b'Bearer realm="ssp-broker", Device realm="ssp-broker"'})


def forbidden(code: str, message: str) -> ApiError:
    return ApiError(403, code, message)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(404, code, message)
