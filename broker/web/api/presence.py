"""Connection facts of devices that talk HTTP, the same facts an SSP session records.

A device is online from its first authenticated request; it stays online
while one of its long polls waits; it goes offline once it has been silent
for ``offline_after`` seconds, judged by the registry's ``last_heard`` so
that a device also heard over UDP is not flipped by this side. One sweep
timer serves every HTTP device, and it runs only while there are some.

Devices are known by number, not name: a long poll of a removed device
that ends must not mark online another device added under its name.

On a registry shared by several processes (Redis), the kernel hands each
request to any of them: a request marks the device online without claiming
it (``claim=False``, shared_presence.py), so only offline -> online is a
change, as on one process. A request heard while this side's offline write
is on its way marks the device online again once that write is done (the
replica shows it online until then).

Facts that are not changes stay in the process that heard them, so a
process that hears a device it does not hold tells Redis so
(``share_heard``, no version) at most once per ``offline_after / 2`` (no
timer: compared on each request; the sweep does it for a long poll waiting
here), for ``SHARE_HOLDS`` times ``offline_after``: as long as that holds,
the holder's offline write is answered "heard" (HeardElsewhere) and it
looks again when it ends. A device heard only by another process is shown
offline between ``offline_after`` and ``SHARE_HOLDS`` times it after its
last request (a share may be up to half ``offline_after`` older than it).
"""

from __future__ import annotations

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from broker.registry import errors as registry_errors
from broker.registry.shared_presence import HeardElsewhere

#: in ``_leaving``: not heard since the offline write was sent.
_NOT_HEARD = object()
#: a share (module docstring) holds this many times ``offline_after``: shared at
#: most every half of it, it must outlast the requests heard after it.
SHARE_HOLDS = 1.5


class HTTPPresence:
    """Marks HTTP devices online when heard and offline when silent."""

    log = Logger()

    def __init__(self, registry, clock, offline_after: float) -> None:
        self._registry = registry
        self._clock = clock
        self.offline_after = offline_after
        self._seen: dict[int, float] = {}     # device number -> when this side last heard it
        self._holds: dict[int, int] = {}      # device number -> long polls waiting
        self._leaving: dict[int, object] = {}  # number -> address heard since its offline write
        self._shared: dict[int, float] | None = None  # number -> when last shared (Redis)
        self._heard = self._quiet = {}
        if getattr(registry, "shared", False):
            # No SSP session to hold: never claim a device online elsewhere;
            # going offline yields to another process hearing the device.
            self._heard = {"claim": False}
            self._quiet = {"unless_heard": True}
            self._shared = {}
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = clock

    def heard(self, number: int, address) -> None:
        """The device ``number`` made an authenticated request from ``address`` (host, port)."""
        now = self._clock.seconds()
        self._seen[number] = now
        if number in self._leaving:
            self._leaving[number] = address
        self._mark(number, now, address)
        self._share(number, now)
        self._start()

    def _start(self):
        if not self._sweep.running:
            self._sweep.start(max(0.05, self.offline_after / 4), now=False)

    def _share(self, number, now):
        """Tell the device's holder (through Redis) that this process heard it, if
        not done in the last half ``offline_after`` (module docstring)."""
        if self._shared is None or now - self._shared.get(number, now - self.offline_after) \
                < self.offline_after / 2:
            return
        self._shared[number] = now
        d = self._registry.share_heard(number, self.offline_after * SHARE_HOLDS)
        d.addErrback(self._not_shared, number)

    def _mark(self, number, when, address):
        d = self._registry.set_connection(number, online=True, last_heard=when, address=address,
                                          **self._heard)
        d.addErrback(self._lost, number)

    def hold(self, number: int) -> None:
        """A long poll of device ``number`` waits: it counts as connected meanwhile."""
        self._holds[number] = self._holds.get(number, 0) + 1

    def release(self, number: int, address) -> None:
        """A long poll of device ``number`` ended; the device was heard until now."""
        left = self._holds.get(number, 0) - 1
        if left > 0:
            self._holds[number] = left
        else:
            self._holds.pop(number, None)
        if number in self._seen:
            self.heard(number, address)

    def sweep(self) -> None:
        """Flip to offline every HTTP device silent for offline_after seconds."""
        now = self._clock.seconds()
        for number, seen in list(self._seen.items()):
            if number in self._holds:
                self._share(number, now)     # a long poll waiting here keeps it online
                continue
            if now - seen < self.offline_after:
                continue
            view = self._registry.device_by_number(number)
            if view is None:
                self._forget(number)
                continue
            last = view.last_heard if view.last_heard is not None else seen
            if now - last < self.offline_after:
                self._seen[number] = last      # heard meanwhile by another endpoint
                continue
            self._forget(number)
            if view.online or self._claimed(number):
                self._leaving[number] = _NOT_HEARD
                d = self._registry.set_connection(number, online=False, last_heard=last,
                                                  **self._quiet)
                d.addBoth(self._left, number)
        if not self._seen and self._sweep.running:
            self._sweep.stop()

    def _claimed(self, number) -> bool:
        """Whether a shared registry holds the device here or has a claim of it on
        its way although its replica shows it offline (a claim kept through a
        store outage lands later: it must not leave the device online)."""
        holds = getattr(self._registry, "holds_or_claims", None)
        return holds is not None and holds(number)

    def _forget(self, number):
        del self._seen[number]
        if self._shared is not None:
            self._shared.pop(number, None)

    def _left(self, result, number):
        """This side's offline write of device ``number`` is done (or failed): a
        request heard meanwhile marks it online again. Not applied because
        another process heard the device (HeardElsewhere), or failed (it is
        sent again, but may then meet a share): looked at again later."""
        address = self._leaving.pop(number, _NOT_HEARD)
        if isinstance(result, Failure):
            result.trap(registry_errors.RegistryError)
            self.log.debug("device {number} not marked offline: {error}",
                           number=number, error=result.value)
            again = self.offline_after / 2 if self._shared is not None else None
        else:
            again = result.remaining if isinstance(result, HeardElsewhere) else None
        if address is not _NOT_HEARD and number in self._seen:
            self._mark(number, self._seen[number], address)
        elif again is not None and number not in self._seen:
            # Not heard here: the sweep looks again once ``again`` seconds passed.
            self._seen[number] = self._clock.seconds() - self.offline_after + again
            self._start()

    def _not_shared(self, failure, number):
        failure.trap(registry_errors.RegistryError)
        if self._shared is not None:
            self._shared.pop(number, None)     # the next request tries again
        self.log.debug("device {number}: hearing it not shared: {error}",
                       number=number, error=failure.value)

    def _lost(self, failure, number):
        """The online write of device ``number`` failed. A store failure leaves the
        device online in memory and the write kept to land later (NotDurable), or
        even applied (a Redis call in doubt): the device stays tracked, so the
        sweep (which reads the registry's view first) marks it offline once
        silent. Only a device the registry does not know is forgotten."""
        failure.trap(registry_errors.RegistryError)
        if not failure.check(registry_errors.StoreError) and number in self._seen:
            self._forget(number)
        self.log.debug("connection facts of device {number} not recorded: {error}",
                       number=number, error=failure.value)

    def __contains__(self, number: int) -> bool:
        return number in self._seen

    def stop(self) -> None:
        """Stop the sweep timer (the broker is stopping)."""
        if self._sweep.running:
            self._sweep.stop()
