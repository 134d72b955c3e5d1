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

A process whose lease lapsed while alive (a long stall) sees its devices
marked offline on the stream and claims them again at once.
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

_ONLINE = FrozenMap({"online": True})
_OFFLINE = FrozenMap({"online": False})


class SharedPresence:
    """SharedRegistry's presence half (a mixin: see shared.py): who holds what."""

    __slots__ = ()

    def set_connection(self, name, *, online, **facts):
        """As DeviceRegistry.set_connection; going online also claims a device
        that the registry shows online but another process holds."""
        d = super().set_connection(name, online=online, **facts)
        if online:
            dev = self._lookup(name)
            if dev is not None and dev.number not in self._held:
                return self._set_online(dev, True)
        return d

    def _set_online(self, dev, online):
        if online:
            self._held.add(dev.number)
            return self._enqueue(dev, _Op("claim", _ONLINE))
        self._held.discard(dev.number)
        return self._enqueue(dev, _Op("connection", _OFFLINE, cond="~" + self.origin))

    def _track_holder(self, number, origin, flags):
        """Keep ``_held`` current from a stream entry's origin and flags."""
        if flags & FLAG_CLAIM:
            if origin == self.origin:
                self._held.add(number)
            else:
                self._held.discard(number)
        elif not flags & 1 and origin != self.origin and number in self._held:
            # Marked offline by another process while this one holds the
            # session: our lease lapsed and we were taken for dead. Claim again.
            self._held.discard(number)
            dev = self._by_number.get(number)
            if dev is not None:
                self.counters["presence_reclaimed"] += 1
                self._set_online(dev, True).addErrback(self._presence_failed, number)

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
        (both in one pipeline of the store's writer thread)."""
        if self._busy:
            return
        self._busy = True
        registry = self._registry
        store = registry._store
        me = registry.origin
        renewed = store.call("lease", [store.lease_prefix + me, store.key_holders],
                             [me, int(self.ttl * 1000)])
        expired = store.call("expired", [store.key_holders],
                             [me, store.lease_prefix, store.held_prefix, store.device_prefix,
                              self.batch])
        d = defer.gatherResults([renewed, expired], consumeErrors=True)
        d.addCallbacks(self._checked, self._failed)

    def _checked(self, results):
        (_, had, _), expired = results
        if not had and self.renewals:
            self._registry.counters["presence_lease_lost"] += 1
            self.log.warn("this process's presence lease had expired (a stall of more than "
                          "{ttl} s?); its devices are claimed again", ttl=self.ttl)
        self.renewals += 1
        reaps = []
        full = False
        for holder, numbers in expired:
            self.log.info("presence lease of {holder} expired: marking {count} of its devices "
                          "offline", holder=holder, count=len(numbers))
            reaps += self._registry._reap(holder, numbers)
            full = full or len(numbers) >= self.batch
        if not reaps:
            self._busy = False
            return

        def done(_):
            self._busy = False
            if full and self._loop is not None:
                self.check()        # more left: go on without waiting for the timer
        defer.DeferredList(reaps, consumeErrors=True).addCallback(done)

    def _failed(self, failure):
        self._busy = False
        if isinstance(failure.value, defer.FirstError):
            failure = failure.value.subFailure
        self.log.warn("presence lease check failed: {error}", error=failure.getErrorMessage())
