"""Every figure the broker exports, on a CollectorRegistry of its own.

One `Metrics` object is made per broker and handed to each component, so that
tests build as many brokers as they like without clashing in prometheus-client's
global registry. Components only ever increment, set or observe; the
`/metrics` resource (broker.web.metrics) renders the registry in the
Prometheus text format.

Registry-level figures cost next to nothing between scrapes: the gauges
read the registry when scraped (`watch_registry`), and `InstrumentedStore`
counts writes in plain integers and times one commit in SAMPLE_EVERY.
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from broker import __version__
from broker.registry import speedups as registry_speedups
from broker.ssp import speedups

__all__ = ["Metrics", "InstrumentedStore", "CONTENT_TYPE_LATEST"]

_RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: one store write in this many has its commit time measured (a Deferred callback each).
SAMPLE_EVERY = 16
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


#: the SSP endpoint's counters exported as broker_ssp_session_events_total{event}.
SESSION_EVENTS = ("sessions_resumed", "sessions_on_probation", "sessions_verified",
                  "datagrams_withheld", "probes_sent", "marks_at_park")


class Metrics:
    """The broker's collectors, grouped by the component that moves them."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._commands = None        # watch_commands

        # Process: memory, CPU, open descriptors (a socket per HTTP client counts).
        ProcessCollector(namespace="broker", registry=registry)
        self.build_info = Gauge("broker_build_info",
                                "Always 1; the version, the SSP receive path "
                                "(compiled or python), the datagrams' cipher "
                                "library (openssl or cryptography) and the "
                                "registry's history and row encoding (compiled "
                                "or python) as labels.",
                                ["version", "ssp_receive", "ssp_cipher", "registry_encode"],
                                registry=registry)
        receive = "python" if speedups.fast_receive is None else "compiled"
        self.build_info.labels(
            version=__version__, ssp_receive=receive, ssp_cipher=speedups.cipher_library,
            registry_encode="compiled" if registry_speedups.compiled else "python").set(1)
        self.reloads = Counter("broker_config_reloads", "SIGHUP reloads, by outcome.",
                               ["outcome"], registry=registry)
        for outcome in ("applied", "refused", "failed"):
            # Exported as 0 from the start: increase() misses a series' first sample.
            self.reloads.labels(outcome=outcome)

        # Registry.
        self.devices_known = Gauge("broker_devices_known", "Devices provisioned.", registry=registry)
        self.devices_online = Gauge("broker_devices_online", "Devices heard within offline_after.",
                                    registry=registry)
        #: durable writes by kind and their commit times (broker_registry_updates_total,
        #: broker_registry_commit_seconds), counted in plain numbers by InstrumentedStore.
        self.commits = CommitFigures(_COMMIT_BUCKETS)
        registry.register(self.commits)
        self.feed_cursor = Gauge("broker_feed_cursor", "The global change sequence.",
                                 registry=registry)

        # UDP SSP endpoint.
        self.ssp_sessions = Gauge("broker_ssp_sessions", "SSP sessions held in memory, live and parked.", registry=registry)
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
        self.session_events = Counter("broker_ssp_session_events",
                                      "Resumes after a restart and what guards them against "
                                      "replays, by event.", ["event"], registry=registry)
        for event in SESSION_EVENTS:
            self.session_events.labels(event=event)
        self.reports_refused = Counter("broker_ssp_reports_refused",
                                       "Device reports the registry refused (acknowledged all "
                                       "the same, or the device would resend them forever), "
                                       "by error code.", ["code"], registry=registry)
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

    def watch_registry(self, registry) -> None:
        """Make the device and feed gauges read a DeviceRegistry when scraped,
        and export its event counters (``registry.counters``) the same way."""
        self.devices_known.set_function(registry.__len__)
        self.feed_cursor.set_function(lambda: registry.cursor)
        self.devices_online.set_function(lambda: registry.online_count)
        self.registry.register(PlainCounters(
            "broker_registry_events", "Registry events by name (docs/operations.md, "
            "docs/scaling.md).", "event", registry.counters))

    def watch_commands(self, via: str, counters) -> None:
        """Export the outcomes a CommandSender counts (``counters``) for the
        endpoint ``via`` (http, websocket) as ``broker_commands_total``."""
        if self._commands is None:
            self._commands = PlainCounters(
                "broker_commands", "Commands for devices by endpoint and outcome "
                "(docs/operations.md).", "outcome", by="via")
            self.registry.register(self._commands)
        self._commands.sources[via] = counters


