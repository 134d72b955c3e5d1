"""Commands from dashboards and scripts to devices, over their SSP sessions.

A command is one value (JSON from the REST API or the WebSocket) appended
to the event queue of the state the broker sends the device (wire.md 5).
It is checked against the registry's value limits, then handed to
``SSPEndpoint.send_command``: it travels only on a live SSP session, so a
device without one gets nothing and the caller is told so rather than left
believing it was queued. A queued command is first written to the
session's record, so it survives a broker restart (and is never delivered
twice); the answer comes once it is.

Both the REST endpoint and the WebSocket op use ``CommandSender`` so that
every failure has the same code in both.

With several workers or brokers sharing a registry on Redis, the device's
session may live in another process. When there is no session here but
the shared registry says the device is online, the command is relayed:
published on Redis, delivered by the process that holds the session
(docs/scaling.md).

A device the registry says is offline gets 409 device_offline; one it says
is online but that no process holds an SSP session of (a device heard over
HTTP, which has no session to carry commands) gets 409 no_ssp_session, so
that nobody waits for it to come "online" to resend.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger

from broker.registry.errors import InvalidKey, InvalidValue
from broker.registry.values import Validator, value_size
from broker.udp.bridge import TooManyCommands


class CommandRefused(Exception):
    """A command that was not queued: an HTTP status, a stable code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class CommandSender:
    """Checks commands and queues them on the device's SSP session.

    ``endpoint`` is the broker's SSPEndpoint, or None when [ssp] is off
    (then every command is refused with ``ssp_disabled``).  ``counters``
    counts queued commands and refusals by code.  ``relay``: whether the
    commands other processes relay here go through this sender and count in
    its counters; the registry keeps one target, so one sender per process
    should (the broker's own, counted as ``via="relay"``: broker/service.py).
    """

    log = Logger()

    def __init__(self, registry, endpoint=None, *, relay: bool = True) -> None:
        self.registry = registry
        self.endpoint = endpoint
        self.counters: Counter = Counter()
        self._settings = None
        self._validator = None
        relay_to = getattr(registry, "relay_to", None)
        if relay and endpoint is not None and relay_to is not None:
            relay_to(self._deliver_relayed)

    def _deliver_relayed(self, device_number: int, command) -> bool:
        """A command another process relayed: queue it if the session is here."""
        try:
            queued = self.endpoint.send_command(device_number, command)
        except TooManyCommands as refusal:
            self.counters["too_many_commands"] += 1
            self.log.warn("relayed command for device {number} dropped: {refusal}",
                          number=device_number, refusal=str(refusal))
            return False
        except (TypeError, ValueError):
            self.log.failure("a relayed command could not be queued")
            return False
        if queued is None:
            return False
        queued.addErrback(self._relayed_not_stored, device_number)
        return True

    def _relayed_not_stored(self, failure, device_number: int) -> None:
        self.counters["store_error"] += 1
        self.log.failure("relayed command for device {number} not written to its session "
                         "record", failure, number=device_number)

    def _check(self, command):
        """The command frozen as the registry freezes values, or CommandRefused."""
        if command is None:
            raise CommandRefused(400, "invalid_command", "a command must not be null")
        settings = self.registry.settings
        if settings is not self._settings:
            # Limits follow a reload of the registry settings.
            self._settings, self._validator = settings, Validator(settings)
        try:
            frozen = self._validator.value(command, 1, "command")
        except (InvalidValue, InvalidKey) as problem:
            raise CommandRefused(400, "invalid_command", str(problem)) from None
        if value_size(frozen) > settings.max_state_bytes:
            raise CommandRefused(413, "command_too_large",
                                 f"the command exceeds {settings.max_state_bytes} bytes")
        return frozen

    def send(self, name: str, command):
        """Queue ``command`` for device ``name``: a Deferred of the answer's fields,
        or CommandRefused (raised at once) for a command refused before any work.

        {"queued": True} once it is durable in the session record of this
        process's session and on its way; {"queued": True, "relayed": True}
        once another process heard the relayed command. Failures are
        CommandRefused: 409 device_offline (offline, or its session ended
        meanwhile), 409 no_ssp_session (online, over HTTP, but no process
        holds an SSP session of it), 429 too_many_commands (the session already holds
        the most unacknowledged commands it may), 503 relay_failed (Redis
        did not take it), 503 store_error (the record write failed; its fate
        is unknown, as after a timeout).
        """
        try:
            answer = self._send(name, command)
        except CommandRefused as refusal:
            self.counters[refusal.code] += 1
            raise
        self.counters["queued"] += 1
        return answer.addErrback(self._count_refusal)

    def send_confirmed(self, name: str, command):
        """send(), with a refusal as a failed Deferred too."""
        return defer.maybeDeferred(self.send, name, command)

    def _count_refusal(self, failure):
        failure.trap(CommandRefused)
        self.counters[failure.value.code] += 1
        return failure

    def _send(self, name: str, command):
        view = self.registry.device(name)
        if view is None:
            raise CommandRefused(404, "unknown_device", f"unknown device {name[:64]!r}")
        frozen = self._check(command)
        if self.endpoint is None:
            raise CommandRefused(409, "ssp_disabled", "commands travel over SSP, which is "
                                 "turned off on this broker ([ssp] enabled = false)")
        try:
            queued = self.endpoint.send_command(view.device_number, frozen)
        except TooManyCommands as refusal:
            raise CommandRefused(429, "too_many_commands",
                                 f"device {name[:64]!r} has {refusal.waiting} commands not yet "
                                 f"acknowledged (at most {refusal.limit}): send more once it "
                                 "has taken some") from None
        except (TypeError, ValueError) as problem:
            # Beyond what an SSP state can carry (wire.md 5), though the registry takes it.
            raise CommandRefused(400, "invalid_command", f"not a device value: {problem}") from None
        if queued is not None:
            return queued.addCallbacks(self._local_answer, self._store_failed,
                                       callbackArgs=(name,), errbackArgs=(name,))
        relay = getattr(self.registry, "relay_command", None)
        if relay is not None and view.online:
            # Another worker or broker holds the session (module docstring).
            self.counters["relayed"] += 1
            return relay(view.device_number, frozen).addCallbacks(
                self._published, self._relay_failed, callbackArgs=(name,), errbackArgs=(name,)
            ).addCallback(self.relay_answer, name).addErrback(_sessionless, name)
        if view.online:
            raise _no_session(name)
        raise _offline(name)

    def _local_answer(self, on_its_way: bool, name: str) -> dict:
        if not on_its_way:
            raise CommandRefused(409, "device_offline", f"the SSP session of device "
                                 f"{name[:64]!r} ended before the command was queued")
        self.log.debug("command queued for {name}", name=name)
        return {"queued": True}

    def _store_failed(self, failure, name: str):
        self.log.failure("command for {name} not written to its session record", failure,
                         name=name)
        raise CommandRefused(503, "store_error", "the command could not be made durable; "
                             "it may or may not reach the device")

    @staticmethod
    def relay_answer(receivers: int, name: str) -> dict:
        """The answer's fields for a command relayed to receivers processes (this one included)."""
        if receivers == 0:
            raise CommandRefused(503, "relay_failed",
                                 "the command could not be handed to the other brokers; retry")
        if receivers < 2:
            raise CommandRefused(409, "device_offline",
                                 f"no broker holds a live SSP session of device {name[:64]!r}")
        return {"queued": True, "relayed": True}

    def _published(self, receivers: int, name: str) -> int:
        if receivers < 2:
            # Every process subscribes, this one included: nobody else heard it.
            self.counters["relay_unheard"] += 1
            self.log.warn("relayed command for {name} reached no other process", name=name)
        return receivers

    def _relay_failed(self, failure, name: str) -> int:
        # Counted as the refusal relay_answer makes of it (relay_failed).
        self.log.failure("relaying a command for {name} failed", failure, name=name)
        return 0


def _offline(name: str) -> CommandRefused:
    return CommandRefused(409, "device_offline",
                          f"device {name[:64]!r} is offline: it has no live SSP session to "
                          "carry the command; send it when the device is connected")


def _no_session(name: str) -> CommandRefused:
    return CommandRefused(409, "no_ssp_session",
                          f"device {name[:64]!r} is online, but no broker holds an SSP "
                          "session of it (a device that talks HTTP has none): commands travel "
                          "only over SSP; send it once the device opens an SSP session, or "
                          "write desired state, which HTTP devices read")


def _sessionless(failure, name: str):
    """A relay nobody took, for a device the registry shows online: no_ssp_session."""
    failure.trap(CommandRefused)
    if failure.value.code == "device_offline":
        raise _no_session(name)
    return failure
