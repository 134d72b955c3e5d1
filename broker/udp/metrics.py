"""Copy the endpoint's plain counters into the broker's Prometheus collectors.

The hot path only bumps integers in a ``collections.Counter`` (a
prometheus-client ``inc()`` takes a lock, too dear per datagram); once a
second the deltas go to the collectors of ``broker.metrics.Metrics`` (the
registry bridge's refused reports too), and the smoothed RTTs the session
table sampled are observed.
"""

from __future__ import annotations

from broker.metrics import SESSION_EVENTS

_COUNTERS = {
    "datagrams_in": "datagrams_in",
    "datagrams_out": "datagrams_out",
    "sessions_started": "new_sessions",
    "roams": "roams",
    "retransmissions": "retransmissions",
}


class EndpointMetrics:
    """Moves counter deltas of one SSPEndpoint into a Metrics object."""

    def __init__(self, endpoint, metrics) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self._seen: dict = {}
        self._seen_drops: dict = {}
        self._seen_refused: dict = {}

    def update(self, kernel_errors=None) -> None:
        """Bring the collectors up to date (called once a second)."""
        endpoint, metrics = self.endpoint, self.metrics
        counters = endpoint.counters
        for key, attribute in _COUNTERS.items():
            value = counters.get(key, 0)
            delta = value - self._seen.get(key, 0)
            if delta > 0:
                getattr(metrics, attribute).inc(delta)
                self._seen[key] = value
        for event in SESSION_EVENTS:
            value = counters.get(event, 0)
            delta = value - self._seen.get(event, 0)
            if delta > 0:
                metrics.session_events.labels(event=event).inc(delta)
                self._seen[event] = value
        for reason, value in list(endpoint.drops.items()):
            delta = value - self._seen_drops.get(reason, 0)
            if delta > 0:
                metrics.datagrams_dropped.labels(reason=str(reason)).inc(delta)
                self._seen_drops[reason] = value
        for code, value in list(endpoint.bridge.refused.items()):
            delta = value - self._seen_refused.get(code, 0)
            if delta > 0:
                metrics.reports_refused.labels(code=code).inc(delta)
                self._seen_refused[code] = value
        samples = endpoint.table.rtt_samples
        if samples:
            observe = metrics.rtt_seconds.observe
            for srtt in samples:
                observe(srtt)
            samples.clear()
        metrics.ssp_sessions.set(len(endpoint))
        if kernel_errors is not None:
            errors = kernel_errors()
            if errors is not None:
                metrics.kernel_receive_errors.set(errors)
