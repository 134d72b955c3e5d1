"""HTTP details of /api: body limits, credentials, routing, CORS, reload, errors (memory transports)."""

from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyChannel

from broker.config import load_config, replace
from broker.web.api import resource as api_resource
from broker.web.api.bodylimit import limited_request_factory
from broker.web.api.settings import ApiSettings
from tests.web.api_support import MemoryAPI, bearer, device_auth

JSON = {b"Content-Type": b"application/json"}


class BodyLimitTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_request_bytes=1024))
        self.device = self.m.add_device("node")
        self.auth = {**bearer(self.m.token("write")), **JSON}

    def assertRefused(self, exchange):
        """413 request_too_large, Connection: close, and the connection is being closed."""
        status, headers, body = exchange.response()
        self.assertEqual((status, body["error"]["code"]), (413, "request_too_large"))
        self.assertIn("1024", body["error"]["message"])
        self.assertEqual(headers["Connection"], "close")
        self.assertTrue(exchange.transport.disconnecting)

    def test_declared_length_over_limit_answers_at_once(self):
        """A Content-Length over the limit is answered 413 right after the head, before any body byte."""
        exchange = self.m.open("PATCH", "/api/v1/devices/node/desired",
                               {**self.auth, b"Content-Length": b"5000000000"})
        self.assertRefused(exchange)
        answer = exchange.raw()
        exchange.channel.dataReceived(b'{"a": "' + b"x" * 5000)     # the rest is not read
        self.assertEqual(exchange.raw(), answer)
        self.assertEqual(self.m.registry.device("node").desired, {})

    def test_declared_length_over_limit_with_body_in_the_same_packet(self):
        """A head and an oversized body arriving together: one 413, the body is dropped, nothing applied."""
        exchange = self.m.open("PATCH", "/api/v1/devices/node/desired", self.auth,
                               b'{"a": "' + b"x" * 5000 + b'"}')
        self.assertRefused(exchange)
        self.assertEqual(exchange.raw().count(b"HTTP/1.1"), 1)
        self.assertEqual(self.m.registry.device("node").desired, {})

    def test_expect_continue_gets_413_instead_of_100(self):
        """A client that asks Expect: 100-continue for an oversized body gets 413, never 100 Continue."""
        exchange = self.m.open("PATCH", "/api/v1/devices/node/desired",
                               {**self.auth, b"Content-Length": b"4096", b"Expect": b"100-continue"})
        self.assertNotIn(b"100 Continue", exchange.raw())
        self.assertRefused(exchange)

    def test_any_path_is_refused(self):
        """The limit is the Site's: an oversized body to a GET or an unknown path is 413 too, not dispatched."""
        for path in ("/api/v1/devices", "/api/nothing"):
            exchange = self.m.open("POST", path, {b"Content-Length": b"2000"})
            self.assertRefused(exchange)

    def test_request_keeps_at_most_the_limit(self):
        """The Site's request class stops storing a body once it passes the limit."""
        request = limited_request_factory(10)(DummyChannel())
        request.gotLength(None)
        request.handleContentChunk(b"x" * 6)
        self.assertFalse(request.body_too_large)
        request.handleContentChunk(b"y" * 6)
        self.assertTrue(request.body_too_large)
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"")

    def test_chunked_body_over_limit(self):
        """A chunked body is answered 413 as soon as it passes the limit, before it ends, and closed."""
        exchange = self.m.open("PATCH", "/api/v1/devices/node/desired",
                               {**self.auth, b"Transfer-Encoding": b"chunked"})
        channel = exchange.channel
        chunk = b"y" * 600
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertEqual(exchange.raw(), b"")                 # 600 bytes: still under the limit
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertRefused(exchange)
        answer = exchange.raw()
        channel.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
        channel.dataReceived(b"GET /api/v1/devices/node HTTP/1.1\r\nHost: broker.test\r\n\r\n")
        self.assertEqual(exchange.raw(), answer)              # nothing more is read or answered

    def test_refusal_is_counted_and_logged_like_any_answer(self):
        """The early 413 goes through the Site's log hook, so metrics count it by status."""
        logged = []
        self.patch(self.m.site, "log", logged.append)
        exchange = self.m.open("PUT", "/api/v1/devices/node/desired", {b"Content-Length": b"2048"})
        self.assertRefused(exchange)
        self.assertEqual([(r.code, r.method, r.path) for r in logged],
                         [(413, b"PUT", b"/api/v1/devices/node/desired")])

    def test_body_at_the_limit_is_accepted(self):
        """A body of exactly max_request_bytes is read and applied."""
        value = "z" * (1024 - len('{"a":""}'))
        status, _, body = self.m.call("PATCH", "/api/v1/devices/node/desired", self.auth,
                                      ('{"a":"%s"}' % value).encode())
        self.assertEqual((status, body["desired"]), (200, {"a": value}))


class CredentialTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self)
        self.node = self.m.add_device("node")
        self.other = self.m.add_device("other")
        self.read = self.m.token("read")

    def code(self, method, path, headers=None, body=None):
        status, _, answer = self.m.call(method, path, headers, body)
        return status, answer["error"]["code"] if status >= 400 else None

    def test_device_key_reaches_only_its_device(self):
        """A device key reads its own device and is 401 on another one."""
        self.assertEqual(self.code("GET", "/api/v1/devices/node", device_auth(self.node.key)),
                         (200, None))
        self.assertEqual(self.code("GET", "/api/v1/devices/other", device_auth(self.node.key)),
                         (401, "invalid_device_key"))

    def test_device_key_off_its_paths(self):
        """A device key on the feed or the list is 401, saying where it is accepted."""
        for path in ("/api/v1/changes", "/api/v1/devices"):
            status, _, body = self.m.call("GET", path, device_auth(self.node.key))
            self.assertEqual((status, body["error"]["code"]), (401, "invalid_device_key"))
            self.assertIn("/api/v1/devices/NAME", body["error"]["message"])

    def test_unknown_device_looks_like_a_wrong_key(self):
        """An unknown device name answers the same 401 as a wrong key (names are not revealed)."""
        self.assertEqual(self.code("POST", "/api/v1/devices/ghost/reported",
                                   {**device_auth(self.node.key), **JSON}, {"a": 1}),
                         (401, "invalid_device_key"))

    def test_malformed_device_key(self):
        """A device key that is not 22 base64 characters is 401 invalid_device_key."""
        self.assertEqual(self.code("GET", "/api/v1/devices/node", {b"Authorization": b"Device abc"}),
                         (401, "invalid_device_key"))

    def test_query_token(self):
        """?token= works for GET, a wrong one is 401 invalid_token."""
        self.assertEqual(self.code("GET", "/api/v1/devices?token=" + self.read.decode()), (200, None))
        self.assertEqual(self.code("GET", "/api/v1/devices?token=nope"), (401, "invalid_token"))

    def test_rotated_key_is_refused(self):
        """After a key rotation the old key is refused at once."""
        self.m.result(self.m.registry.rotate_key("node"))
        self.assertEqual(self.code("GET", "/api/v1/devices/node", device_auth(self.node.key)),
                         (401, "invalid_device_key"))


class RoutingTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(allowed_origins=("https://dash.example.com",)))
        self.m.add_device("node.1")
        self.auth = bearer(self.m.token("read"))

    def test_trailing_slash_and_versions(self):
        """One trailing slash is the same path; other versions and the bare /api are 404."""
        self.assertEqual(self.m.call("GET", "/api/v1/devices/", self.auth)[0], 200)
        for path in ("/api/v2/devices", "/api", "/api/v1", "/api/v1/devices/node.1/nothing"):
            status, _, body = self.m.call("GET", path, self.auth)
            self.assertEqual((status, body["error"]["code"]), (404, "not_found"), path)

    def test_percent_encoded_name(self):
        """Device names in the path are percent-decoded."""
        status, _, body = self.m.call("GET", "/api/v1/devices/node%2E1", self.auth)
        self.assertEqual((status, body["name"]), (200, "node.1"))

    def test_options_without_origin(self):
        """A plain OPTIONS answers 204 with Allow, without CORS headers."""
        status, headers, _ = self.m.call("OPTIONS", "/api/v1/devices/node.1/desired")
        self.assertEqual((status, headers["Allow"]), (204, "OPTIONS, PATCH"))
        self.assertIsNone(headers["Access-Control-Allow-Origin"])

    def test_origin_rules_match_the_websocket(self):
        """Default ports are implied, the broker's own origin passes, "null" never does."""
        def status(origin):
            return self.m.call("GET", "/api/v1/devices", {**self.auth, b"Origin": origin})[0]

        self.assertEqual(status(b"https://dash.example.com:443"), 200)
        self.assertEqual(status(b"http://broker.test"), 200)        # the Host it was asked as
        self.assertEqual(status(b"null"), 403)
        self.assertEqual(status(b"https://dash.example.com.evil"), 403)

    def test_internal_error_is_json_500(self):
        """A handler that fails unexpectedly answers JSON 500 and the failure is logged."""
        def broken(api, request, principal, name):
            raise KeyError("bug")

        self.patch(api_resource, "ROUTES", {("devices",): {b"GET": ("read", broken)}})
        status, _, body = self.m.call("GET", "/api/v1/devices", self.auth)
        self.assertEqual((status, body["error"]["code"]), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class ReloadTests(SynchronousTestCase):

    def test_reload_applies_new_limits(self):
        """A reloaded config changes max_waiters, the advised interval, origins and the rate limit."""
        m = MemoryAPI(self, ApiSettings(max_waiters=1))
        m.add_device("d")                        # cursor 1: the polls below wait
        auth = bearer(m.token("read"))
        self.assertFalse(m.open("GET", "/api/v1/changes?since=1&wait=5", auth).answered)
        self.assertEqual(m.call("GET", "/api/v1/changes?since=1&wait=5", auth)[0], 503)
        m.open("GET", "/api/v1/changes?since=1&wait=5", auth)
        config = load_config(None)
        config = replace(config, "polling", max_waiters=2, min_interval=4.0)
        config = replace(config, "http", allowed_origins=("https://new.example",))
        m.api.reload(config)
        self.assertFalse(m.open("GET", "/api/v1/changes?since=1&wait=5", auth).answered)
        status, headers, _ = m.call("GET", "/api/v1/changes", {**auth, b"Origin": b"https://new.example"})
        self.assertEqual((status, headers["X-Poll-Interval"]), (200, "4"))
        self.assertEqual(m.api.limiter.rate, m.api.settings.max_requests_per_second)

    def test_bad_origin_in_reload_keeps_running_settings(self):
        """A reload with an invalid origin is refused and logged; the old settings stay."""
        m = MemoryAPI(self, ApiSettings(max_waiters=7))
        config = replace(load_config(None), "http", allowed_origins=("not an origin",))
        with capturedLogs() as events:
            m.api.reload(config)
        self.assertEqual(m.api.settings.max_waiters, 7)
        errors = [formatEvent(event) for event in events if event["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("API settings refused", errors[0])
