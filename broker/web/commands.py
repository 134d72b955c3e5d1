"""Commands from dashboards and scripts to devices, over their SSP sessions.

A command is one value (JSON from the REST API or the WebSocket) appended
to the event queue of the state the broker sends the device (wire.md 5).
It is checked against the registry's value limits, then handed to
``SSPEndpoint.send_command``: it travels only on a live SSP session and
lives in memory only, so a device without one gets nothing, and the
caller is told so rather than left believing it was queued.

Both the REST endpoint and the WebSocket op use ``CommandSender`` so that
every failure has the same code in both.
"""

from __future__ import annotations

from collections import Counter

from twisted.logger import Logger

from broker.registry.errors import InvalidKey, InvalidValue
from broker.registry.values import Validator, value_size


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
    counts queued commands and refusals by code.
    """

    log = Logger()

    def __init__(self, registry, endpoint=None) -> None:
        self.registry = registry
        self.endpoint = endpoint
        self.counters: Counter = Counter()
        self._settings = None
        self._validator = None

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

    def send(self, name: str, command) -> None:
        """Queue ``command`` for device ``name``, or raise CommandRefused saying why not."""
        try:
            self._send(name, command)
        except CommandRefused as refusal:
            self.counters[refusal.code] += 1
            raise
        self.counters["queued"] += 1

    def _send(self, name: str, command) -> None:
        view = self.registry.device(name)
        if view is None:
            raise CommandRefused(404, "unknown_device", f"unknown device {name[:64]!r}")
        frozen = self._check(command)
        if self.endpoint is None:
            raise CommandRefused(409, "ssp_disabled", "commands travel over SSP, which is "
                                 "turned off on this broker ([ssp] enabled = false)")
        try:
            queued = self.endpoint.send_command(view.device_number, frozen)
        except (TypeError, ValueError) as problem:
            # Beyond what an SSP state can carry (wire.md 5), though the registry takes it.
            raise CommandRefused(400, "invalid_command", f"not a device value: {problem}") from None
        if not queued:
            raise CommandRefused(409, "device_offline",
                                 f"device {name[:64]!r} has no live SSP session to carry "
                                 "the command; send it when the device is connected")
        self.log.debug("command queued for {name}", name=name)
