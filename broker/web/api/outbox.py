"""The waiting room's outbox: decided answers, written a slice per reactor turn.

Ten thousand long polls woken by one change must not hold the reactor for
the time it takes to write ten thousand responses: the room queues each
answer here as soon as it is decided (the waiter has already left the
room), and the outbox writes ANSWER_SLICE of them per turn.

Every answer is checked against its request's access token just before it
is written, so data is never written after the token was revoked (the
request gets 401 instead). One answer that cannot be written ends only its
own request: with a JSON 500 if nothing was sent yet, else by closing the
connection.
"""

from __future__ import annotations

from collections import deque

from twisted.logger import Logger

from broker.web.responses import json_bytes

from .errors import ApiError, unauthorized

#: answers written per reactor turn; the rest follow on the next turns, so
#: that answering ten thousand waiters never holds the reactor for long.
ANSWER_SLICE = 1000


def _error_answer(error: ApiError):
    body = json_bytes({"error": {"code": error.code, "message": error.message}})
    return error.status, body, error.headers or None


#: the answer of a waiter whose access token was revoked while it waited.
REVOKED = _error_answer(unauthorized(
    "invalid_token", "the access token was revoked while this request waited"))
#: the answer of a device's long poll whose key was rotated while it waited.
KEY_ROTATED = _error_answer(unauthorized(
    "invalid_device_key", "the device key was rotated while this request waited"))
#: the answer of a device's long poll whose device was removed while it waited
#: (its key matches no device: the 401 any request with it gets now).
KEY_REMOVED = _error_answer(unauthorized(
    "invalid_device_key", "the device of this key was removed while this request waited"))
#: the answer of a waiter whose own answer failed (a bug; the log has it).
FAILED = _error_answer(ApiError(500, "internal_error", "the broker failed; see its log"))


class Outbox:
    """Answers of waiters (objects with ``request`` and ``token``) waiting to be written."""

    log = Logger()

    def __init__(self, clock, respond, check_token) -> None:
        self.clock = clock
        self.respond = respond          # respond(request, status, body_bytes, headers=None)
        self.check_token = check_token  # check_token(token): its record, or None if revoked
        self._queue: deque = deque()    # (waiter, status, body, headers)
        self._call = None

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, waiter, status, body, headers=None) -> None:
        """Queue waiter's answer; it is written on the next reactor turn at the latest."""
        self._queue.append((waiter, status, body, headers))
        if self._call is None:
            self._call = self.clock.callLater(0, self.drain)

    def drain(self, everything=False) -> None:
        """Write queued answers, a slice of them (or all); the rest on the next turn."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()              # called directly, ahead of its scheduled turn
        queue = self._queue
        count = len(queue) if everything else min(ANSWER_SLICE, len(queue))
        check, valid = self.check_token, {}
        for _ in range(count):
            waiter, status, body, headers = queue.popleft()
            request, waiter.request = waiter.request, None
            if request is None:
                continue               # the client left after its answer was decided
            token = waiter.token
            if token is not None:
                ok = valid.get(token)
                if ok is None:
                    ok = valid[token] = check(token) is not None
                if not ok:
                    status, body, headers = REVOKED    # never data after a revocation
            try:
                self.respond(request, status, body, headers)
            except Exception:
                # One broken answer must not keep the others waiting, nor itself hang.
                self.log.failure("answering a waiting request failed")
                self._fail(request, headers)
        if queue and self._call is None:
            self._call = self.clock.callLater(0, self.drain)

    def _fail(self, request, headers) -> None:
        """End a request whose answer raised: JSON 500 if nothing was sent yet, else close it."""
        if request.finished:
            return
        if not request.startedWriting:
            for key in headers or ():
                request.responseHeaders.removeHeader(key)     # the failed answer's own
            try:
                self.respond(request, *FAILED)
                return
            except Exception:
                self.log.failure("answering a waiting request with an error failed too")
        request.loseConnection()
