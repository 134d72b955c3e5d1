"""Shared fixtures for registry tests."""

from twisted.internet.task import Clock

from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings

START = 1_700_000_000.0


def make_registry(store=None, **settings):
    """A registry over a MemoryStore with a Clock at START."""
    clock = Clock()
    clock.advance(START)
    store = store if store is not None else MemoryStore()
    registry = DeviceRegistry(store, clock=clock, settings=RegistrySettings(**settings))
    return registry, store, clock



def admin_call(data_dir, method, *args):
    """One broker-admin change (AdminDatabase ``method``) on data_dir, as its own process would."""
    from broker.registry.admin import AdminDatabase
    admin = AdminDatabase(data_dir)
    try:
        return getattr(admin, method)(*args)
    finally:
        admin.close()
