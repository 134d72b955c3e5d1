"""A SharedRegistry's writes whose Redis call failed: kept, sent again, applied once.

A call that fails (connection lost, no reply in time) has an unknown
outcome: Redis may or may not have run it. Its writes' Deferreds fail
(nothing is acknowledged for them), but the writes stay at the front of
the device's queue, as the single-process registry keeps a change whose
commit failed: the endpoint computes the device's next report on top of
them. They are sent again alone, on the same base version (with the
device's next write, or after RETRY_DELAY), and later writes wait behind
them. Of two calls with one base version Redis applies one at most, and
the stream says which process took the version after the base: if it was
this one, the failed call was applied and the writes are dropped instead
of being applied twice (``Attempt``).

A failed write's Deferred says what is known of it: NotDurable when Redis
applied it (the stream said so, or only ``WAIT`` failed: redis_writer.py)
or when it is kept to be sent again (do not send it again), the plain
StoreError when it was not applied (send it again), OutcomeUnknown when
it is in doubt and not kept (an expected version: read the device).

Connection writes are kept the same way, claims and this process's own
offline writes alike (a device that went silent while Redis was away must
not stay online there), until a newer connection write of the device
supersedes them (shared_presence.py): a retry, sent in the device's queue
order, never lands after the write that followed it.

The same timer (and backoff) reads the dashboard tokens again after a
re-read that failed (shared.py, ``_tokens_changed``).
"""

from collections import deque

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from . import errors
from .redis_writer import NotReplicated
from .values import FrozenMap

def _as(failure, kind, message, op):
    """A write's StoreError as ``kind`` (NotDurable, OutcomeUnknown) with its token;
    any other failure (a refusal, a bug) unchanged."""
    if not failure.check(errors.StoreError) or failure.check(kind):
        return failure
    return Failure(kind(f"{message} ({failure.value.message})",
                        token=getattr(op, "token", None)))


def _kept(failure, op):
    """The failure of a write kept to be sent again: NotDurable, for its writer must
    not send it again (it would land twice)."""
    return _as(failure, errors.NotDurable, "the change is kept and sent to Redis again "
               "until it lands: do not send it again", op)


def _applied(failure, op):
    """The failure of a write Redis ran (the stream showed it, or only WAIT failed):
    NotDurable, not a StoreError that says "nothing applied, send it again"."""
    return _as(failure, errors.NotDurable, "Redis applied the change but the call "
               "failed: do not send it again", op)


def _unknown(failure, op):
    """The failure of a write Redis may or may not have run, not sent again."""
    return _as(failure, errors.OutcomeUnknown, "Redis may or may not have applied the "
               "change: read the device before sending it again", op)


def _failed_once_applied(d, failure, op):
    """A Deferred for ``op`` in place of ``d``: its success (the change reached
    this process's replica) fails ``d`` as NotDurable; its failure fails ``d``."""
    relay = Deferred()
    relay.addCallbacks(lambda _: d.errback(_applied(failure, op)), d.errback)
    return relay


#: seconds before writes of a failed call are sent again when the device
#: writes nothing meanwhile (one timer for the registry, not one per device).
RETRY_DELAY = 1.0
#: the delay doubles with every round that finds Redis still away, up to
#: this, so that an outage costs a few calls a device, not one a second;
#: any call Redis answers brings it back to RETRY_DELAY.
RETRY_DELAY_MAX = 30.0


class Attempt:
    """The writes of a device sent with states on base version ``base``, until
    Redis's answer tells whether they were applied; after a failed call, its
    retries (same writes, same base) too. ``applied``: whether the stream's
    version base + 1 of the device came from this process (None: not seen)."""

    __slots__ = ("base", "ops", "applied", "failed", "stamps")

    def __init__(self, base, ops):
        self.base = base
        self.ops = ops
        self.applied = None
        self.failed = False     # a call failed: the outcome is in doubt
        self.stamps = []        # history time of each call's first state (see _resync)


def _retained(op):
    """Whether a write of a failed call is kept to be sent again (an expected
    version is the caller's to retry: it got the failure; so is a reaping
    condition "=X": the next lease check finds the device again; so is a
    sequence reservation, asked again from the one confirmed). A process's
    own offline write ("~X") is kept: nobody else would ever write it, and the
    device would stay online in Redis, held by this process, for good."""
    return (op.kind != "barrier" and op.expected is None and op.reserve is None
            and (op.cond is None or op.cond[:1] == "~"))


