"""Precise errors of the registry; each has a stable ``code`` for the wire."""


class RegistryError(Exception):
    """Base of every registry error: ``code`` (str) and a one-line message."""

    code = "registry_error"

    def __init__(self, message, *, token=None):
        super().__init__(message)
        self.message = message
        #: the request token of the failed write, echoed to its writer.
        self.token = token

    def to_json(self):
        """The error as the JSON object endpoints send."""
        body = {"error": self.code, "message": self.message}
        if self.token is not None:
            body["token"] = self.token
        return body


class UnknownDevice(RegistryError):
    """No device with this name (or number)."""

    code = "unknown_device"

    def __init__(self, name, *, token=None):
        super().__init__(f"unknown device {name!r}", token=token)
        self.name = name


class DeviceExists(RegistryError):
    """A device with this name already exists."""

    code = "device_exists"

    def __init__(self, name):
        super().__init__(f"device {name!r} already exists")
        self.name = name


class InvalidName(RegistryError):
    """A device name breaks the naming rule."""

    code = "invalid_name"


class VersionConflict(RegistryError):
    """The writer expected another version than the current one."""

    code = "version_conflict"

    def __init__(self, name, expected, current_version, *, token=None):
        super().__init__(
            f"device {name!r} is at version {current_version}, not {expected}",
            token=token)
        self.expected = expected
        self.current_version = current_version

    def to_json(self):
        body = super().to_json()
        body["current_version"] = self.current_version
        return body


class InvalidKey(RegistryError):
    """A key name is too long, empty or has characters outside the allowed set."""

    code = "invalid_key"


class InvalidValue(RegistryError):
    """A value has a type, depth, size or count the registry does not accept."""

    code = "invalid_value"


class StateTooLarge(RegistryError):
    """The state after the update would exceed ``max_state_bytes``."""

    code = "state_too_large"


class UnknownToken(RegistryError):
    """No access token with this id."""

    code = "unknown_token"


class StoreError(RegistryError):
    """The storage failed or holds something we must not touch (damaged or foreign database)."""

    code = "store_error"


class NotDurable(StoreError):
    """A change the store failed to write that is not lost: applied in memory (visible
    to every reader and subscriber) and kept by the store, or (Redis) kept to be sent
    again, until it lands; a crash before then loses it. Sending it again would apply
    it twice."""

    code = "not_durable"


class OutcomeUnknown(StoreError):
    """A write whose store call failed without telling whether the store applied it
    (Redis: the connection dropped or no reply came in time) and that is not sent
    again (an expected version is its writer's to check): it may or may not be
    applied, so neither "send it again" nor "do not" is safe to say. Read the
    device to tell."""

    code = "outcome_unknown"
