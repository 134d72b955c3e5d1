"""The /metrics resource, its access rules, and the figures the broker itself keeps.

Unit tests drive the registry on a task.Clock and read the collectors;
the integration tests scrape a real broker on loopback.
"""

import collections
import json
import os
import re
import socket
import time

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from broker.metrics import SAMPLE_EVERY, InstrumentedStore, Metrics
from broker.node.client import SSPNode
from broker.registry import DeviceRegistry, MemoryStore
from broker.web.metrics import MetricsResource, is_loopback
from tests.helpers import http_json, loopback_config, start_broker
from tests.web.wsclient import connect


def sample(metrics, name, **labels):
    """The current value of one sample (0.0 when it does not exist yet)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def parse(text):
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class RegistryFiguresTests(SynchronousTestCase):
    def setUp(self):
        self.metrics = Metrics()
        self.store = MemoryStore()
        self.clock = FakeClock()
        self.registry = DeviceRegistry(InstrumentedStore(self.store, self.metrics, self.clock),
                                       clock=Clock())
        self.metrics.watch_registry(self.registry)

    def test_devices_known_online_and_cursor_read_on_scrape(self):
        """Known and online devices and the feed cursor follow the registry without anyone setting them."""
        self.registry.add_device("kitchen")
        self.registry.add_device("garage")
        self.assertEqual(sample(self.metrics, "broker_devices_known"), 2)
        self.assertEqual(sample(self.metrics, "broker_devices_online"), 0)
        self.registry.set_connection("kitchen", online=True)
        self.assertEqual(sample(self.metrics, "broker_devices_online"), 1)
        self.assertEqual(sample(self.metrics, "broker_feed_cursor"), self.registry.cursor)
        self.registry.remove_device("garage")
        self.assertEqual(sample(self.metrics, "broker_devices_known"), 1)
        self.assertEqual(sample(self.metrics, "broker_feed_cursor"), self.registry.cursor)

    def test_writes_counted_by_kind_and_commit_time_sampled(self):
        """Every store write counts by kind; one in SAMPLE_EVERY is timed from write until durable."""
        self.registry.add_device("kitchen")
        self.store.hold()
        writes = [self.registry.update_reported("kitchen", {"t": n})
                  for n in range(SAMPLE_EVERY - 1)]
        self.assertEqual(sample(self.metrics, "broker_registry_updates_total", kind="add"), 1)
        self.assertEqual(sample(self.metrics, "broker_registry_updates_total", kind="state"),
                         SAMPLE_EVERY - 1)
        self.clock.now += 0.004
        self.assertEqual(sample(self.metrics, "broker_registry_commit_seconds_count"), 0)
        self.store.release()
        for d in writes:
            self.successResultOf(d)
        self.assertEqual(sample(self.metrics, "broker_registry_commit_seconds_count"), 1)
        self.assertEqual(sample(self.metrics, "broker_registry_commit_seconds_bucket", le="0.005"), 1)
        self.assertEqual(sample(self.metrics, "broker_registry_commit_seconds_bucket", le="0.0025"), 0)
        self.assertAlmostEqual(sample(self.metrics, "broker_registry_commit_seconds_sum"), 0.004)

    def test_batched_reports_counted_per_device(self):
        """A batch of reports (one commit) counts one state update per device it carries."""
        for name in ("kitchen", "garage", "attic"):
            self.registry.add_device(name)
        done = self.registry.update_reported_many(
            [("kitchen", {"t": 1}), ("garage", {"t": 2}), ("attic", {"t": 3})])
        self.assertEqual(len(self.successResultOf(done)), 3)
        self.assertEqual(sample(self.metrics, "broker_registry_updates_total", kind="state"), 3)

    def test_store_extras_still_reachable(self):
        """The wrapper forwards what it does not know to the store (e.g. the memory store's hold)."""
        wrapped = InstrumentedStore(self.store, self.metrics)
        self.assertEqual(wrapped.writes, self.store.writes)


class ReloadFiguresTests(SynchronousTestCase):
    def test_reload_outcomes_exported_from_the_start(self):
        """Every reload outcome is exported as 0 before any SIGHUP, so the first refusal or
        failure shows in increase()."""
        samples = parse(Metrics().render().decode())
        for outcome in ("applied", "refused", "failed"):
            self.assertEqual(samples[("broker_config_reloads_total", (("outcome", outcome),))],
                             0.0, outcome)


class AccessTests(SynchronousTestCase):
    def render(self, *, require_token, client=IPv4Address("TCP", "127.0.0.1", 5000),
               authorization=None):
        resource = MetricsResource(Metrics(), require_token=lambda: require_token,
                                   check_token=lambda text: "read" if text == "good" else None)
        request = DummyRequest([b""])
        request.client = client
        if authorization is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [authorization])
        body = resource.render_GET(request)
        return request.responseCode or 200, request, body

    def test_loopback_only_without_token_rule(self):
        """Without require_token, loopback clients read the figures and others get 403."""
        code, request, body = self.render(require_token=False)
        self.assertEqual(code, 200)
        self.assertIn(b"broker_devices_known", body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain"))
        code, _, body = self.render(require_token=False,
                                    client=IPv4Address("TCP", "192.0.2.7", 5000))
        self.assertEqual(code, 403)
        self.assertIn(b"require_token", body)

    def test_token_rule(self):
        """With require_token: no token 401, an unknown one 401, a valid Bearer token 200."""
        self.assertEqual(self.render(require_token=True)[0], 401)
        self.assertEqual(self.render(require_token=True, authorization=b"Bearer bad")[0], 401)
        self.assertEqual(self.render(require_token=True, authorization=b"Basic good")[0], 401)
        code, _, body = self.render(require_token=True, authorization=b"Bearer good",
                                    client=IPv4Address("TCP", "192.0.2.7", 5000))
        self.assertEqual(code, 200)

    def test_other_methods_get_the_api_json_405(self):
        """POST /metrics is answered 405 with Allow and the API's JSON error, not an HTML page."""
        resource = MetricsResource(Metrics(), require_token=lambda: False,
                                   check_token=lambda text: None)
        request = DummyRequest([b""])
        request.method = b"POST"
        body = resource.render(request)
        self.assertEqual(request.responseCode, 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"application/json"))

    def test_loopback_addresses(self):
        """127.0.0.0/8, ::1, IPv4-mapped loopback and UNIX sockets are local; others are not."""
        self.assertTrue(is_loopback(IPv4Address("TCP", "127.9.9.9", 1)))
        self.assertTrue(is_loopback(IPv6Address("TCP", "::1", 1)))
        self.assertTrue(is_loopback(IPv6Address("TCP", "::ffff:127.0.0.1", 1)))
        self.assertTrue(is_loopback(UNIXAddress("/run/broker.sock")))
        self.assertFalse(is_loopback(IPv6Address("TCP", "2001:db8::1", 1)))
        self.assertFalse(is_loopback(IPv4Address("TCP", "10.1.2.3", 1)))


