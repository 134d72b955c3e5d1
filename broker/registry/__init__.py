"""The device-state registry (shadow) shared by every endpoint.

``open_registry(data_dir)`` gives a DeviceRegistry over the SQLite store;
tests use ``DeviceRegistry(MemoryStore(), clock=Clock())``.
"""

from . import errors, speedups  # (speedups: installs the compiled paths, where built)
from .model import (ChangeBatch, DeviceView, Provisioned, SessionRecord,
                    TokenInfo, UpdateResult)
from .registry import DeviceRegistry
from .settings import RegistrySettings
from .store import MemoryStore, Store


def open_registry(data_dir, *, clock=None, settings=None, reactor=None, **kwargs):
    """A DeviceRegistry over the SQLite store in ``data_dir`` (created private if missing).

    ``reactor`` (default: the global one) runs the writer thread's
    callbacks and must be a real reactor; ``clock`` (default: the reactor)
    gives time. Raises StoreError (clear message) on a damaged or foreign
    database.
    """
    from .sqlite_store import SQLiteStore
    if reactor is None:
        from twisted.internet import reactor
    if clock is None:
        clock = reactor
    settings = settings or RegistrySettings()
    store = SQLiteStore.in_directory(data_dir, reactor=reactor, settings=settings, clock=clock)
    try:
        return DeviceRegistry(store, clock=clock, settings=settings, **kwargs)
    except BaseException:
        store.close()
        raise


__all__ = ["ChangeBatch", "DeviceRegistry", "DeviceView", "MemoryStore",
           "Provisioned", "RegistrySettings", "SessionRecord", "Store",
           "TokenInfo", "UpdateResult", "errors", "open_registry", "speedups"]