def _compose(first, second):
    """One merge patch (RFC 7386) doing ``first`` then ``second``, or None when no
    single patch can: ``second`` merges a map into a key ``first`` deletes or
    sets to something else than a map."""
    out = dict(first)
    for key, value in second.items():
        if isinstance(value, dict) and key in out:
            before = out[key]
            if not isinstance(before, dict):
                return None
            value = _compose(before, value)
            if value is None:
                return None
            value = FrozenMap(value)
        out[key] = value
    return out


def coalesce(ops, max_events):
    """Kept writes that wait behind a call in doubt, fewer: adjacent reports
    become one (patches composed, events joined, at most ``max_events``) and
    only the newest session record stays (a batch writes its last one anyway),
    so that a device reporting through a long outage holds one write, not one
    per report. Every write here has already been answered (failed)."""
    out = []
    newest_record = max((i for i, op in enumerate(ops) if op.kind == "session"), default=-1)
    for i, op in enumerate(ops):
        if op.kind == "session" and i != newest_record:
            continue
        last = out[-1] if out else None
        if (op.kind == "reported" and last is not None and last.kind == "reported"
                and len(last.events) + len(op.events) <= max_events):
            patch = _compose(last.patch, op.patch)
            if patch is not None:
                merged = type(op)("reported", patch, tuple(last.events) + tuple(op.events))
                merged.d = None
                out[-1] = merged
                continue
        out.append(op)
    return out