class ScrapeTests(TestCase):
    """A real broker on loopback, scraped over HTTP."""

    timeout = 30

    @defer.inlineCallbacks
    def test_http_requests_counted_by_status(self):
        """Every answer of the Site counts under its status, whatever resource gave it."""
        running = yield start_broker(self, loopback_config(self, registry={"backend": "memory"}))
        yield http_json(self, "GET", running.http_url + "/healthz")
        yield http_json(self, "GET", running.http_url + "/no/such/page")
        code, headers, body = yield http_json(self, "GET", running.http_url + "/metrics")
        self.assertEqual(code, 200)
        samples = parse(body.decode())
        self.assertEqual(samples[("broker_http_requests_total", (("status", "200"),))], 1)
        self.assertEqual(samples[("broker_http_requests_total", (("status", "404"),))], 1)
        for name in ("broker_devices_known", "broker_devices_online", "broker_feed_cursor",
                     "broker_ssp_sessions", "broker_websocket_clients", "broker_longpoll_waiters",
                     "broker_process_open_fds"):
            self.assertIn((name, ()), samples)

    @defer.inlineCallbacks
    def test_own_listener_with_token(self):
        """With [metrics] endpoint the figures move to their own port, behind a token if asked."""
        config = loopback_config(self, registry={"backend": "memory"},
                                 metrics={"endpoint": "tcp:0:interface=127.0.0.1",
                                          "require_token": True})
        running = yield start_broker(self, config)
        token_id, token = yield running.service.registry.add_token("read")
        code, _, _ = yield http_json(self, "GET", running.http_url + "/metrics")
        self.assertEqual(code, 404)
        url = f"http://127.0.0.1:{running.service.listening['metrics'].getHost().port}/metrics"
        code, _, _ = yield http_json(self, "GET", url)
        self.assertEqual(code, 401)
        code, _, body = yield http_json(self, "GET", url,
                                        headers={b"authorization": [f"Bearer {token}".encode()]})
        self.assertEqual(code, 200)
        self.assertIn(b"broker_devices_known", body)
        yield running.service.registry.revoke_token(token_id)
        code, _, _ = yield http_json(self, "GET", url,
                                     headers={b"authorization": [f"Bearer {token}".encode()]})
        self.assertEqual(code, 401)


