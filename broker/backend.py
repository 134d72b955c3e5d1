"""The device registry on the backend the [registry] section names, run as a child service.

One place turns the config into a DeviceRegistry (memory, SQLite in the
data directory, or shared Redis), and the admin CLI reaches Redis through
the same redis_options. The files the Redis client will read are checked
here, before connecting, so an unreadable one is a ConfigError naming its
setting rather than a failure deep inside the client.
"""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer

from broker.config import Config, ConfigError
from broker.metrics import InstrumentedStore, Metrics
from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings

#: [registry] settings naming files the Redis client reads when it connects.
REDIS_FILES = ("redis_password_file", "redis_tls_ca_file", "redis_tls_cert_file",
               "redis_tls_key_file")


def registry_settings(config: Config) -> RegistrySettings:
    """The registry's own settings from the [registry] section."""
    section = config.registry
    return RegistrySettings(history_size=section.history_size,
                            history_bytes=section.history_bytes,
                            max_state_bytes=section.max_state_bytes,
                            feed_retention=section.feed_retention)


def check_readable_files(config: Config, section: str, keys) -> None:
    """Raise ConfigError naming the first key whose file cannot be read (empty: not used)."""
    settings = getattr(config, section)
    for key in keys:
        path = getattr(settings, key)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except (OSError, ValueError) as problem:
            # ValueError: a NUL in the path (the config refuses one; a caller's Config may not).
            reason = getattr(problem, "strerror", None) or problem
            raise ConfigError(f"{config.source}: {section}.{key}: cannot read {path!r}: "
                              f"{reason}") from None


def redis_options(config: Config):
    """How to reach Redis, from the [registry] redis_* settings (ConfigError: a file is unreadable)."""
    from broker.registry.redis_store import RedisOptions
    check_readable_files(config, "registry", REDIS_FILES)
    return RedisOptions.of(config.registry)


def open_configured_registry(config: Config, data_dir: Path, reactor,
                             metrics: Metrics | None = None) -> DeviceRegistry:
    """The registry over the configured backend (raises StoreError on a bad database).

    With metrics, the store is wrapped so that commits are counted and timed.
    """
    settings = registry_settings(config)
    if config.registry.backend == "redis":
        from broker.registry.shared import open_shared_registry
        wrapper = None if metrics is None else (lambda store: InstrumentedStore(store, metrics))
        return open_shared_registry(redis_options(config), reactor=reactor, settings=settings,
                                    store_wrapper=wrapper,
                                    lease_ttl=config.registry.redis_lease_ttl,
                                    lease_check_interval=config.registry.redis_lease_check_interval,
                                    sequence_check_interval=(
                                        config.registry.redis_sequence_check_interval),
                                    data_dir=data_dir)
    if config.registry.backend == "memory":
        store = MemoryStore()
    else:
        from broker.registry.sqlite_store import SQLiteStore
        store = SQLiteStore.in_directory(data_dir, reactor=reactor, settings=settings)
    try:
        wrapped = store if metrics is None else InstrumentedStore(store, metrics)
        return DeviceRegistry(wrapped, clock=reactor, settings=settings)
    except BaseException:
        store.close()
        raise


class RegistryService(Service):
    """Runs the registry's background work; stopping it commits what is pending."""

    name = "registry"

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    def startService(self) -> None:
        super().startService()
        self.registry.start()

    def stopService(self):
        super().stopService()
        return defer.maybeDeferred(self.registry.stop)