class PlainCounters:
    """A counter family read from plain ``collections.Counter`` objects when
    scraped: the hot paths count with a dict increment, not a
    prometheus-client Counter.  ``sources``: label value of ``by`` ->
    Counter (none: one Counter, no such label); each key is the ``label``."""

    def __init__(self, name: str, documentation: str, label: str, counters=None, *,
                 by: str | None = None) -> None:
        self.name, self.documentation, self.label, self.by = name, documentation, label, by
        self.sources = {} if counters is None else {None: counters}

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        for source, counters in sorted(self.sources.items(), key=lambda item: item[0] or ""):
            for key, count in sorted(counters.items()):
                family.add_metric([key] if self.by is None else [source, key], count)
        return [family]

    def _family(self):
        labels = [self.label] if self.by is None else [self.by, self.label]
        return CounterMetricFamily(self.name, self.documentation, labels=labels)


class CommitFigures:
    """Writes to the store by kind, and a histogram of sampled commit times.

    Plain numbers on the write path, turned into metric families when
    scraped: a prometheus-client Counter and Histogram cost about 6 us per
    write (locks, label lookups), more than the in-memory write itself.
    """

    def __init__(self, buckets) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.seconds = 0.0
        self.kinds = collections.Counter()

    def commit_time(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.seconds += seconds

    def describe(self):
        return list(self._families(False))

    def collect(self):
        return list(self._families(True))

    def _families(self, with_values):
        updates = CounterMetricFamily("broker_registry_updates", "Writes given to the store "
                                      "(made durable by its next commit), by kind.",
                                      labels=["kind"])
        cumulative, buckets = 0, []
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        if with_values:
            for kind, count in sorted(self.kinds.items()):
                updates.add_metric([kind], count)
        commits = HistogramMetricFamily(
            "broker_registry_commit_seconds",
            f"Time from a write to its durable commit (one write in {SAMPLE_EVERY} timed).",
            buckets=buckets if with_values else None,
            sum_value=self.seconds if with_values else None)
        return updates, commits


class InstrumentedStore:
    """A registry Store that counts writes by kind and times a sample of commits.

    Wraps any backend (broker.registry.store.Store); the registry cannot
    tell it from the store inside. The time is from `write()` to the Deferred
    firing, i.e. what a device or dashboard waits for its acknowledgement.
    """

    def __init__(self, store, metrics: Metrics, clock=time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._figures = metrics.commits
        self._kinds = metrics.commits.kinds
        self._writes = 0

    def __getattr__(self, name):
        # Backend extras (path, commits, hold/release of the memory store).
        return getattr(self.store, name)

    def load(self):
        return self.store.load()

    def write(self, op, result=None):
        return self._counted(op[0], self.store.write(op, result))

    def write_state(self, dev, token=None):
        """The registry's hot path (a store may queue the device itself): a "state" write."""
        return self._counted("state", self.store.write_state(dev, token))

    def write_states(self, devs, result=None):
        """A batch of device states in one commit: counted per device, timed as one write."""
        return self._counted("state", self.store.write_states(devs, result), len(devs))

    def write_sessions(self, numbers, records, result=None):
        """Several devices' session records in one commit: counted per record."""
        return self._counted("session", self.store.write_sessions(numbers, records, result),
                             len(records))

    def _counted(self, kind: str, d, count: int = 1):
        self._kinds[kind] += count
        self._writes += 1
        if not self._writes % SAMPLE_EVERY:
            d.addCallback(self._durable, self._clock())
        return d

    def _durable(self, result, started):
        self._figures.commit_time(self._clock() - started)
        return result

    def barrier(self, result=None):
        return self.store.barrier(result)

    def admin_changes(self, after):
        return self.store.admin_changes(after)

    def fetch_device(self, number):
        return self.store.fetch_device(number)

    def fetch_tokens(self):
        return self.store.fetch_tokens()

    def close(self):
        return self.store.close()
