"""The HTTP port: REST API, long polling, WebSocket, dashboard, health and metrics."""