class EndpointFiguresTests(TestCase):
    """The endpoints' own figures move on a real broker (for the endpoints that have landed)."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.running = yield start_broker(self, loopback_config(self,
                                                                registry={"backend": "memory"}))
        self.metrics = self.running.service.metrics
        self.registry = self.running.service.registry
        yield self.registry.add_device("pump-1")
        _, self.token = yield self.registry.add_token("read")

    @defer.inlineCallbacks
    def started_node(self, name):
        """A real SSP node of a new device, talking to the broker on loopback."""
        provisioned = yield self.registry.add_device(name)
        node = SSPNode(provisioned.device_number, provisioned.secret,
                       ("127.0.0.1", self.running.udp_port), interface="127.0.0.1",
                       state_path=os.path.join(self.mktemp(), "ids.json"), heartbeat=2.0)
        node.start()
        self.addCleanup(node.stop)
        return node

    @defer.inlineCallbacks
    def test_websocket_clients_and_messages(self):
        """A WebSocket client counts while connected; its request and the answer count as messages."""
        client = yield connect(self.running.http_url, self.token)
        self.assertEqual(sample(self.metrics, "broker_websocket_clients"), 1)
        before = sample(self.metrics, "broker_websocket_messages_total", direction="in")
        yield client.request({"op": "ping", "id": 1})
        self.assertEqual(sample(self.metrics, "broker_websocket_messages_total", direction="in"),
                         before + 1)
        self.assertGreaterEqual(
            sample(self.metrics, "broker_websocket_messages_total", direction="out"), 1)
        client.sendClose(1000)
        yield client.closed
        yield wait_for(lambda: sample(self.metrics, "broker_websocket_clients") == 0)

    @defer.inlineCallbacks
    def test_longpoll_waiters(self):
        """A waiting long poll counts until a change answers it."""
        url = (f"{self.running.http_url}/api/v1/changes?since={self.registry.cursor}"
               f"&wait=20&token={self.token}")
        poll = treq.get(url, persistent=False)
        yield wait_for(lambda: sample(self.metrics, "broker_longpoll_waiters") == 1)
        yield self.registry.update_desired("pump-1", {"led": "on"})
        answer = yield poll
        self.assertEqual(answer.code, 200)
        yield answer.content()
        self.assertEqual(sample(self.metrics, "broker_longpoll_waiters"), 0)

    @defer.inlineCallbacks
    def test_ssp_datagrams_and_drops(self):
        """A datagram with an unknown framing version counts as received and as dropped, unanswered."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"\x09" + bytes(40), ("127.0.0.1", self.running.udp_port))
        yield wait_for(lambda: sample(self.metrics, "broker_ssp_datagrams_received_total") == 1)
        drops = [s.value for family in self.metrics.registry.collect()
                 if family.name == "broker_ssp_datagrams_dropped" for s in family.samples
                 if s.name.endswith("_total")]
        self.assertEqual(sum(drops), 1)
        self.assertEqual(sample(self.metrics, "broker_ssp_datagrams_sent_total"), 0)

    @defer.inlineCallbacks
    def test_ssp_session_figures(self):
        """A node's session counts as started and live, and the broker's answers as datagrams sent."""
        node = yield self.started_node("node-9")
        node.report({"t": 1})
        yield wait_for(lambda: node.acknowledged > 0)
        yield wait_for(lambda: sample(self.metrics, "broker_ssp_new_sessions_total") == 1)
        self.assertEqual(sample(self.metrics, "broker_ssp_sessions"), 1)
        self.assertGreaterEqual(sample(self.metrics, "broker_ssp_datagrams_sent_total"), 1)
        self.assertGreaterEqual(sample(self.metrics, "broker_ssp_datagrams_received_total"), 1)

    @defer.inlineCallbacks
    def test_refused_reports_counted_by_code(self):
        """A report the registry refuses (a key it does not take) is acknowledged, logged
        and counted under its error code."""
        node = yield self.started_node("node-8")
        # (A device that does not check: SSPNode refuses such a key itself.)
        session = node.session
        session.session.set_local_state(session.state.with_values({"bad key": 1}),
                                        node.endpoint.now())
        node.endpoint.kick(session)
        yield wait_for(lambda: node.acknowledged > 0)
        yield wait_for(lambda: sample(self.metrics, "broker_ssp_reports_refused_total",
                                      code="invalid_key") == 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.assertNotIn("bad key", self.registry.device("node-8").reported)


    @defer.inlineCallbacks
    def test_commands_counted_by_endpoint_and_outcome(self):
        """A command refused over HTTP and one over the WebSocket (no session holds
        the device) count under their endpoint and outcome."""
        _, write = yield self.registry.add_token("write")
        answer = yield treq.post(f"{self.running.http_url}/api/v1/devices/pump-1/commands",
                                 json={"op": "blink"}, persistent=False,
                                 headers={b"authorization": [b"Bearer " + write.encode()]})
        yield answer.content()
        self.assertEqual(answer.code, 409)
        self.assertEqual(sample(self.metrics, "broker_commands_total", via="http",
                                outcome="device_offline"), 1)
        client = yield connect(self.running.http_url, write)
        reply = yield client.request({"op": "command", "id": 1, "device": "pump-1",
                                      "command": "blink"})
        self.assertEqual(reply["code"], "device_offline")
        self.assertEqual(sample(self.metrics, "broker_commands_total", via="websocket",
                                outcome="device_offline"), 1)
        client.sendClose(1000)
        yield client.closed


class RelayedCommandFiguresTests(TestCase):
    """Commands another process relays to this one count apart from this one's endpoints."""

    timeout = 30

    @defer.inlineCallbacks
    def test_relayed_commands_refused_count_as_via_relay(self):
        """A relayed command refused for a full queue counts as via="relay", whatever
        endpoints this broker runs: the relay target is the broker's own sender."""
        import broker.service as service_module
        from broker.udp.bridge import TooManyCommands

        targets = []
        opened = service_module.open_configured_registry

        def with_relay(*args, **kwargs):
            registry = opened(*args, **kwargs)
            registry.relay_to = targets.append   # as a shared (Redis) registry has
            return registry
        self.patch(service_module, "open_configured_registry", with_relay)
        running = yield start_broker(self, loopback_config(self, registry={"backend": "memory"}))

        def full(device_number, *commands):
            raise TooManyCommands(8, 8)
        self.patch(running.service.ssp_endpoint, "send_command", full)
        self.assertFalse(targets[-1](7, "blink"))
        metrics = running.service.metrics
        self.assertEqual(sample(metrics, "broker_commands_total", via="relay",
                                outcome="too_many_commands"), 1)
        for via in ("http", "websocket"):
            self.assertEqual(sample(metrics, "broker_commands_total", via=via,
                                    outcome="too_many_commands"), 0, via)


@defer.inlineCallbacks
def wait_for(condition, timeout=5.0):
    """Poll a condition on the real reactor (integration tests only)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        yield task.deferLater(reactor, 0.05, lambda: None)


class DocumentedMetricsTests(SynchronousTestCase):
    """docs/operations.md's table of metrics and what the broker exports agree."""

    @staticmethod
    def documented():
        """Names in the table's first column, "`_sent_total`" completed from the name before it."""
        from pathlib import Path

        text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
        names = set()
        for line in text.splitlines():
            if not line.startswith("| `broker_"):
                continue
            previous = None
            for name in re.findall(r"`([a-z_*]+)(?:\{[^}]*\})?`", line.split("|")[1]):
                if name.startswith("_"):
                    name = previous.rsplit("_", 2)[0] + name
                names.add(name)
                previous = name
        return names

    @staticmethod
    def exported():
        """Every metric a worker-mode broker's registry renders (counters with their _total)."""
        from types import SimpleNamespace

        from broker.worker import LogLinesDropped, WorkerRestarts

        metrics = Metrics()
        metrics.watch_registry(DeviceRegistry(MemoryStore(), clock=Clock()))
        metrics.watch_commands("http", collections.Counter())
        metrics.registry.register(WorkerRestarts())
        metrics.registry.register(LogLinesDropped(SimpleNamespace(dropped_total=0)))
        return {family.name + ("_total" if family.type == "counter" else "")
                for family in metrics.registry.collect()}

    def test_every_command_outcome_is_documented(self):
        """Each outcome broker/web/commands.py counts (refusal codes included) is named in
        the broker_commands_total row of docs/operations.md."""
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        source = (root / "broker" / "web" / "commands.py").read_text()
        counted = set(re.findall(r'CommandRefused\(\s*\d+,\s*"(\w+)"', source))
        counted |= set(re.findall(r'counters\["(\w+)"\]', source))
        self.assertTrue({"queued", "no_ssp_session", "too_many_commands"} <= counted, counted)
        row = [line for line in (root / "docs" / "operations.md").read_text().splitlines()
               if line.startswith("| `broker_commands_total")]
        self.assertEqual(len(row), 1)
        documented = set(re.findall(r"`(\w+)`", row[0]))
        self.assertEqual(counted - documented, set())

    def test_every_documented_metric_is_exported_and_back(self):
        """Each metric named in docs/operations.md exists, and each exported metric is documented (broker_process_* as a group)."""
        documented, exported = self.documented(), self.exported()
        self.assertIn("broker_ssp_datagrams_sent_total", documented)
        process = {name for name in exported if name.startswith("broker_process_")}
        self.assertTrue(process)
        self.assertIn("broker_process_*", documented)
        self.assertEqual(documented - {"broker_process_*"}, exported - process)
