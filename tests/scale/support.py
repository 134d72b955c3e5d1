"""Helpers of the scale tests: shared registries on real Redis, bounded waits."""

from __future__ import annotations

import os
import time

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from broker.registry import RegistrySettings
from broker.registry.redis_connection import RedisOptions
from broker.registry.shared import open_shared_registry

from .redis_support import start_cluster, start_single

DEADLINE = 20.0


@defer.inlineCallbacks
def wait_until(testcase, predicate, timeout=DEADLINE, what="condition"):
    """Poll predicate every 10 ms on the real reactor until true, or fail the test."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            testcase.fail(f"timed out after {timeout} s waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


class SingleRedis:
    """Mixin: the tests run against one Redis server."""

    cluster = False

    def start_redis(self):
        return start_single(self)


class ClusterRedis:
    """Mixin: the tests run against a three-node Redis Cluster."""

    cluster = True

    def start_redis(self):
        url, self.cluster_ports = start_cluster(self)
        return url


def redis_options(testcase, url, **changes):
    return RedisOptions(url=url, cluster=testcase.cluster, **changes)


def open_registry_on(testcase, url, **settings):
    """A started SharedRegistry on the real reactor, stopped at cleanup."""
    registry = open_shared_registry(redis_options(testcase, url), reactor=reactor,
                                    settings=RegistrySettings(**settings))
    registry.start()
    testcase.addCleanup(registry.stop)
    return registry


class TwoRegistries:
    """Mixin (before SingleRedis or ClusterRedis): registries ``a`` and ``b``, standing
    for two broker processes, on the test's Redis."""

    timeout = 60

    def setUp(self):
        self.url = self.start_redis()
        self.a = open_registry_on(self, self.url)
        self.b = open_registry_on(self, self.url)


@defer.inlineCallbacks
def start_two_brokers(testcase):
    """Brokers A and B sharing the test's Redis (testcase.start_redis(), testcase.cluster).

    Sets testcase.a / testcase.b (RunningBroker) and testcase.ra / testcase.rb
    (their registries).
    """
    from tests.helpers import loopback_config, start_broker

    url = testcase.start_redis()
    registry = {"backend": "redis", "redis_url": url, "redis_cluster": testcase.cluster}
    testcase.a = yield start_broker(testcase, loopback_config(testcase, registry=registry))
    testcase.b = yield start_broker(testcase, loopback_config(testcase, registry=registry))
    testcase.ra = testcase.a.service.registry
    testcase.rb = testcase.b.service.registry


def write_worker_config(testcase, url, workers, ssp="", registry=""):
    """A broker config file on loopback with the Redis registry at ``url`` and
    ``workers`` processes; ``ssp`` and ``registry`` add lines to their sections."""
    path = os.path.abspath(testcase.mktemp() + ".toml")
    with open(path, "w") as handle:
        handle.write(f"""
[broker]
data_dir = "{os.path.abspath(testcase.mktemp())}"
workers = {workers}
stop_timeout = 2.0
[log]
level = "warn"
[http]
endpoint = "tcp:0:interface=127.0.0.1"
[ssp]
host = "127.0.0.1"
port = 0
{ssp}
[registry]
backend = "redis"
redis_url = "{url}"
{registry}
""")
    return path


def capture_critical(testcase) -> list:
    """The critical log lines emitted from now until the test ends, as text."""
    lines = []

    def observe(event):
        if event.get("log_level") == LogLevel.critical:
            lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines
