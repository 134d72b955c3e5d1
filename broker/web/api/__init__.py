"""The REST API and the HTTP polling fallback under /api/v1/ (see docs/http-api.md).

`attach_api(broker)` builds the shared parts (waiting room, HTTP presence of
devices, rate limiter, origin policy), mounts the resource at /api, adds the
child service "api" that starts and stops them, and a reloader that applies
new limits on SIGHUP. Answers are counted by status by the broker's Site.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web import server

from broker.config import ConfigError
from broker.web.commands import CommandSender
from broker.web.origins import OriginPolicy

from .bodylimit import limit_bodies
from .idempotency import IdempotencyKeys
from .presence import HTTPPresence
from .ratelimit import RateLimiter
from .resource import ApiResource
from .settings import ApiSettings, from_config
from .waiting import WaitingRoom

__all__ = ["Api", "ApiService", "ApiSettings", "attach_api", "build_api"]


class Api:
    """The parts every endpoint shares."""

    log = Logger()

    def __init__(self, registry, clock, settings: ApiSettings, metrics=None,
                 request_factory=None, ssp_endpoint=None) -> None:
        self.registry = registry
        #: queues commands on SSP sessions (refuses them all without an SSP endpoint).
        self.commands = CommandSender(registry, ssp_endpoint, relay=False)
        self.clock = clock
        self.settings = settings
        self.origins = OriginPolicy.from_settings(settings.allowed_origins, settings.public_url)
        self.limiter = RateLimiter(settings.max_requests_per_second, clock)
        self.presence = HTTPPresence(registry, clock, settings.offline_after)
        #: recent Idempotency-Keys of writes: a retry is answered, not applied again.
        self.idempotency = IdempotencyKeys(clock)
        self.resource = ApiResource(self)
        #: the Site's request class, if it is ours (its body limit follows reloads).
        self.request_factory = request_factory
        self.room = WaitingRoom(registry, clock, settings, self.resource.respond,
                                presence=self.presence,
                                gauge=metrics.longpoll_waiters if metrics is not None else None)

    def start(self) -> None:
        self.room.start()

    def stop(self) -> None:
        self.room.stop()
        self.presence.stop()

    def apply(self, settings: ApiSettings) -> None:
        """Use new limits from now on; waiting requests keep the deadlines they have."""
        self.origins = OriginPolicy.from_settings(settings.allowed_origins, settings.public_url)
        if settings.max_requests_per_second != self.settings.max_requests_per_second:
            self.limiter = RateLimiter(settings.max_requests_per_second, self.clock)
        self.presence.offline_after = settings.offline_after
        if self.request_factory is not None:
            self.request_factory.max_body = settings.max_request_bytes
        self.room.apply(settings)
        self.settings = settings

    def reload(self, config) -> None:
        """A broker reloader: the [polling] and [http] limits of a re-read config."""
        try:
            self.apply(from_config(config))
        except ValueError as problem:
            self.log.error("reload: API settings refused, the running ones stay: {problem}",
                           problem=str(problem))


class ApiService(Service):
    """Starts the API's registry subscription; on stop, answers every waiting request."""

    name = "api"

    def __init__(self, api: Api) -> None:
        self.api = api

    def startService(self) -> None:
        super().startService()
        self.api.start()

    def stopService(self):
        super().stopService()
        self.api.stop()


def build_api(registry, clock, settings: ApiSettings | None = None, metrics=None,
              request_factory=None, ssp_endpoint=None) -> Api:
    """An Api over a registry (tests mount api.resource on a Site of their own)."""
    return Api(registry, clock, settings or ApiSettings(), metrics, request_factory,
               ssp_endpoint)


def attach_api(broker) -> None:
    """Mount /api on broker.root, add the "api" child service and its reloader.

    Commands go through ``broker.ssp_endpoint``, so attach_udp runs first.
    """
    settings = from_config(broker.config)
    factory = None
    if broker.site.requestFactory is server.Request:
        # Bodies over [http] max_request_bytes are answered 413 at once, never read.
        factory = limit_bodies(broker.site, settings.max_request_bytes)
    try:
        api = build_api(broker.registry, broker.reactor, settings, broker.metrics, factory,
                        getattr(broker, "ssp_endpoint", None))
    except ValueError as problem:
        raise ConfigError(f"{broker.config.source}: http.allowed_origins: {problem}") from None
    broker.api = api
    broker.root.putChild(b"api", api.resource)
    ApiService(api).setServiceParent(broker)
    broker.reloaders.append(api.reload)
