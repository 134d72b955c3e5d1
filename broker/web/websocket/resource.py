"""/ws: hands an HTTP connection over to the WebSocket protocol.

Autobahn's own ``WebSocketResource`` gives its protocol whatever transport
the HTTP channel had. On the broker that is the Site's ConnectionTracker
wrapper (broker/web/site.py), which claims every interface of the TLS
transport beneath it without being one, and Autobahn's TLS code then
fails to open any wss:// connection. So the takeover is done here: the
wrapper keeps routing bytes (and keeps the connection tracked for a
graceful stop), while the protocol writes to, and flow-controls, the real
TCP or TLS transport under it. A request without a transport (HTTP/2)
gets a plain 426, not Autobahn's HTML page naming its version.
"""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.server import NOT_DONE_YET

from broker.web.responses import json_error


def _real_transport(transport):
    """The first transport under pass-through wrappers: TCP, or TLS (itself a wrapper)."""
    while isinstance(transport, ProtocolWrapper) and not isinstance(transport, TLSMemoryBIOProtocol):
        transport = transport.transport
    return transport


def _raw_request(request) -> bytes:
    """The opening handshake as bytes again, for Autobahn's own parser."""
    lines = [request.method + b" " + request.uri + b" HTTP/1.1"]
    for name, values in request.requestHeaders.getAllRawHeaders():
        lines.append(name + b": " + b",".join(values))
    return b"\r\n".join(lines) + b"\r\n\r\n" + request.content.read()


class DashboardResource(WebSocketResource):
    """The WebSocket endpoint inside the Site (one port for HTTP and WebSocket)."""

    def render(self, request):
        link = request.channel.transport
        if link is None:
            return json_error(request, 426, "upgrade_required",
                              "WebSocket needs HTTP/1.1 (this request came over HTTP/2)")
        transport = _real_transport(link)
        protocol = self._factory.buildProtocol(transport.getPeer())
        if protocol is None:
            return json_error(request, 503, "unavailable", "WebSocket endpoint unavailable")
        # From here on the connection belongs to the WebSocket protocol.
        request.channel.transport = None
        if isinstance(link, ProtocolWrapper):
            link.wrappedProtocol = protocol
        else:
            link.protocol = protocol
        protocol.makeConnection(transport)
        # twisted.web paused reading while it served the request: read again.
        link.resumeProducing()
        protocol.dataReceived(_raw_request(request))
        return NOT_DONE_YET
