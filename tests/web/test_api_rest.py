"""The REST API over a real broker on loopback: reads, writes, If-Match, CORS and every error status."""

import dataclasses
import json

import treq
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from broker.config import replace
from broker.logs import redact
from broker.registry.errors import StoreError
from broker.web.api import resource as api_resource
from broker.web.commands import CommandSender
from tests.helpers import http_pool, loopback_config, start_broker

ORIGIN = "http://dashboard.test:8000"


def broker_config(testcase, **sections):
    """A loopback broker with the memory registry and only the HTTP side."""
    base = {"registry": {"backend": "memory", "max_state_bytes": 256},
            "ssp": {"enabled": False}, "websocket": {"enabled": False},
            "http": {"endpoint": "tcp:0:interface=127.0.0.1", "allowed_origins": (ORIGIN,),
                     "max_request_bytes": 1024}}
    for section, changes in sections.items():
        base[section] = {**base.get(section, {}), **changes}
    return loopback_config(testcase, **base)


class Client:
    """Real HTTP requests (treq, a pool that keeps nothing open) against one broker."""

    def __init__(self, testcase, base_url):
        self.pool = http_pool(testcase)
        self.base = base_url + "/api/v1"

    @defer.inlineCallbacks
    def call(self, method, path, auth=None, body=None, headers=None, raw=None):
        """(status, headers, decoded JSON or bytes)."""
        sent = {}
        if auth is not None:
            sent[b"authorization"] = [auth]
        if body is not None or raw is not None:
            sent[b"content-type"] = [b"application/json"]
        for key, value in (headers or {}).items():
            sent[key] = [value]
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = yield treq.request(method, self.base + path, headers=sent, data=data,
                                      pool=self.pool)
        content = yield response.content()
        try:
            decoded = json.loads(content)
        except ValueError:
            decoded = content
        return response.code, response.headers, decoded


def header(headers, name):
    values = headers.getRawHeaders(name)
    return None if values is None else values[-1].decode()


class RestTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, broker_config(self, polling={"max_waiters": 1,
                                                                            "max_wait": 5.0}))
        self.registry = self.broker.service.registry
        self.devices = {}
        for name in ("kitchen-1", "kitchen-2", "porch", "node-7"):
            self.devices[name] = yield self.registry.add_device(name)
        _, read = yield self.registry.add_token("read")
        _, write = yield self.registry.add_token("write")
        self.read = b"Bearer " + read.encode()
        self.write = b"Bearer " + write.encode()
        self.device = b"Device " + self.devices["node-7"].key.encode()
        self.client = Client(self, self.broker.http_url)

    # -- reads -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_list_pages_and_filters(self):
        """GET /devices pages in name order with next_after, and filters by name prefix or glob."""
        status, _, page = yield self.client.call("GET", "/devices?limit=2", self.read)
        self.assertEqual(status, 200)
        self.assertEqual([d["name"] for d in page["devices"]], ["kitchen-1", "kitchen-2"])
        self.assertEqual(page["next_after"], "kitchen-2")
        _, _, rest = yield self.client.call("GET", "/devices?limit=2&after=kitchen-2", self.read)
        self.assertEqual([d["name"] for d in rest["devices"]], ["node-7", "porch"])
        self.assertIsNone(rest["next_after"])
        _, _, kitchen = yield self.client.call("GET", "/devices?name=kitchen", self.read)
        self.assertEqual([d["name"] for d in kitchen["devices"]], ["kitchen-1", "kitchen-2"])
        _, _, glob = yield self.client.call("GET", "/devices?name=*-2", self.read)
        self.assertEqual([d["name"] for d in glob["devices"]], ["kitchen-2"])

    @defer.inlineCallbacks
    def test_get_one_device_in_the_registry_shape(self):
        """GET /devices/NAME is exactly DeviceView.to_json(), with the version as ETag."""
        status, headers, body = yield self.client.call("GET", "/devices/porch", self.read)
        self.assertEqual(status, 200)
        self.assertEqual(body, json.loads(json.dumps(self.registry.device("porch").to_json())))
        self.assertEqual(header(headers, b"etag"), '"%d"' % body["version"])
        self.assertEqual(header(headers, b"cache-control"), "no-store")

    @defer.inlineCallbacks
    def test_answers_name_no_server_software(self):
        """No answer carries a Server header naming twisted.web and its version (as on /ws)."""
        for path, auth in (("/devices/porch", self.read), ("/devices", None), ("/nowhere", None)):
            _, headers, _ = yield self.client.call("GET", path, auth)
            self.assertFalse(headers.hasHeader(b"server"), path)

    # -- writes ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_patch_desired_merges_and_null_deletes(self):
        """PATCH desired merges nested maps and deletes keys set to null."""
        yield self.client.call("PATCH", "/devices/porch/desired", self.write,
                               {"light": {"on": True, "level": 3}, "mode": "eco"})
        status, headers, body = yield self.client.call(
            "PATCH", "/devices/porch/desired", self.write, {"light": {"level": None}, "mode": None})
        self.assertEqual(status, 200)
        self.assertEqual(body["desired"], {"light": {"on": True}})
        self.assertEqual(self.registry.device("porch").desired, {"light": {"on": True}})
        self.assertEqual(header(headers, b"etag"), '"%d"' % body["version"])

    @defer.inlineCallbacks
    def test_if_match(self):
        """If-Match with the current version writes; a stale one gets 412 with the current version."""
        version = self.registry.device("porch").version
        status, _, body = yield self.client.call("PATCH", "/devices/porch/desired", self.write,
                                                 {"a": 1}, {b"if-match": b'"%d"' % version})
        self.assertEqual((status, body["version"]), (200, version + 1))
        status, headers, body = yield self.client.call(
            "PATCH", "/devices/porch/desired", self.write, {"a": 2}, {b"if-match": b'"%d"' % version})
        self.assertEqual(status, 412)
        self.assertEqual(body["error"]["code"], "version_conflict")
        self.assertEqual(body["error"]["current_version"], version + 1)
        self.assertEqual(header(headers, b"etag"), '"%d"' % (version + 1))
        self.assertEqual(self.registry.device("porch").desired, {"a": 1})

    @defer.inlineCallbacks
    def test_device_reports_over_http_reach_subscribers(self):
        """A device's POST reported reaches registry subscribers and records its connection facts."""
        seen = []
        subscription = self.registry.subscribe(["node-*"], seen.append)
        self.addCleanup(subscription.cancel)
        status, _, body = yield self.client.call("POST", "/devices/node-7/reported", self.device,
                                                 {"temp": 21.5, "raw": {"$bytes": "AAE="}})
        self.assertEqual(status, 200)
        self.assertEqual(body["reported"], {"temp": 21.5, "raw": {"$bytes": "AAE="}})
        self.assertEqual(seen[-1].reported, {"temp": 21.5, "raw": b"\x00\x01"})
        view = self.registry.device("node-7")
        self.assertTrue(view.online)
        self.assertEqual(view.address[0], "127.0.0.1")
        self.assertIsNotNone(view.last_heard)

    @defer.inlineCallbacks
    def test_device_events(self):
        """POST events delivers the device's events to subscribers."""
        seen = []
        subscription = self.registry.subscribe(["node-7"], seen.append)
        self.addCleanup(subscription.cancel)
        status, _, _ = yield self.client.call("POST", "/devices/node-7/events", self.device,
                                              {"events": [{"button": 1}]})
        self.assertEqual(status, 200)
        self.assertEqual([view.events for view in seen if view.events], [({"button": 1},)])

    # -- every error status -----------------------------------------------------------

    @defer.inlineCallbacks
    def assertError(self, expected, code, method, path, auth=None, body=None, headers=None, raw=None):
        status, got_headers, got = yield self.client.call(method, path, auth, body, headers, raw)
        self.assertEqual((status, got["error"]["code"]), (expected, code), got)
        self.assertTrue(got["error"]["message"])
        self.assertEqual(header(got_headers, b"content-type"), "application/json; charset=utf-8")
        return got_headers

    @defer.inlineCallbacks
    def test_400(self):
        """Malformed parameters, JSON and keys get 400 with a precise code."""
        yield self.assertError(400, "invalid_parameter", "GET", "/devices?limit=0", self.read)
        yield self.assertError(400, "invalid_parameter", "GET", "/changes?since=-1", self.read)
        yield self.assertError(400, "invalid_parameter", "GET", "/changes?wait=soon", self.read)
        yield self.assertError(400, "invalid_json", "PATCH", "/devices/porch/desired", self.write,
                               raw=b"{nope")
        yield self.assertError(400, "invalid_patch", "PATCH", "/devices/porch/desired", self.write,
                               body=[1, 2])
        yield self.assertError(400, "invalid_key", "PATCH", "/devices/porch/desired", self.write,
                               body={"bad key!": 1})
        yield self.assertError(400, "invalid_parameter", "PATCH", "/devices/porch/desired",
                               self.write, {"a": 1}, {b"if-match": b"seven"})

    @defer.inlineCallbacks
    def test_text_that_is_not_unicode_is_invalid_json(self):
        """An unpaired surrogate escape (JSON, but not Unicode text) is 400 invalid_json, not 500."""
        for path, auth in (("/devices/porch/desired", self.write),
                           ("/devices/porch/commands", self.write)):
            method = "PATCH" if path.endswith("desired") else "POST"
            for raw in (b'{"s": "\\ud800"}', b'{"\\udc00": 1}', b'{"a": ["x", {"b": "\\udfff"}]}'):
                got = yield self.assertError(400, "invalid_json", method, path, auth, raw=raw)
                self.assertIsNotNone(got)
        status, _, body = yield self.client.call("PATCH", "/devices/porch/desired", self.write,
                                                 raw=b'{"smile": "\\ud83d\\ude00"}')
        self.assertEqual((status, body["desired"]), (200, {"smile": "\U0001f600"}))

    @defer.inlineCallbacks
    def test_out_of_range_numbers_say_their_range(self):
        """A whole number too long for a cursor is refused with its range, not as no number."""
        _, _, body = yield self.client.call("GET", "/changes?since=1000000000000000000", self.read)
        self.assertEqual(body["error"]["code"], "invalid_parameter")
        self.assertIn("between 0 and 999999999999999999", body["error"]["message"])
        _, _, body = yield self.client.call("GET", "/changes?since=12a", self.read)
        self.assertIn("whole number", body["error"]["message"])

    @defer.inlineCallbacks
    def test_401(self):
        """Missing or wrong credentials get 401 with WWW-Authenticate."""
        headers = yield self.assertError(401, "missing_credentials", "GET", "/devices")
        self.assertIn("Bearer", header(headers, b"www-authenticate"))
        yield self.assertError(401, "invalid_token", "GET", "/devices", b"Bearer abc.def")
        other = b"Device " + self.devices["porch"].key.encode()
        yield self.assertError(401, "invalid_device_key", "POST", "/devices/node-7/reported",
                               other, {"t": 1})
        yield self.assertError(401, "invalid_device_key", "POST", "/devices/ghost/reported",
                               other, {"t": 1})
        yield self.assertError(401, "unsupported_scheme", "GET", "/devices", b"Basic YTpi")
        yield self.assertError(401, "token_in_query", "PATCH",
                               "/devices/porch/desired?token=" + self.write[7:].decode(), body={"a": 1})

    @defer.inlineCallbacks
    def test_403(self):
        """A read token cannot write, a token cannot report, a device key reaches only its device."""
        yield self.assertError(403, "forbidden", "PATCH", "/devices/porch/desired", self.read,
                               {"a": 1})
        yield self.assertError(403, "device_only", "POST", "/devices/porch/reported", self.write,
                               {"a": 1})
        yield self.assertError(403, "forbidden", "PATCH", "/devices/node-7/desired", self.device,
                               {"a": 1})
        # The message says what is needed (a device key does reach its own device).
        _, _, got = yield self.client.call("PATCH", "/devices/node-7/desired", self.device,
                                           {"a": 1})
        self.assertIn("needs a write token", got["error"]["message"])
        yield self.assertError(403, "origin_not_allowed", "GET", "/devices", self.read,
                               headers={b"origin": b"http://evil.test"})

    @defer.inlineCallbacks
    def test_404(self):
        """Unknown paths and devices get JSON 404s."""
        yield self.assertError(404, "not_found", "GET", "/nothing", self.read)
        yield self.assertError(404, "unknown_device", "GET", "/devices/ghost", self.read)
        yield self.assertError(404, "unknown_device", "PATCH", "/devices/ghost/desired",
                               self.write, {"a": 1})

    @defer.inlineCallbacks
    def test_405(self):
        """A wrong method gets 405 with Allow."""
        headers = yield self.assertError(405, "method_not_allowed", "DELETE", "/devices", self.write)
        self.assertEqual(header(headers, b"allow"), "GET, HEAD, OPTIONS")

    @defer.inlineCallbacks
    def test_409(self):
        """A patch that would make the state exceed max_state_bytes gets 409 state_too_large."""
        yield self.assertError(409, "state_too_large", "PATCH", "/devices/porch/desired",
                               self.write, {f"k{i}": "x" * 40 for i in range(8)})

    @defer.inlineCallbacks
    def test_413(self):
        """A body over max_request_bytes gets 413 and is not kept."""
        yield self.assertError(413, "request_too_large", "PATCH", "/devices/porch/desired",
                               self.write, {"blob": "x" * 5000})
        status, _, _ = yield self.client.call("GET", "/devices/porch", self.read)
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_415(self):
        """A body that is not JSON by its media type gets 415."""
        yield self.assertError(415, "unsupported_media_type", "PATCH", "/devices/porch/desired",
                               self.write, headers={b"content-type": b"text/plain"}, raw=b"{}")

    @defer.inlineCallbacks
    def test_415_events_and_commands_take_only_json(self):
        """Events and commands are not merge patches: application/merge-patch+json gets 415."""
        merge = {b"content-type": b"application/merge-patch+json"}
        yield self.assertError(415, "unsupported_media_type", "POST", "/devices/node-7/events",
                               self.device, headers=merge, raw=b'{"events": [1]}')
        yield self.assertError(415, "unsupported_media_type", "POST", "/devices/porch/commands",
                               self.write, headers=merge, raw=b'{"op": "reboot"}')
        status, _, _ = yield self.client.call("POST", "/devices/node-7/reported", self.device,
                                              headers=merge, raw=b'{"t": 1}')
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_503_store_error_of_a_command_says_when_to_retry(self):
        """A command whose session record write failed is 503 store_error with Retry-After."""
        class FailingEndpoint:
            def send_command(self, device_number, *commands):
                return defer.fail(StoreError("disk full"))

        self.broker.service.api.commands = CommandSender(self.registry, FailingEndpoint())
        headers = yield self.assertError(503, "store_error", "POST", "/devices/porch/commands",
                                         self.write, {"op": "reboot"})
        self.assertEqual(header(headers, b"retry-after"), "1")
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)

    @defer.inlineCallbacks
    def test_internal_error_log_has_no_query_token(self):
        """A failing request is logged by its path: a ?token= in the query never reaches the log."""
        def broken(api, request, principal, name):
            raise KeyError("bug")

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(api_resource, "ROUTES", {("devices",): {b"GET": ("read", broken)}})
        token = self.read[7:].decode()
        yield self.assertError(500, "internal_error", "GET", "/devices?token=" + token)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        logged = [formatEvent(event) + repr(event) for event in events
                  if "failed" in (event.get("log_format") or "")]
        self.assertTrue(logged)
        self.assertFalse([text for text in logged if token in text])
        # Method and path as text: the log's redaction shows bytes only by length.
        line = formatEvent(redact([event for event in events
                                   if "failed" in (event.get("log_format") or "")][0]))
        self.assertIn("API request GET /api/v1/devices failed", line)

    @defer.inlineCallbacks
    def test_query_tokens_off(self):
        """With [http] query_tokens = false (a reload suffices) ?token= is refused on a GET
        too, saying why; the Authorization header still works, and true brings it back."""
        api = self.broker.service.api
        config = self.broker.service.config
        query = "/devices?token=" + self.read[7:].decode()
        api.reload(replace(config, "http", query_tokens=False))
        yield self.assertError(401, "token_in_query", "GET", query)
        _, _, got = yield self.client.call("GET", query)
        self.assertIn("[http] query_tokens = false", got["error"]["message"])
        status, _, _ = yield self.client.call("GET", "/devices", self.read)
        self.assertEqual(status, 200)
        yield self.assertError(401, "token_in_query", "GET", query, self.read)  # header too
        api.reload(replace(config, "http", query_tokens=True))
        status, _, _ = yield self.client.call("GET", query)
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_429(self):
        """More requests a second than allowed per credential get 429 with Retry-After."""
        api = self.broker.service.api
        api.apply(dataclasses.replace(api.settings, max_requests_per_second=1.0))
        for _ in range(2):
            status, _, _ = yield self.client.call("GET", "/devices", self.read)
            self.assertEqual(status, 200)
        headers = yield self.assertError(429, "rate_limited", "GET", "/devices", self.read)
        self.assertEqual(header(headers, b"retry-after"), "1")
        response = yield treq.get(self.client.base + "/devices", pool=self.client.pool,
                                  headers={b"authorization": [self.read]})
        yield response.content()
        self.assertEqual((response.code, response.phrase), (429, b"Too Many Requests"))
        status, _, _ = yield self.client.call("GET", "/devices", self.write)   # another credential
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_503(self):
        """With max_waiters waiting, another long poll gets 503 with Retry-After."""
        cursor = self.registry.cursor
        first = treq.get(self.client.base + f"/changes?since={cursor}&wait=5",
                         pool=self.client.pool, headers={b"authorization": [self.read]})
        first.addErrback(lambda failure: None)
        yield self.until(lambda: len(self.broker.service.api.room) == 1)
        headers = yield self.assertError(503, "too_many_waiters", "GET",
                                         f"/changes?since={cursor}&wait=5", self.read)
        self.assertEqual(header(headers, b"retry-after"), "1")
        first.cancel()
        yield self.until(lambda: len(self.broker.service.api.room) == 0)

    @defer.inlineCallbacks
    def until(self, condition, limit=2.0):
        """Wait (reactor turns, bounded) until condition() holds."""
        from twisted.internet.task import deferLater
        waited = 0.0
        while not condition():
            self.assertLess(waited, limit, "condition not reached")
            yield deferLater(reactor, 0.01, lambda: None)
            waited += 0.01

    # -- CORS --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_cors_preflight_and_answer(self):
        """An allowed origin's preflight gets 204 with methods and headers; answers carry its origin."""
        status, headers, _ = yield self.client.call(
            "OPTIONS", "/devices/porch/desired",
            headers={b"origin": ORIGIN.encode(), b"access-control-request-method": b"PATCH",
                     b"access-control-request-headers": b"authorization, if-match"})
        self.assertEqual(status, 204)
        self.assertEqual(header(headers, b"access-control-allow-origin"), ORIGIN)
        self.assertEqual(header(headers, b"access-control-allow-methods"), "OPTIONS, PATCH")
        self.assertIn("if-match", header(headers, b"access-control-allow-headers"))
        status, headers, _ = yield self.client.call("GET", "/devices", self.read,
                                                    headers={b"origin": ORIGIN.encode()})
        self.assertEqual((status, header(headers, b"access-control-allow-origin")), (200, ORIGIN))
        self.assertIn("etag", header(headers, b"access-control-expose-headers"))

    @defer.inlineCallbacks
    def test_cors_other_origin_refused(self):
        """A preflight from an origin not configured is refused with 403."""
        yield self.assertError(403, "origin_not_allowed", "OPTIONS", "/devices",
                               headers={b"origin": b"http://elsewhere.test",
                                        b"access-control-request-method": b"GET"})


class PollingDisabledTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, broker_config(self, polling={"enabled": False}))
        yield self.broker.service.registry.add_device("porch")
        _, token = yield self.broker.service.registry.add_token("read")
        self.auth = b"Bearer " + token.encode()
        self.client = Client(self, self.broker.http_url)

    @defer.inlineCallbacks
    def test_polling_endpoints_say_disabled(self):
        """With polling disabled, /changes, /events and waits get 404 polling_disabled; reads work."""
        for path in ("/changes", "/events", "/devices/porch?wait=1"):
            status, _, body = yield self.client.call("GET", path, self.auth)
            self.assertEqual((status, body["error"]["code"]), (404, "polling_disabled"), path)
            self.assertIn("[polling] enabled = false", body["error"]["message"])
        status, _, _ = yield self.client.call("GET", "/devices/porch", self.auth)
        self.assertEqual(status, 200)


class DurableStoreTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_writes_answer_once_durable_in_sqlite(self):
        """With the SQLite store, a desired write is answered and found again after a restart."""
        config = broker_config(self, registry={"backend": "sqlite"})
        broker = yield start_broker(self, config)
        registry = broker.service.registry
        yield registry.add_device("porch")
        _, token = yield registry.add_token("write")
        client = Client(self, broker.http_url)
        status, _, body = yield client.call("PATCH", "/devices/porch/desired",
                                            b"Bearer " + token.encode(), {"led": "on"})
        self.assertEqual((status, body["desired"]), (200, {"led": "on"}))
        yield broker.service.stopService()
        again = yield start_broker(self, config)
        self.assertEqual(again.service.registry.device("porch").desired, {"led": "on"})
        self.assertEqual(again.service.registry.device("porch").version, body["version"])
