"""The dashboard: the page an operator opens first, at / on the HTTP port.

* ``/``: the page (``broker/web/static/index.html``);
* ``/dashboard/<file>``: its JavaScript modules, style sheet and icon;
* ``/dashboard/session``: a token's role and the transports on offer (JSON);
* on first run, a write token and the URL carrying it in the log (firstrun.py).

The page itself talks to the WebSocket at /ws and, when that cannot be
used, long-polls /api/v1/changes (docs/dashboard.md).
"""

from __future__ import annotations

from twisted.internet import defer

from .files import load_files
from .firstrun import FirstRunToken, is_secure_endpoint, url_of_address
from .resource import AssetsResource, FileResource
from .session import SessionResource

__all__ = ["attach_dashboard", "dashboard_resources"]

PAGE = "index.html"


def dashboard_resources(registry, config, files=None):
    """(resource for /, resource for /dashboard) over the static files.

    ``config`` is a callable returning the broker's current Config.
    """
    files = load_files() if files is None else files
    page = FileResource(files[PAGE])
    assets = AssetsResource({name: file for name, file in files.items() if name != PAGE})
    assets.putChild(b"session", SessionResource(registry, config))
    return page, assets


def attach_dashboard(broker) -> None:
    """Serve the dashboard at / on broker.root and add the first-run token service."""
    page, assets = dashboard_resources(broker.registry, lambda: broker.config)
    broker.root.putChild(b"", page)
    broker.root.putChild(b"dashboard", assets)

    def base_url():
        http = broker.config.http
        if http.public_url:
            return defer.succeed(http.public_url)
        from broker.listeners import when_listening
        listening = when_listening(broker.getServiceNamed("http"))
        # None: the listener stopped before it was ever bound, so there is nobody to tell.
        return listening.addCallback(
            lambda port: None if port is None else
            url_of_address(port.getHost(), is_secure_endpoint(http.endpoint)) or "")

    FirstRunToken(broker.registry, base_url, broker.reactor,
                  warnings_shown=lambda: broker.log_control.level in ("debug", "info", "warn")
                  ).setServiceParent(broker)
