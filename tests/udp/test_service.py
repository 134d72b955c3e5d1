"""Tests for broker.udp.service and broker.udp.metrics: the "udp" child service and its figures."""

from collections import Counter

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.metrics import Metrics
from broker.udp.metrics import EndpointMetrics
from tests.helpers import loopback_config, start_broker


class FakeTable:
    def __init__(self):
        self.rtt_samples = []


class FakeBridge:
    def __init__(self):
        self.refused = Counter()


class FakeEndpoint:
    def __init__(self):
        self.counters = Counter()
        self.drops = Counter()
        self.table = FakeTable()
        self.bridge = FakeBridge()

    def __len__(self):
        return 7


class EndpointMetricsTests(SynchronousTestCase):
    """Plain counters reach the Prometheus collectors as deltas."""

    def test_deltas_copied(self):
        """Counters, drops by reason, sessions and kernel drops appear in the exposition."""
        endpoint, metrics = FakeEndpoint(), Metrics()
        copier = EndpointMetrics(endpoint, metrics)
        endpoint.counters.update(datagrams_in=5, datagrams_out=3, sessions_started=2)
        endpoint.drops["auth_failed"] = 4
        endpoint.bridge.refused["invalid_key"] = 1
        copier.update(lambda: 11)
        endpoint.counters["datagrams_in"] += 2
        endpoint.bridge.refused["invalid_key"] += 1
        copier.update(lambda: 12)
        text = metrics.render().decode()
        self.assertIn("broker_ssp_datagrams_received_total 7.0", text)
        self.assertIn("broker_ssp_datagrams_sent_total 3.0", text)
        self.assertIn('broker_ssp_datagrams_dropped_total{reason="auth_failed"} 4.0', text)
        self.assertIn('broker_ssp_reports_refused_total{code="invalid_key"} 2.0', text)
        self.assertIn("broker_ssp_sessions 7.0", text)
        self.assertIn("broker_udp_kernel_receive_buffer_errors 12.0", text)

    def test_rtt_and_retransmissions_copied(self):
        """Sampled RTTs go to the histogram once each; retransmissions to their counter."""
        endpoint, metrics = FakeEndpoint(), Metrics()
        copier = EndpointMetrics(endpoint, metrics)
        endpoint.table.rtt_samples.extend([0.004, 0.2])
        endpoint.counters["retransmissions"] = 3
        copier.update()
        copier.update()
        text = metrics.render().decode()
        self.assertEqual(endpoint.table.rtt_samples, [])
        self.assertIn("broker_ssp_rtt_seconds_count 2.0", text)
        self.assertIn('broker_ssp_rtt_seconds_bucket{le="0.005"} 1.0', text)
        self.assertIn("broker_ssp_retransmissions_total 3.0", text)


    def test_resume_guard_events_copied(self):
        """Resumes, probation, verification, withheld datagrams and park marks are
        exported by event, every event from the start (as 0)."""
        endpoint, metrics = FakeEndpoint(), Metrics()
        copier = EndpointMetrics(endpoint, metrics)
        copier.update()
        text = metrics.render().decode()
        self.assertIn('broker_ssp_session_events_total{event="datagrams_withheld"} 0.0', text)
        endpoint.counters.update(sessions_resumed=3, sessions_on_probation=2,
                                 sessions_verified=1, datagrams_withheld=5, marks_at_park=7)
        copier.update()
        endpoint.counters["marks_at_park"] += 1
        copier.update()
        text = metrics.render().decode()
        for event, value in (("sessions_resumed", 3), ("sessions_on_probation", 2),
                             ("sessions_verified", 1), ("datagrams_withheld", 5),
                             ("marks_at_park", 8)):
            self.assertIn(f'broker_ssp_session_events_total{{event="{event}"}} {value}.0', text)


class UDPServiceTests(TestCase):
    """attach_udp gives the broker a started "udp" child with a reload hook."""

    @defer.inlineCallbacks
    def test_service_and_reload(self):
        """The udp service listens on loopback with its receive buffer, takes its timings
        from the [ssp] config and applies a reload."""
        from broker.config import replace
        config = loopback_config(self, ssp={"park_after": 2.5, "auth_failure_budget": 3,
                                            "facts_interval": 0.25})
        broker = yield start_broker(self, config)
        endpoint = broker.service.ssp_endpoint
        self.assertEqual(endpoint.table.park_after, 2.5)
        self.assertEqual(endpoint.table.facts_interval, 0.25)
        self.assertEqual(endpoint.admission.failures.limit, 3)
        udp = broker.service.getServiceNamed("udp")
        self.assertEqual(udp._port.getHost().host, "127.0.0.1")
        self.assertGreaterEqual(udp.receive_buffer, 2 * 65536)  # SO_RCVBUF set (rmem_max may cap it)
        self.assertIn(udp.reload, broker.service.reloaders)
        udp.reload(replace(config, "ssp", max_sessions=3, park_after=4.0))
        self.assertEqual(endpoint.settings.max_sessions, 3)
        self.assertEqual(endpoint.table.park_after, 4.0)
