"""Tunable limits of the device registry, one frozen dataclass.

The lead's ``broker/config.py`` builds this from the ``[registry]`` TOML
section; tests and tools construct it directly.
"""

from dataclasses import dataclass

from .history import HISTORY_BYTES


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """Limits and knobs of one DeviceRegistry (all sizes in bytes, times in seconds)."""

    #: changes kept per device in its history; 0 turns history off.
    history_size: int = 16
    #: bytes of history kept per device, each entry counted by its JSON, at
    #: least its stored size (history_entry.entry_weight): the oldest entries
    #: go first, an entry over a quarter of it is kept shortened
    #: (``"truncated": true``).
    history_bytes: int = HISTORY_BYTES
    #: encoded size limit of ``reported`` and of ``desired``, each.
    max_state_bytes: int = 8192
    #: longest key name (characters).
    max_key_length: int = 64
    #: most top-level keys in one map (reported or desired).
    max_keys: int = 256
    #: deepest nesting of arrays/maps in a value (a scalar has depth 0).
    max_depth: int = 4
    #: most items in one nested array or map.
    max_items: int = 64
    #: most events in one reported update.
    max_events: int = 64
    #: removed-device tombstones the feed keeps; a cursor older than the
    #: oldest dropped tombstone is answered with ``reset`` (take a snapshot).
    feed_retention: int = 100_000
    #: how often a running broker looks for devices/tokens changed by
    #: ``broker-admin`` in the shared database (0 disables the poll).
    reload_interval: float = 2.0
    #: SQLite ``synchronous`` pragma: FULL survives power loss, NORMAL only
    #: process crashes (kill -9).
    synchronous: str = "FULL"
    #: most writes one group commit carries.
    max_batch: int = 50_000

    def __post_init__(self):
        for name in ("history_size", "history_bytes", "max_state_bytes", "max_key_length",
                     "max_keys", "max_depth", "max_items", "max_events",
                     "feed_retention", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"registry setting {name} must be an integer >= 0, got {value!r}")
        if self.history_bytes < 4096:
            raise ValueError(f"registry setting history_bytes must be at least 4096 "
                             f"(a quarter of it holds one entry), got {self.history_bytes!r}")
        if self.max_key_length < 1 or self.max_state_bytes < 64 or self.max_batch < 1:
            raise ValueError("registry settings max_key_length >= 1, max_state_bytes >= 64, max_batch >= 1")
        if self.reload_interval < 0:
            raise ValueError("registry setting reload_interval must be >= 0")
        if self.synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("registry setting synchronous must be FULL, NORMAL or EXTRA")
