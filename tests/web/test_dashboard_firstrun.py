"""First run: a broker with no access token creates one and logs the URL carrying it, once."""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.logs import redact
from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.web.dashboard.firstrun import (FirstRunToken, dashboard_url, is_secure_endpoint,
                                           url_of_address)
from tests.helpers import http_json, loopback_config, start_broker


def capture_urls(testcase, events=None) -> list:
    """The dashboard URLs logged from now on (events with a dashboard_url field)."""
    urls = []

    def observe(event):
        if "dashboard_url" in event:
            urls.append(event["dashboard_url"])
            if events is not None:
                events.append(event)

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return urls


def token_of(url: str) -> str:
    fragment = urlsplit(url).fragment
    assert fragment.startswith("token="), url
    return fragment[len("token="):]


class FirstRunTokenTests(SynchronousTestCase):
    """The FirstRunToken service over a registry in memory, on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryStore()
        self.events = []
        self.urls = capture_urls(self, self.events)

    def registry(self):
        return DeviceRegistry(self.store, clock=self.clock,
                              settings=RegistrySettings(reload_interval=0))

    def start(self, registry, base="http://127.0.0.1:8080"):
        service = FirstRunToken(registry, lambda: defer.succeed(base), self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_creates_a_write_token_and_logs_its_url(self):
        """An empty store gets one write token, and the logged URL carries it in the fragment."""
        registry = self.registry()
        service = self.start(registry)
        self.clock.advance(0)
        url = self.successResultOf(service.done)
        self.assertEqual(self.urls, [url])
        self.assertTrue(url.startswith("http://127.0.0.1:8080/#token="))
        self.assertEqual(registry.check_token(token_of(url)), "write")
        self.assertEqual([info.role for info in registry.tokens()], ["write"])

    def test_the_url_survives_the_log_redaction(self):
        """The one documented secret in the log: the redacting observer keeps the URL whole."""
        service = self.start(self.registry())
        self.clock.advance(0)
        url = self.successResultOf(service.done)
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn(url, formatEvent(redact(event)))

    def test_waits_for_the_other_services(self):
        """Nothing is created before the reactor turns once (the HTTP port starts after it)."""
        registry = self.registry()
        service = self.start(registry)
        self.assertEqual(registry.tokens(), [])
        self.assertNoResult(service.done)
        self.clock.advance(0)
        self.assertEqual(len(registry.tokens()), 1)

    def test_stopped_before_its_turn(self):
        """A service stopped before its turn creates nothing."""
        registry = self.registry()
        service = self.start(registry)
        service.stopService()
        self.clock.advance(1)
        self.assertEqual((registry.tokens(), self.urls), ([], []))

    def test_existing_token_means_no_first_run(self):
        """With a token in the store nothing is created and nothing is logged."""
        registry = self.registry()
        self.successResultOf(registry.add_token("read"))
        service = self.start(registry)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(service.done))
        self.assertEqual((len(registry.tokens()), self.urls), (1, []))

    def test_logged_once_across_restarts(self):
        """A restarted broker (a new registry over the same store) logs nothing the second time."""
        self.start(self.registry())
        self.clock.advance(0)
        second = self.registry()
        service = self.start(second)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(service.done))
        self.assertEqual((len(self.urls), len(second.tokens())), (1, 1))

    def test_token_added_while_waiting_for_the_port(self):
        """A token added (broker-admin) while the port was being bound cancels the first run."""
        registry = self.registry()
        port = defer.Deferred()
        service = FirstRunToken(registry, lambda: port, self.clock)
        service.startService()
        self.clock.advance(0)
        self.successResultOf(registry.add_token("read"))
        port.callback("http://127.0.0.1:8080")
        self.assertIsNone(self.successResultOf(service.done))
        self.assertEqual((len(registry.tokens()), self.urls), (1, []))

    def test_unknown_address(self):
        """Without a URL (a UNIX socket) the log still gives the path and fragment to use."""
        registry = self.registry()
        service = self.start(registry, base="")
        self.clock.advance(0)
        url = self.successResultOf(service.done)
        self.assertTrue(url.startswith("/#token="))
        self.assertEqual(registry.check_token(token_of(url)), "write")

    def test_listener_never_bound(self):
        """A broker stopped before its HTTP port was bound creates no token and logs nothing."""
        registry = self.registry()
        service = self.start(registry, base=None)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(service.done))
        self.assertEqual((registry.tokens(), self.urls), ([], []))


class URLTests(SynchronousTestCase):
    """The URL the first run logs."""

    def test_public_url(self):
        """The token goes in the fragment after the public URL, with or without its trailing slash."""
        self.assertEqual(dashboard_url("https://iot.example.com", "a.b"),
                         "https://iot.example.com/#token=a.b")
        self.assertEqual(dashboard_url("https://example.com/broker/", "a.b"),
                         "https://example.com/broker/#token=a.b")

    def test_listening_addresses(self):
        """Wildcard addresses are shown as loopback, IPv6 in brackets, UNIX sockets as no URL."""
        self.assertEqual(url_of_address(IPv4Address("TCP", "127.0.0.1", 8080), False),
                         "http://127.0.0.1:8080")
        self.assertEqual(url_of_address(IPv4Address("TCP", "0.0.0.0", 80), False),
                         "http://127.0.0.1:80")
        self.assertEqual(url_of_address(IPv6Address("TCP", "::", 8443), True),
                         "https://[::1]:8443")
        self.assertEqual(url_of_address(IPv6Address("TCP", "::1", 8080), False),
                         "http://[::1]:8080")
        self.assertIsNone(url_of_address(UNIXAddress(b"/run/broker.sock"), False))

    def test_secure_endpoints(self):
        """ssl: and tls: endpoint strings serve https; tcp: and systemd: http."""
        self.assertTrue(is_secure_endpoint("ssl:8443:privateKey=k.pem"))
        self.assertTrue(is_secure_endpoint("TLS:8443"))
        self.assertFalse(is_secure_endpoint("tcp:8080:interface=127.0.0.1"))
        self.assertFalse(is_secure_endpoint("systemd:domain=INET:index=0"))


class FirstRunBrokerTests(TestCase):
    """A real broker on loopback, started on an empty data directory."""

    timeout = 30

    @defer.inlineCallbacks
    def test_new_broker_logs_a_working_url(self):
        """The logged URL names the bound port, and its token opens the dashboard as a writer."""
        urls = capture_urls(self)
        broker = yield start_broker(self, loopback_config(self))
        service = broker.service.getServiceNamed("dashboard-first-run")
        url = yield service.done
        self.assertEqual(urls, [url])
        self.assertTrue(url.startswith(broker.http_url + "/#token="), url)
        bearer = f"Bearer {token_of(url)}".encode()
        code, _, body = yield http_json(self, "GET", broker.http_url + "/dashboard/session",
                                        headers={b"authorization": [bearer]})
        self.assertEqual((code, body["role"]), (200, "write"))
        code, headers, _ = yield http_json(self, "GET", broker.http_url + "/")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])

    @defer.inlineCallbacks
    def test_url_is_shown_at_log_level_warn(self):
        """The URL line is a warning: a broker logging warnings and above still shows it."""
        events = []
        urls = capture_urls(self, events)
        broker = yield start_broker(self, loopback_config(self, log={"level": "warn"}))
        url = yield broker.service.getServiceNamed("dashboard-first-run").done
        self.assertEqual(urls, [url])
        self.assertEqual(events[0]["log_level"], LogLevel.warn)

    @defer.inlineCallbacks
    def test_no_token_is_made_when_the_level_hides_it(self):
        """At log level error no token is created (nobody would see it), and an error
        line says how to make one."""
        errors = []

        def observe(event):
            if event.get("log_level") == LogLevel.error:
                errors.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        broker = yield start_broker(self, loopback_config(self, log={"level": "error"}))
        url = yield broker.service.getServiceNamed("dashboard-first-run").done
        self.assertIsNone(url)
        self.assertEqual(broker.service.registry.tokens(), [])
        self.assertTrue(any("token add --role write" in line for line in errors), errors)

    @defer.inlineCallbacks
    def test_public_url_is_used(self):
        """With http.public_url set, the logged URL starts with it."""
        urls = capture_urls(self)
        config = loopback_config(self, http={"public_url": "https://broker.example.com/iot/"})
        broker = yield start_broker(self, config)
        yield broker.service.getServiceNamed("dashboard-first-run").done
        self.assertEqual(len(urls), 1)
        self.assertTrue(urls[0].startswith("https://broker.example.com/iot/#token="))

    @defer.inlineCallbacks
    def test_a_broker_that_fails_to_start_logs_only_why(self):
        """A broker whose metrics port is taken fails to start with the one line naming
        metrics.endpoint; the first-run service, started before the failure, is
        stopped with the rest and logs nothing (before: a critical traceback)."""
        import socket

        from broker.config import ConfigError
        from broker.service import make_service

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config = loopback_config(self, ssp={"enabled": False}, metrics={
            "endpoint": f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"})
        critical = []

        def observe(event):
            if event.get("log_level") in (LogLevel.critical, LogLevel.error):
                critical.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service = make_service(config, reactor=reactor)
        with self.assertRaises(ConfigError) as caught:
            service.startService()
        self.addCleanup(service.stopService)
        self.assertIn("metrics.endpoint", str(caught.exception))
        first_run = service.getServiceNamed("dashboard-first-run")
        self.assertIsNone((yield first_run.done))
        self.assertEqual(critical, [])
