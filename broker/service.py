"""Build the broker's MultiService from a validated Config.

Each endpoint is a child service with a name, so that tests and operators
can find it (`service.getServiceNamed("udp")`), and nothing binds a port
until the service starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application import internet, strports
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from broker.config import Config
from broker.metrics import Metrics
from broker.udp.endpoint import SSPEndpoint
from broker.web.health import HealthResource, ReadinessResource

log = Logger()


def ensure_private_directory(path: Path) -> Path:
    """Create path with mode 0700 if it is missing; refuse one that others can read."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


class BrokerService(MultiService):
    """The whole broker: its parts are named child services."""

    def __init__(self, config: Config, reactor=None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811 - the global one, only when none is given
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.data_dir = ensure_private_directory(config.data_path)
        self.root = Resource()
        self.readiness = ReadinessResource()
        self.root.putChild(b"healthz", HealthResource(reactor))
        self.root.putChild(b"readyz", self.readiness)
        self.site = Site(self.root)
        self._add_udp()
        http = strports.service(config.http.endpoint, self.site, reactor=reactor)
        http.setName("http")
        http.setServiceParent(self)

    def _add_udp(self) -> None:
        settings = self.config.ssp
        if not settings.enabled:
            return
        self.ssp_endpoint = SSPEndpoint()
        udp = internet.UDPServer(settings.port, self.ssp_endpoint, interface=settings.host,
                                 reactor=self.reactor)
        udp.setName("udp")
        udp.setServiceParent(self)


def make_service(config: Config, reactor=None) -> BrokerService:
    """The broker service for config (nothing is bound until it starts)."""
    return BrokerService(config, reactor)
