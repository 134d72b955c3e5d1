"""Liveness (/healthz) and readiness (/readyz) for load balancers and systemd."""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource

from broker import __version__
from broker.web.responses import json_body

ReadinessCheck = Callable[[], "str | None"]
"""Returns None when its part is ready, else the reason it is not."""


class HealthResource(Resource):
    """Answers 200 as long as the reactor runs: the process is alive."""

    isLeaf = True

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self._clock = clock
        self._started = clock.seconds()

    def render_GET(self, request):
        uptime = round(self._clock.seconds() - self._started, 3)
        return json_body(request, {"status": "ok", "version": __version__, "uptime": uptime})


class ReadinessResource(Resource):
    """Answers 200 when every check passes, else 503 with the reasons."""

    isLeaf = True

    def __init__(self, checks: Iterable[ReadinessCheck] = ()) -> None:
        super().__init__()
        self.checks = list(checks)

    def render_GET(self, request):
        reasons = [reason for reason in (check() for check in self.checks) if reason]
        if reasons:
            return json_body(request, {"status": "not ready", "reasons": reasons}, 503)
        return json_body(request, {"status": "ready"})
