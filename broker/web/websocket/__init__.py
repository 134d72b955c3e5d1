"""The dashboard WebSocket endpoint at /ws (protocol: docs/websocket.md).

Dashboards subscribe to devices by name or glob, get a snapshot and then
one update per change, resume from a cursor after a reconnect, and write
desired state. Served by Autobahn inside the HTTP port's twisted.web Site,
so one port (plain or TLS) carries HTTP and WebSocket.
"""

from __future__ import annotations

from broker.config import ConfigError

from .endpoint import DashboardFactory, WebSocketService
from .messages import SUBPROTOCOL
from .resource import DashboardResource

__all__ = ["DashboardFactory", "SUBPROTOCOL", "WebSocketService", "attach_websocket"]


def attach_websocket(broker) -> None:
    """Put the WebSocket resource at /ws of broker.root and its service under broker.

    The factory is kept as ``broker.websocket_factory`` (clients, counters);
    a reload (SIGHUP) applies the new limits to connections opened after it.
    A setting the endpoint cannot use (an allowed origin that is no origin,
    a ping time below Autobahn's timer resolution) stops startup with a
    ConfigError naming it.
    """
    try:
        factory = DashboardFactory.from_config(broker)
    except ValueError as problem:
        raise ConfigError(f"{broker.config.source}: {problem}") from None
    broker.websocket_factory = factory
    broker.root.putChild(b"ws", DashboardResource(factory))
    service = WebSocketService(factory)
    service.setServiceParent(broker)
    broker.reloaders.append(service.reload)
