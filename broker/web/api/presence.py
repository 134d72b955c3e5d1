"""Connection facts of devices that talk HTTP, the same facts an SSP session records.

A device is online from its first authenticated request; it stays online
while one of its long polls waits; it goes offline once it has been silent
for ``offline_after`` seconds, judged by the registry's ``last_heard`` so
that a device also heard over UDP is not flipped by this side. One sweep
timer serves every HTTP device, and it runs only while there are some.

Devices are known by number, not name: a long poll of a removed device
that ends must not mark online another device added under its name.
"""

from __future__ import annotations

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from broker.registry import errors as registry_errors


class HTTPPresence:
    """Marks HTTP devices online when heard and offline when silent."""

    log = Logger()

    def __init__(self, registry, clock, offline_after: float) -> None:
        self._registry = registry
        self._clock = clock
        self.offline_after = offline_after
        self._seen: dict[int, float] = {}     # device number -> when this side last heard it
        self._holds: dict[int, int] = {}      # device number -> long polls waiting
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = clock

    def heard(self, number: int, address) -> None:
        """The device ``number`` made an authenticated request from ``address`` (host, port)."""
        now = self._clock.seconds()
        self._seen[number] = now
        d = self._registry.set_connection(number, online=True, last_heard=now, address=address)
        d.addErrback(self._lost, number)
        if not self._sweep.running:
            self._sweep.start(max(0.05, self.offline_after / 4), now=False)

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
            if number in self._holds or now - seen < self.offline_after:
                continue
            view = self._registry.device_by_number(number)
            if view is None:
                del self._seen[number]
                continue
            last = view.last_heard if view.last_heard is not None else seen
            if now - last < self.offline_after:
                self._seen[number] = last      # heard meanwhile by another endpoint
                continue
            del self._seen[number]
            if view.online:
                d = self._registry.set_connection(number, online=False, last_heard=last)
                d.addErrback(self._lost, number)
        if not self._seen and self._sweep.running:
            self._sweep.stop()

    def _lost(self, failure, number):
        failure.trap(registry_errors.RegistryError)
        self._seen.pop(number, None)
        self.log.debug("connection facts of device {number} not recorded: {error}",
                       number=number, error=failure.value)

    def __contains__(self, number: int) -> bool:
        return number in self._seen

    def stop(self) -> None:
        """Stop the sweep timer (the broker is stopping)."""
        if self._sweep.running:
            self._sweep.stop()
