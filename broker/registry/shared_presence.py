"""Presence across broker processes: who holds a device's session, and leases.

A device's ``online`` flag is written by the process holding its SSP
session. If that process (its host) dies, nobody would ever write
``online = false``. So each process keeps a lease in Redis that expires
unless renewed (``{p}:lease:<origin>``, one timer per process, never one
per device), and Redis records which process holds each online device
(field h of the device, set ``{p}:held:<origin>``): the change script
sets the holder when a process claims a device (flag 4 on the state, see
redis_scripts.CHANGE) and clears it when the device goes offline.

On the same timer every process asks Redis for holders whose lease
expired, with the devices they still hold, and marks those offline through
the normal write path (a change on the stream: every process, dashboard
and long poll sees it). Each such write carries the condition "only if
that holder still holds it", checked inside the script, so a device that
meanwhile came online on another process stays online. A process's own
offline writes carry "only if I or nobody holds it", so an old session
ending on one host cannot mark offline a device now online on another.

A device heard over HTTP has no session to hold, and the kernel hands its
requests to any process: such a request claims the device only when the
registry shows it offline (``claim=False``), so a device online elsewhere
keeps its holder, and no version, whatever process its requests reach. Its
holder marks it offline once it has not heard it for ``offline_after``;
another process's offline write for it is answered "moved". So that the
holder does not mark it offline while it talks to another process only,
that process tells Redis it heard it (``share_heard``, the HEARD script:
a time on the device's hash, no change, no version, at most about twice
per ``offline_after``), and the holder's HTTP offline write
(``unless_heard``) is answered "heard" until that time passed (Redis's
clock, on both sides: processes' clocks differ); the holder keeps the
device and looks again then (``HeardElsewhere``).

A process whose lease lapsed while alive (a long stall) sees its devices
marked offline on the stream and claims them again at once (or, if those
entries were trimmed before it read them, when it catches up:
shared_stream.py, ``_resync_held``).

Every key a script touches is declared (redis_scripts.py), so what depends
on data is read first: a claim does not touch the previous holder's set
(that process drops the device from its own set with its next renewal,
when its stream shows the claim or its own offline write failed or found
the device removed; at once when Redis answers that write "moved"), and
a check is up to three round trips every interval: renew the lease
(LEASE, which answers the processes with a lease), look at the others'
leases (EXPIRED, which answers the devices an expired holder's set names)
and at those devices (HELD, which keeps those it still holds).
"""

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import errors
from .shared_stream import FLAG_CLAIM
from .shared_writes import _Op
from .values import FrozenMap

#: seconds a lease lives unless renewed, and between renewals and checks.
LEASE_TTL = 15.0
LEASE_CHECK_INTERVAL = 5.0
#: devices of one expired holder taken per check (the next check, or an
#: immediate one after a full batch, takes more).
REAP_BATCH = 5000
#: devices that left this process dropped from its set per renewal, at most.
LEFT_BATCH = 1000

_ONLINE = FrozenMap({"online": True})
_OFFLINE = FrozenMap({"online": False})


class HeardElsewhere:
    """The answer to an HTTP offline write (``unless_heard``) that Redis did not
    apply: another process heard the device, and that holds ``remaining``
    seconds more; this process still holds it (no change was made)."""

    __slots__ = ("name", "version", "cursor", "token", "remaining")

    def __init__(self, name, version, cursor, remaining, token=None):
        self.name = name
        self.version = version
        self.cursor = cursor
        self.remaining = remaining
        self.token = token


