"""Idempotency-Key on the API's writes: a retried write is answered, never applied twice.

A client that sent a write (events, a report, a desired patch) and got no
answer (a timeout, a lost connection) or ``503 not_durable`` (applied, not
stored yet) cannot tell whether to send it again: sent again, it would be
applied twice. With an ``Idempotency-Key`` header (IETF draft
httpapi-idempotency-key-header) it sends the same request with the same
key, and gets the first one's answer instead of a second change:

* the first answered 2xx: the same status, body and ETag again
  (``Idempotent-Replayed: true``);
* the first answered ``not_durable``: the retry waits for the device's
  state to be stored (a store barrier), then answers 200 with the device
  as it is then, or ``not_durable`` again while the store still fails;
* the first answered ``outcome_unknown`` (the store may or may not have
  applied it): ``outcome_unknown`` again, for as long as the key is
  remembered. Only reading the device tells, and running it again could
  apply it twice;
* the first is still waiting for its answer: 409 ``idempotency_key_in_use``;
* the same key with another request (method, path or body): 409
  ``idempotency_key_reused``;
* the first was refused (any other error): it changed nothing, the key is
  forgotten, and the retry runs as a new request.

Keys are scoped by device number and credential, and remembered for
``window`` seconds, at most ``per_device`` per device, and answers of at
most ``max_bytes`` in all (oldest forgotten first). Expiry is lazy: each new
key first drops the expired ones at the front of one ordered dict (oldest
first); no timer, nothing per device but a short list of its keys.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict

from twisted.internet import defer

from .errors import ApiError, bad_request, not_durable, outcome_unknown

HEADER = b"idempotency-key"
#: seconds a key is remembered (a retry after that runs as a new request).
WINDOW = 600.0
#: keys remembered per device (its oldest are forgotten first).
PER_DEVICE = 16
#: bytes of remembered answers in all, with ENTRY_BYTES for each key.
MAX_BYTES = 8 * 1024 * 1024
#: the rough cost of one remembered key besides its answer (objects, dict slot).
ENTRY_BYTES = 400
MAX_KEY_LENGTH = 255

_PENDING, _KEPT, _UNKNOWN, _DONE = "pending", "kept", "unknown", "done"
#: the codes of a confirmation (a store barrier) that found the store still failing.
_STORE_FAILED = ("store_error", "not_durable", "outcome_unknown")


def idempotency_key(request) -> bytes | None:
    """The request's Idempotency-Key (1-255 visible ASCII characters, inner spaces
    allowed; a quoted structured-field string is taken as it is), or None."""
    values = request.requestHeaders.getRawHeaders(HEADER)
    if not values:
        return None
    key = values[0]
    if (len(values) > 1 or not 0 < len(key) <= MAX_KEY_LENGTH
            or any(c < 0x20 or c > 0x7E for c in key) or key[0] == 0x20 or key[-1] == 0x20):
        raise bad_request("invalid_parameter",
                          "Idempotency-Key must be one value of 1 to 255 visible ASCII characters")
    return key


def fingerprint(request) -> bytes:
    """What identifies "the same request": its method, path and body."""
    request.content.seek(0)
    digest = hashlib.sha256(request.method + b" " + request.path + b"\n")
    digest.update(request.content.read())
    return digest.digest()[:16]


class _Entry:
    __slots__ = ("scope", "fingerprint", "at", "state", "answer", "size")

    def __init__(self, scope, fingerprint, at):
        self.scope = scope
        self.fingerprint = fingerprint
        self.at = at
        self.state = _PENDING
        self.answer = None      # (status, body, headers) once _DONE
        self.size = ENTRY_BYTES + len(scope[2])


class IdempotencyKeys:
    """The recent keys of the API's writes, bounded in count, bytes and age."""

    def __init__(self, clock, window: float = WINDOW, per_device: int = PER_DEVICE,
                 max_bytes: int = MAX_BYTES) -> None:
        self.clock = clock
        self.window = window
        self.per_device = per_device
        self.max_bytes = max_bytes
        self._entries = OrderedDict()     # scope -> _Entry, oldest first
        self._devices = {}                # device number -> its entries, oldest first
        self.bytes = 0
        #: replayed (a retry answered from its key), confirmed (a not_durable
        #: retry answered once stored), conflicts (409s), forgotten (evicted early).
        self.counters = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def once(self, scope, fingerprint: bytes, run, confirm):
        """The answer to a write with key ``scope`` = (device number, credential, key).

        ``run()`` carries the write out (a Deferred of (status, body, headers)
        or of ApiError); ``confirm()`` waits for the device's state to be
        stored (the same, without a change). Returns a tuple or a Deferred.
        """
        self._expire()
        entry = self._entries.get(scope)
        if entry is None:
            entry = self._add(scope, fingerprint)
            return defer.maybeDeferred(run).addCallbacks(self._done, self._failed, (entry,),
                                                         None, (entry,))
        if entry.fingerprint != fingerprint:
            self.counters["conflicts"] += 1
            raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key was sent with "
                           "another request (method, path or body): use a new key")
        if entry.state == _PENDING:
            self.counters["conflicts"] += 1
            raise ApiError(409, "idempotency_key_in_use", "the request first sent with this "
                           "Idempotency-Key is not answered yet",
                           headers={b"retry-after": b"1"})
        if entry.state == _DONE:
            self.counters["replayed"] += 1
            return _replayed(entry.answer)
        if entry.state == _UNKNOWN:
            self.counters["replayed"] += 1
            raise outcome_unknown()
        entry.state = _PENDING          # _KEPT: applied once, stored?
        return confirm().addCallbacks(self._confirmed, self._unconfirmed, (entry,), None,
                                      (entry,))

    # -- outcomes ------------------------------------------------------------------

    def _done(self, answer, entry):
        if self._entries.get(entry.scope) is entry:
            entry.state = _DONE
            entry.answer = answer
            grown = len(answer[1])
            entry.size += grown
            self.bytes += grown
            self._shrink()
        return answer

    def _failed(self, failure, entry):
        code = failure.value.code if failure.check(ApiError) else None
        if code == "not_durable":
            entry.state = _KEPT         # applied: a retry must not apply it again
        elif code == "outcome_unknown":
            entry.state = _UNKNOWN      # maybe applied: a retry must not apply it again
        else:
            self._forget(entry)         # refused: nothing applied, a retry runs anew
        return failure

    def _confirmed(self, answer, entry):
        self.counters["confirmed"] += 1
        return self._done(answer, entry)

    def _unconfirmed(self, failure, entry):
        if failure.check(ApiError) and failure.value.code in _STORE_FAILED:
            entry.state = _KEPT
            raise not_durable()
        self._forget(entry)             # the device is gone (404), or a bug
        return failure

    # -- bounds ----------------------------------------------------------------------

    def _add(self, scope, fingerprint):
        entry = _Entry(scope, fingerprint, self.clock.seconds())
        mine = self._devices.get(scope[0])
        if mine is not None and len(mine) >= self.per_device:
            self._forget(mine[0])
            self.counters["forgotten"] += 1
        self._devices.setdefault(scope[0], []).append(entry)
        self._entries[scope] = entry
        self.bytes += entry.size
        self._shrink()
        return entry

    def _forget(self, entry):
        if self._entries.get(entry.scope) is entry:
            del self._entries[entry.scope]
            self.bytes -= entry.size
            mine = self._devices[entry.scope[0]]
            mine.remove(entry)
            if not mine:
                del self._devices[entry.scope[0]]

    def _expire(self):
        """Drop the keys older than the window (the oldest are first)."""
        limit = self.clock.seconds() - self.window
        entries = self._entries
        while entries:
            entry = next(iter(entries.values()))
            if entry.at > limit:
                break
            self._forget(entry)

    def _shrink(self):
        """Forget the oldest keys while the answers kept exceed max_bytes."""
        entries = self._entries
        while self.bytes > self.max_bytes and len(entries) > 1:
            self._forget(next(iter(entries.values())))
            self.counters["forgotten"] += 1


def _replayed(answer):
    status, body, headers = answer
    return status, body, {**(headers or {}), b"idempotent-replayed": b"true"}
