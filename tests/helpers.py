"""Shared test helpers: a broker on loopback with ephemeral ports, and plain HTTP calls."""

from __future__ import annotations

import json
from dataclasses import dataclass

import treq
from twisted.internet import defer, reactor
from twisted.web.client import HTTPConnectionPool

from broker.config import Config, load_config, replace


def loopback_config(testcase, **sections) -> Config:
    """The default config with a private data dir and ephemeral loopback ports.

    Keyword arguments are sections mapped to dicts of settings to change,
    e.g. loopback_config(self, polling={"max_wait": 1.0}).
    """
    config = load_config(None)
    config = replace(config, "broker", data_dir=testcase.mktemp())
    config = replace(config, "http", endpoint="tcp:0:interface=127.0.0.1")
    config = replace(config, "ssp", port=0)
    for section, changes in sections.items():
        config = replace(config, section, **changes)
    return config


@dataclass
class RunningBroker:
    """A started BrokerService and where to reach it."""

    service: object
    http_url: str
    udp_port: int | None


@defer.inlineCallbacks
def start_broker(testcase, config: Config):
    """Start a broker on the real reactor; it is stopped when the test ends."""
    from broker.service import make_service

    service = make_service(config, reactor=reactor)
    yield defer.maybeDeferred(service.startService)
    testcase.addCleanup(service.stopService)
    port = yield listening_port(service.getServiceNamed("http"))
    udp_port = None
    if config.ssp.enabled:
        udp_port = service.getServiceNamed("udp")._port.getHost().port
    return RunningBroker(service, f"http://127.0.0.1:{port.getHost().port}", udp_port)


def listening_port(endpoint_service) -> defer.Deferred:
    """The IListeningPort of a started StreamServerEndpointService, leaving its own result intact."""
    found = defer.Deferred()

    def share(port):
        found.callback(port)
        return port

    endpoint_service._waitingForPort.addCallback(share)
    return found


def http_pool(testcase) -> HTTPConnectionPool:
    """A connection pool that keeps no connection open after the test."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    return pool


@defer.inlineCallbacks
def http_json(testcase, method: str, url: str, body=None, headers=None):
    """(status, headers, decoded JSON or raw bytes) of one real HTTP request."""
    kwargs = {"pool": http_pool(testcase), "headers": headers or {}}
    if body is not None:
        kwargs["data"] = json.dumps(body).encode() if not isinstance(body, bytes) else body
        kwargs["headers"].setdefault(b"content-type", [b"application/json"])
    response = yield treq.request(method, url, **kwargs)
    content = yield response.content()
    try:
        decoded = json.loads(content)
    except ValueError:
        decoded = content
    return response.code, response.headers, decoded