class SharedPresence:
    """SharedRegistry's presence half (a mixin: see shared.py): who holds what."""

    __slots__ = ()

    def set_connection(self, name, *, online, claim=True, unless_heard=False, **facts):
        """As DeviceRegistry.set_connection; going online also claims a device
        that the registry shows online but another process holds, and going
        offline is written after a claim of ours still on its way (the replica
        shows the device offline until the stream brings the claim, or the
        claim failed and is kept to be sent again, shared_retry.py).

        ``claim=False``: the device is heard without a session to hold here (a
        request over HTTP, which the kernel may hand to any process). Only
        offline -> online is then a change (a claim: a process that dies
        leaves it to the reaping); an online device, whoever holds it, gets
        its facts updated in place, as on one process. Claimed at every
        request, it would take a new version each time its requests changed
        process, and its long poll would never wait.

        ``unless_heard`` (going offline: HTTP presence's sweep): not applied
        while another process's ``share_heard`` of the device holds; the
        Deferred then fires with HeardElsewhere, and this process keeps it.

        A connection write of the device kept from a failed call and not in
        doubt is superseded by this one and dropped (``_supersede``)."""
        dev = self._lookup(name)
        dropped = False     # a claim kept from a failed call: this one replaces it
        if dev is not None:
            dropped = self._supersede(dev.number)
            if not online and unless_heard and dev.online:
                if facts.get("last_heard") is None and dev.last_heard is not None:
                    facts["last_heard"] = dev.last_heard
                super().set_connection(name, online=True, **facts)    # its facts, in place
                return self._set_online(dev, False, quiet=True)
            if online and not claim and not dev.online and not dropped and (
                    dev.number in self._held or self._claim_pending(dev.number)):
                # Our claim is on its way (the replica shows the device offline
                # until the stream brings it): one claim, not one per request.
                if facts.get("last_heard") is None:
                    facts["last_heard"] = self._clock.seconds()
                return super().set_connection(name, online=dev.online, **facts)
        d = super().set_connection(name, online=online, **facts)
        if dev is None:
            return d
        if online:
            if (claim or dropped) and dev.number not in self._held:
                return self._set_online(dev, True)
        elif not dev.online and (dev.number in self._held or self._claim_pending(dev.number)):
            return self._set_online(dev, False, quiet=unless_heard)    # behind the claim
        return d

    def share_heard(self, number, seconds):
        """This process heard device ``number`` (over HTTP) and does not hold it:
        its holder's HTTP offline write (``unless_heard``) is not applied for
        ``seconds`` from now (Redis's clock). No change, no version: one
        field of the device in Redis (the HEARD script). Nothing is sent for
        a device this process holds or is claiming. Deferred: whether Redis
        took it (False: nobody else holds the device)."""
        if (number in self._held or self._claim_pending(number) or self._lost is not None
                or number not in self._by_number):
            return defer.succeed(False)
        store = self._store
        d = store.call("heard", [store.device_key(number)], [self.origin, int(seconds * 1000)])
        return d.addCallback(lambda reply: reply[0] == "ok")

    def _supersede(self, number):
        """Drop the device's connection writes kept from a failed call (claims
        and our own offline writes) that a newer one replaces: counted, never
        sent again. A write in doubt (Redis may have run it) stays: the newer
        one is queued behind it, so it cannot land after the newer one.
        Whether a claim was dropped."""
        queue = self._queues.get(number)
        if not queue:
            return False
        attempt = self._attempts.get(number)
        doubt = {id(op) for op in attempt.ops} if attempt is not None and attempt.failed else ()
        own = ("~" + self.origin, "~?" + self.origin)
        stale = [op for op in queue if op.d is None and id(op) not in doubt
                 and (op.kind == "claim" or (op.kind == "connection" and op.cond in own))]
        if not stale:
            return False
        self.counters["presence_write_superseded"] += len(stale)
        gone = {id(op) for op in stale}
        rest = [op for op in queue if id(op) not in gone]
        queue.clear()
        queue.extend(rest)
        if not queue:
            del self._queues[number]
        return any(op.kind == "claim" for op in stale)

    def holds_or_claims(self, number) -> bool:
        """Whether this process holds the device or has a claim of it on its way
        (the replica may still show it offline: an HTTP sweep must still write
        its offline, queued behind the claim)."""
        return number in self._held or self._claim_pending(number)

    def _claim_pending(self, number):
        """Whether a claim of the device is queued, in flight or in doubt here."""
        queue = self._queues.get(number)
        if queue and any(op.kind == "claim" for op in queue):
            return True
        attempt = self._attempts.get(number)
        return attempt is not None and any(op.kind == "claim" for op in attempt.ops)

    def _set_online(self, dev, online, quiet=False):
        if online:
            self._hold(dev.number)
            return self._enqueue(dev, _Op("claim", _ONLINE))
        self._held.discard(dev.number)
        cond = ("~?" if quiet else "~") + self.origin    # (redis_scripts.CHANGE)
        d = self._enqueue(dev, _Op("connection", _OFFLINE, cond=cond))
        return d.addErrback(self._maybe_left, dev.number)

    def _replied(self, reply, number, ops, base, checked=False):
        """As SharedWrites._replied, and Redis's "heard" answer to an HTTP offline
        write (``~?``): not applied, like "moved", but Redis shows this process
        still holding the device: it is held here again, unless the replica
        already applied a later change (whose holder it then went by)."""
        if reply[0] != "heard" or self._lost is not None:
            return super()._replied(reply, number, ops, base, checked)
        _, left, version = reply[:3]
        attempt = self._attempts.get(number)
        if attempt is not None and attempt.base == base and attempt.ops is ops:
            del self._attempts[number]      # answered: not applied
        self._forget_own(number, ops, base)
        dev = self._by_number.get(number)
        if dev is not None and dev.version <= version:
            self._hold(number)
        self.counters["connection_heard_elsewhere"] += 1
        for op in ops:
            if op.d is not None:
                op.d.callback(HeardElsewhere(dev.name if dev else number, version,
                                             dev.cursor if dev else 0, left / 1000.0, op.token))
        self._mark_ready(number)

    def _maybe_left(self, failure, number):
        """An offline write that failed, or found the device removed, did not drop it
        from our set in Redis (its script does, and a "moved" answer too): the next
        renewal does, unless Redis shows this process holding it (LEASE)."""
        if number not in self._held:
            self._left.add(number)
        return failure

    def _track_holder(self, number, origin, flags):
        """Keep ``_held`` current from a stream entry's origin and flags."""
        if flags & FLAG_CLAIM:
            if origin == self.origin:
                self._hold(number)
            elif number in self._held:
                # Another process holds it now: drop it from our set in Redis
                # (its claim could not: that key is not declared to it).
                self._held.discard(number)
                self._left.add(number)
        elif not flags & 1 and origin == self.origin:
            # Our own offline write (after a claim of ours whose entry re-added it).
            self._held.discard(number)
        elif not flags & 1 and number in self._held:
            # Marked offline by another process while this one holds the
            # session: our lease lapsed and we were taken for dead. Claim again.
            self._held.discard(number)
            dev = self._by_number.get(number)
            if dev is not None:
                self.counters["presence_reclaimed"] += 1
                self._set_online(dev, True).addErrback(self._presence_failed, number)

    def _hold(self, number):
        self._held.add(number)
        self._left.discard(number)

    def _take_left(self, count):
        """Up to ``count`` devices that left this process, for the lease renewal
        to drop from its set (it drops only those Redis shows held elsewhere)."""
        numbers = []
        for number in self._left:
            if len(numbers) == count:
                break
            numbers.append(number)
        self._left.difference_update(numbers)
        return numbers

    def _reap(self, holder, numbers):
        """Mark offline the devices ``holder`` (whose lease expired) still holds;
        a list of Deferreds."""
        out = []
        for number in numbers:
            dev = self._by_number.get(number)
            if dev is None or number in self._reaping:
                continue
            self._reaping.add(number)
            d = self._enqueue(dev, _Op("connection", _OFFLINE, cond="=" + holder))
            d.addErrback(self._presence_failed, number)
            d.addBoth(self._reaped, number)
            out.append(d)
        return out

    def _reaped(self, result, number):
        self._reaping.discard(number)
        return result

    def _presence_failed(self, failure, number):
        failure.trap(errors.RegistryError)
        if not failure.check(errors.UnknownDevice):
            self.log.warn("presence of device {number} not written: {error}",
                          number=number, error=failure.getErrorMessage())


class PresenceLease:
    """The one timer of a process's presence: renew the lease, reap expired holders."""

    log = Logger()

    def __init__(self, registry, *, ttl=LEASE_TTL, interval=LEASE_CHECK_INTERVAL,
                 batch=REAP_BATCH):
        if not ttl > 0 or not 0 < interval <= ttl / 2:
            raise ValueError("presence lease: need ttl > 0 and 0 < check interval <= ttl / 2, "
                             f"got ttl={ttl!r}, interval={interval!r}")
        self._registry = registry
        self.ttl = ttl
        self.interval = interval
        self.batch = batch
        self._loop = None
        self._busy = False
        self.renewals = 0

    def start(self):
        if self._loop is None:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self._registry._clock
            self._loop.start(self.interval, now=True)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self):
        """Renew this process's lease and reap the holders whose lease expired
        (three round trips of the store's writer thread at most, module docstring)."""
        if self._busy:
            return
        self._busy = True
        self._check().addErrback(self._failed).addBoth(self._done)

    @defer.inlineCallbacks
    def _check(self):
        """True if a dead holder has more devices than one batch took."""
        registry = self._registry
        store = registry._store
        me = registry.origin
        left = registry._take_left(LEFT_BATCH)
        try:
            _, had, holders = yield store.call(
                "lease", [store.lease_prefix + me, store.key_holders, store.held_key(me),
                          *[store.device_key(n) for n in left]],
                [me, int(self.ttl * 1000), *left])
        except errors.StoreError:
            registry._left.update(n for n in left if n not in registry._held)
            raise
        if not had and self.renewals:
            registry.counters["presence_lease_lost"] += 1
            self.log.warn("this process's presence lease had expired (a stall of more than "
                          "{ttl} s?); its devices are claimed again", ttl=self.ttl)
        self.renewals += 1
        others = [holder for holder in holders if holder != me]
        if not others:
            return False
        keys = [store.key_holders]
        for holder in others:
            keys += (store.lease_prefix + holder, store.held_key(holder))
        expired = yield store.call("expired", keys, [self.batch, *others])
        found = yield defer.gatherResults(
            [store.call("held", [store.key_holders, store.lease_prefix + holder,
                                 store.held_key(holder),
                                 *[store.device_key(n) for n in numbers]],
                        [holder, *numbers])
             for holder, numbers in expired], consumeErrors=True)
        reaps = []
        full = False
        for (holder, _), numbers in zip(expired, found):
            if not numbers:
                continue
            self.log.info("presence lease of {holder} expired: marking {count} of its devices "
                          "offline", holder=holder, count=len(numbers))
            reaps += registry._reap(holder, numbers)
            full = full or len(numbers) >= self.batch
        if reaps:
            yield defer.DeferredList(reaps, consumeErrors=True)
        return full

    def _done(self, full):
        self._busy = False
        if full is True and self._loop is not None:
            self.check()        # more left: go on without waiting for the timer

    def _failed(self, failure):
        if isinstance(failure.value, defer.FirstError):
            failure = failure.value.subFailure
        self.log.warn("presence lease check failed: {error}", error=failure.getErrorMessage())
