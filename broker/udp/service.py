"""Attach the UDP SSP endpoint to a BrokerService as its child service "udp"."""

from __future__ import annotations

import socket
import time

from twisted.application import internet
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from broker.udp.endpoint import SSPEndpoint
from broker.udp.kernel import set_receive_buffer, udp_receive_buffer_errors
from broker.udp.metrics import EndpointMetrics

#: How often plain counters are copied into the Prometheus collectors (s).
METRICS_INTERVAL = 1.0
#: Largest datagram read (no SSP datagram exceeds 1252 bytes; room for garbage to be counted).
MAX_PACKET_SIZE = 2048


class UDPService(internet.UDPServer):
    """The SSP port: binds on start (IPv4 or IPv6 by the host setting, or the
    socket systemd passed), sets SO_RCVBUF, and copies the endpoint's
    counters into the metrics once a second."""

    log = Logger()

    def __init__(self, endpoint: SSPEndpoint, settings, *, metrics=None, reactor=None,
                 activation=None) -> None:
        super().__init__(settings.port, endpoint, interface=settings.host, reactor=reactor)
        self.endpoint = endpoint
        self.settings = settings
        self.activation = activation
        self.receive_buffer = None
        self._metrics = EndpointMetrics(endpoint, metrics) if metrics is not None else None
        self._loop = None

    def _getPort(self):
        """The listening port: adopted from systemd when it passed one, else bound here."""
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        if self.activation is None:
            return reactor.listenUDP(self.settings.port, self.endpoint,
                                     interface=self.settings.host,
                                     maxPacketSize=MAX_PACKET_SIZE)
        from broker.systemd import listen_udp
        return listen_udp(reactor, self.activation, self.endpoint, port=self.settings.port,
                          interface=self.settings.host, max_packet_size=MAX_PACKET_SIZE)

    def startService(self) -> None:
        super().startService()
        sock = getattr(self._port, "socket", None)
        if isinstance(sock, socket.socket):
            self.receive_buffer = set_receive_buffer(sock, self.settings.receive_buffer_bytes)
        host = self._port.getHost()
        self.log.info("SSP endpoint on UDP {host}:{port} (receive buffer {size} bytes)",
                      host=host.host, port=host.port, size=self.receive_buffer)
        if self._metrics is not None:
            self._loop = LoopingCall(self._metrics.update, udp_receive_buffer_errors)
            if self.reactor is not None:
                self._loop.clock = self.reactor
            self._loop.start(METRICS_INTERVAL, now=True)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def reload(self, config) -> None:
        """SIGHUP: new limits and timings apply at once (new sessions get the new timings)."""
        self.settings = config.ssp
        self.endpoint.reconfigure(config.ssp)


def attach_udp(broker) -> None:
    """Add the UDP listener for SSP as the child service named "udp".

    Its settings are the config's [ssp] section (limits, timings,
    park_after, auth_failure_budget, facts_interval); a SIGHUP reload
    applies the new ones.
    """
    settings = broker.config.ssp
    endpoint = SSPEndpoint(broker.registry, settings, clock=broker.reactor,
                           now=time.monotonic)
    broker.ssp_endpoint = endpoint
    udp = UDPService(endpoint, settings, metrics=broker.metrics, reactor=broker.reactor,
                     activation=broker.activation)
    udp.setName("udp")
    udp.setServiceParent(broker)
    broker.reloaders.append(udp.reload)
