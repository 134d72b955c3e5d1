"""A store for benchmarks that measure the broker process, not storage."""

from twisted.internet import defer

from broker.registry.store import Loaded, Store


class NullStore(Store):
    """Acknowledges every write at once and keeps nothing: memory figures are
    then the registry's and the endpoint's, not a store's (nor SQLite's cache)."""

    def load(self):
        return Loaded()

    def write(self, op, result=None):
        return defer.succeed(result)

    def barrier(self, result=None):
        return defer.succeed(result)