class SharedRetries:
    """SharedWrites' failure half (a mixin: see shared.py and shared_writes.py)."""

    __slots__ = ()

    def _retry_ops(self, dev, queue, attempt):
        """The writes of a failed call, to send again alone on its base; None
        when the device has no call in doubt (its writes go as usual)."""
        if not attempt.failed:
            del self._attempts[dev.number]      # (not expected: its call is answered)
            return None
        if dev.version != attempt.base:
            # The replica passed the base without the stream's entry (a resync).
            self._verdict(dev.number, attempt, self._judged_by_history(dev, attempt))
            return None
        ops = []
        for op in attempt.ops:
            if queue and queue[0] is op:
                ops.append(queue.popleft())
        if not ops:
            del self._attempts[dev.number]
            return None
        attempt.ops = ops
        return ops

    def _failed(self, failure, number, ops, base):
        """The call's outcome is unknown: fail its writes, keep them to send again
        (module docstring) unless the stream already told they were applied.
        Each writer is told what is known: applied (NotDurable), kept to be sent
        again (NotDurable), not applied (the StoreError), or in doubt and not
        kept (OutcomeUnknown)."""
        if self._lost is not None:
            self._refuse(number, ops, base)     # nothing is kept: Redis lost data
            return
        if failure.check(NotReplicated):
            self._not_replicated(failure, number, ops, base)
            return
        self._forget_own(number, ops, base)
        refused = {id(op): op.error for op in ops if op.error is not None}
        # (a write refused before the call was never in it: it is not sent again,
        # and its writer gets the refusal, whatever became of the call)
        kept = ([op for op in ops if _retained(op) and id(op) not in refused]
                if number in self._by_number else [])
        if kept:
            queue = self._queues.setdefault(number, deque())
            for op in reversed(kept):
                op.index = op.error = None
                queue.appendleft(op)
        attempt = self._attempts.get(number)
        applied = None
        if attempt is not None and attempt.base == base and attempt.ops is ops:
            attempt.failed = True
            attempt.ops = kept
            applied = attempt.applied
            if attempt.applied is not None or not kept:
                self._conclude(number, attempt)     # known after all: no doubt left
                if attempt.applied:
                    kept = []
        elif attempt is None or attempt.ops is not ops:
            # No states in the call (no Attempt): only a session record may have been written.
            applied = None if any(op.kind == "session" for op in ops) else False
        if any(op.cond is not None for op in kept):
            # (counted before the Deferreds fire: their callers may look)
            self.counters["presence_offline_retried"] += 1
        behind = []
        if kept and any(op.d is None for op in kept):
            # Kept writes failed again (Redis is away): the writes waiting behind
            # them fail now too, not once Redis is back; they are kept as well
            # (all but those with an expected version: never sent, they fail).
            queue = self._queues[number]
            ahead = {id(op) for op in kept}
            behind = [op for op in queue if id(op) not in ahead]
            queue.clear()
            queue.extend(kept)
            queue.extend(coalesce([op for op in behind if _retained(op)],
                                  self.settings.max_events))
        sent_again = {id(op) for op in kept}
        for op in ops:
            if op.kind == "claim":
                self._held.discard(number)    # not claimed: the next refresh tries again
            d, op.d = op.d, None
            if d is None:
                continue
            if id(op) in refused:
                d.errback(refused[id(op)])      # refused before the call: not in it
            elif applied:
                d.errback(_applied(failure, op))
            elif id(op) in sent_again:
                d.errback(_kept(failure, op))
            elif applied is None and op.kind != "barrier":
                d.errback(_unknown(failure, op))
            else:
                # Known not applied, or a barrier (it applies nothing): may be sent again.
                d.errback(failure)
        for op in behind:
            if op.kind == "claim":
                self._held.discard(number)
            d, op.d = op.d, None
            if d is not None:
                d.errback(_kept(failure, op) if _retained(op) else failure)
        if kept:
            self.counters["retried_failed"] += 1
            self._busy.pop(number, None)
            self._retry_later(number)
        else:
            self._mark_ready(number)

    def _not_replicated(self, failure, number, ops, base):
        """Redis ran the call but too few replicas acknowledged it (redis_writer.py):
        its reply is handled as any reply, and the writes it changed fail as
        NotDurable (applied; do not send again) once the stream brought them."""
        reply = failure.value.reply
        status, _, version = reply[:3]
        if status == "ok" and (version > base or any(op.kind == "session" for op in ops)):
            for op in ops:
                if op.d is not None:
                    op.d = _failed_once_applied(op.d, failure, op)
        self._replied(reply, number, ops, base)

    def _refuse(self, number, ops, base):
        """Fail a call's writes, keeping none: Redis lost data (shared.py)."""
        self._forget_own(number, ops, base)
        self._busy.pop(number, None)
        self._attempts.pop(number, None)
        for op in ops:
            d, op.d = op.d, None
            if d is not None:
                d.errback(op.error or self._lost_error())

    def _retry_later(self, number):
        """Send the device's kept writes after the retry delay (or with its next write)."""
        self._retrying[number] = None
        if self._retry_call is None:    # (False: stopped)
            self._retry_call = self._clock.callLater(self._retry_delay, self._retry)

    def _retry_tokens_later(self):
        """Read the tokens again after the retry delay (shared.py, _tokens_changed)."""
        self._tokens_retry = True
        if self._retry_call is None:    # (False: stopped)
            self._retry_call = self._clock.callLater(self._retry_delay, self._retry)

    def _retry(self):
        self._retry_call = None
        # The next round waits longer, unless Redis answers a call meanwhile.
        self._retry_delay = min(RETRY_DELAY_MAX, self._retry_delay * 2)
        if self._tokens_retry:
            self._tokens_retry = False
            if not self._tokens_reading:
                self._read_tokens()
        numbers, self._retrying = self._retrying, {}
        for number in numbers:
            if number not in self._busy and self._queues.get(number):
                self._schedule(number)

    def _verdict(self, number, attempt, applied):
        """The stream brought the version after an attempt's base: from this
        process (``applied``) or not; acted on once no call of it is in flight."""
        attempt.applied = applied
        if attempt.failed and self._busy.get(number) != "reply":
            self._conclude(number, attempt)
            if number not in self._busy and self._queues.get(number):
                self._schedule(number)

    def _conclude(self, number, attempt):
        """An attempt in doubt is decided: if applied, its writes leave the queue."""
        if self._attempts.get(number) is attempt:
            del self._attempts[number]
        if not attempt.applied:
            return
        self.counters["retry_already_applied"] += 1
        queue = self._queues.get(number)
        if queue:
            done = {id(op) for op in attempt.ops}
            rest = [op for op in queue if id(op) not in done]
            queue.clear()
            queue.extend(rest)
            if not queue:
                del self._queues[number]

    def _judged_by_history(self, dev, attempt):
        """Whether the device's version base + 1 is one of the attempt's calls,
        from its history (time and version) when the stream's entry was trimmed;
        unknown counts as applied (a loss is then possible, never a double)."""
        target = attempt.base + 1
        for entry in dev.history:
            if entry[0] == target:
                return entry[2] in attempt.stamps
        self.counters["retry_outcome_unknown"] += 1
        self.log.warn("outcome of a failed write of device {number} unknown: not sent again",
                      number=dev.number)
        return True
