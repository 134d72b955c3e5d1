"""Every figure the broker exports, on a CollectorRegistry of its own.

One `Metrics` object is made per broker and handed to each component, so that
tests build as many brokers as they like without clashing in prometheus-client's
global registry. Components only ever increment, set or observe; the
`/metrics` resource renders the registry in the Prometheus text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The broker's collectors, grouped by the component that moves them."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)

        # Registry.
        self.devices_known = Gauge("broker_devices_known", "Devices provisioned.", registry=registry)
        self.devices_online = Gauge("broker_devices_online", "Devices heard within offline_after.",
                                    registry=registry)
        self.registry_updates = Counter("broker_registry_updates", "State updates made durable.",
                                        ["kind"], registry=registry)
        self.registry_rejected = Counter("broker_registry_rejected", "State updates refused.",
                                         ["code"], registry=registry)
        self.commit_seconds = Histogram("broker_registry_commit_seconds",
                                        "Time from a write to its durable commit.",
                                        buckets=_COMMIT_BUCKETS, registry=registry)
        self.feed_cursor = Gauge("broker_feed_cursor", "The global change sequence.",
                                 registry=registry)

        # UDP SSP endpoint.
        self.ssp_sessions = Gauge("broker_ssp_sessions", "Live SSP sessions.", registry=registry)
        self.datagrams_in = Counter("broker_ssp_datagrams_received", "UDP datagrams received.",
                                    registry=registry)
        self.datagrams_out = Counter("broker_ssp_datagrams_sent", "UDP datagrams sent.",
                                     registry=registry)
        self.datagrams_dropped = Counter("broker_ssp_datagrams_dropped",
                                         "Datagrams dropped, by reason.", ["reason"],
                                         registry=registry)
        self.new_sessions = Counter("broker_ssp_new_sessions", "SSP sessions started.",
                                    registry=registry)
        self.roams = Counter("broker_ssp_roams", "Sessions that moved to a new address.",
                             registry=registry)
        self.retransmissions = Counter("broker_ssp_retransmissions",
                                       "States sent again for want of an ack.", registry=registry)
        self.rtt_seconds = Histogram("broker_ssp_rtt_seconds", "Smoothed RTT of SSP sessions.",
                                     buckets=_RTT_BUCKETS, registry=registry)
        self.kernel_receive_errors = Gauge("broker_udp_kernel_receive_buffer_errors",
                                           "UDP datagrams the kernel dropped for a full "
                                           "receive buffer (RcvbufErrors, host-wide).",
                                           registry=registry)

        # WebSocket and HTTP.
        self.websocket_clients = Gauge("broker_websocket_clients", "Open WebSocket clients.",
                                       registry=registry)
        self.websocket_messages = Counter("broker_websocket_messages", "WebSocket messages.",
                                          ["direction"], registry=registry)
        self.longpoll_waiters = Gauge("broker_longpoll_waiters", "Long polls waiting.",
                                      registry=registry)
        self.http_requests = Counter("broker_http_requests", "HTTP requests answered, by status.",
                                     ["status"], registry=registry)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
