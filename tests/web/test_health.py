"""Integration tests for /healthz and /readyz over a real loopback socket."""

from twisted.internet import defer
from twisted.trial.unittest import TestCase

import broker
from tests.helpers import http_json, loopback_config, start_broker


class HealthTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, loopback_config(self))

    @defer.inlineCallbacks
    def test_healthz(self):
        """GET /healthz answers 200 with status, version and uptime as JSON."""
        code, headers, body = yield http_json(self, "GET", self.broker.http_url + "/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"),
                         [b"application/json; charset=utf-8"])
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["version"], broker.__version__)
        self.assertGreaterEqual(body["uptime"], 0)

    @defer.inlineCallbacks
    def test_readyz_reports_reasons(self):
        """GET /readyz is 200 when every check passes, 503 with the reasons otherwise."""
        url = self.broker.http_url + "/readyz"
        code, _, body = yield http_json(self, "GET", url)
        self.assertEqual((code, body["status"]), (200, "ready"))
        self.broker.service.readiness.checks.append(lambda: "store not open")
        code, _, body = yield http_json(self, "GET", url)
        self.assertEqual((code, body["reasons"]), (503, ["store not open"]))
