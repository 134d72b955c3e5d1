"""Idempotency-Key on the API's writes: a retry is answered as the first try, never applied twice.

Real HTTP against brokers on loopback (memory registry, SQLite with a store
that fails as a full disk would, and Redis with too few replicas or a
connection cut mid-write); the bounds of the remembered keys
are checked on IdempotencyKeys itself with a task.Clock.
"""

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry.errors import StoreError
from broker.registry.redis_admin import RedisAdmin
from broker.registry.redis_connection import RedisOptions
from broker.ssp.keys import format_key
from broker.web.api.errors import ApiError, not_durable, outcome_unknown
from broker.web.api.idempotency import ENTRY_BYTES, IdempotencyKeys
from tests.helpers import start_broker
from tests.scale.redis_support import CuttingProxy, start_server
from tests.web.test_api_not_durable import break_storage, events_in, repair
from tests.web.test_api_rest import ORIGIN, Client, broker_config, header


class IdempotentWriteTests(TestCase):
    """Writes with an Idempotency-Key, over HTTP (memory registry)."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, broker_config(self))
        self.registry = self.broker.service.registry
        self.keys = {}
        for name in ("porch", "hall"):
            prov = yield self.registry.add_device(name)
            self.keys[name] = b"Device " + prov.key.encode()
        _, token = yield self.registry.add_token("write")
        self.write = b"Bearer " + token.encode()
        self.client = Client(self, self.broker.http_url)

    def send(self, path, body, key, auth=None, method="POST", **headers):
        sent = {b"idempotency-key": key, **{k.replace("_", "-").encode(): v
                                            for k, v in headers.items()}}
        return self.client.call(method, path, auth or self.keys["porch"], body, sent)

    @defer.inlineCallbacks
    def test_retried_events_are_answered_and_not_applied_again(self):
        """Events sent twice with one key are applied once; the retry gets the first
        answer (same body and ETag) marked Idempotent-Replayed."""
        first = yield self.send("/devices/porch/events", {"events": [1]}, b"k-1")
        again = yield self.send("/devices/porch/events", {"events": [1]}, b"k-1")
        self.assertEqual((first[0], again[0]), (200, 200))
        self.assertEqual(again[2], first[2])
        self.assertEqual(header(again[1], b"etag"), header(first[1], b"etag"))
        self.assertEqual(header(again[1], b"idempotent-replayed"), "true")
        self.assertIsNone(header(first[1], b"idempotent-replayed"))
        self.assertEqual(self.registry.device("porch").version, first[2]["version"])
        _, _, device = yield self.client.call("GET", "/devices/porch", self.keys["porch"])
        self.assertEqual(events_in(device), [[1]])

    @defer.inlineCallbacks
    def test_new_key_is_a_new_write(self):
        """The same events with another key (or none) are another change."""
        first = yield self.send("/devices/porch/events", {"events": [1]}, b"k-1")
        second = yield self.send("/devices/porch/events", {"events": [1]}, b"k-2")
        self.assertEqual(second[2]["version"], first[2]["version"] + 1)

    @defer.inlineCallbacks
    def test_key_with_another_request_is_409(self):
        """A key sent again with another body or path is 409 idempotency_key_reused,
        and nothing is applied."""
        yield self.send("/devices/porch/events", {"events": [1]}, b"k-1")
        version = self.registry.device("porch").version
        for path, body in (("/devices/porch/events", {"events": [2]}),
                           ("/devices/porch/reported", {"temp": 1})):
            status, _, answer = yield self.send(path, body, b"k-1")
            self.assertEqual((status, answer["error"]["code"]), (409, "idempotency_key_reused"))
        self.assertEqual(self.registry.device("porch").version, version)

    @defer.inlineCallbacks
    def test_keys_are_per_device(self):
        """One key used by two devices is two writes, each answered with its device."""
        porch = yield self.send("/devices/porch/events", {"events": [1]}, b"k-1")
        hall = yield self.send("/devices/hall/events", {"events": [1]}, b"k-1",
                               self.keys["hall"])
        self.assertEqual((porch[2]["name"], hall[2]["name"]), ("porch", "hall"))
        self.assertIsNone(header(hall[1], b"idempotent-replayed"))

    @defer.inlineCallbacks
    def test_refused_write_forgets_its_key(self):
        """A write refused (nothing applied) leaves its key free: the retry runs anew."""
        status, _, answer = yield self.send("/devices/porch/reported", {"x": {"$bytes": "!"}},
                                            b"k-1")
        self.assertEqual((status, answer["error"]["code"]), (400, "invalid_json"))
        status, _, answer = yield self.send("/devices/porch/reported", {"temp": "x" * 300},
                                            b"k-2")
        self.assertEqual((status, answer["error"]["code"]), (409, "state_too_large"))
        status, _, answer = yield self.send("/devices/porch/reported", {"temp": "x" * 300},
                                            b"k-2")
        self.assertEqual((status, answer["error"]["code"]), (409, "state_too_large"))
        self.assertEqual(len(self.broker.service.api.idempotency), 0)

    @defer.inlineCallbacks
    def test_retried_desired_patch_with_if_match_is_replayed(self):
        """A desired patch with If-Match sent again with its key gets its 200 again,
        not 412 (the version it named has moved on because of it)."""
        version = self.registry.device("porch").version
        first = yield self.send("/devices/porch/desired", {"led": "on"}, b"d-1", self.write,
                                "PATCH", if_match=b'"%d"' % version)
        again = yield self.send("/devices/porch/desired", {"led": "on"}, b"d-1", self.write,
                                "PATCH", if_match=b'"%d"' % version)
        self.assertEqual((first[0], again[0]), (200, 200))
        self.assertEqual(again[2]["version"], first[2]["version"])
        self.assertEqual(self.registry.device("porch").version, first[2]["version"])
        stale = yield self.send("/devices/porch/desired", {"led": "on"}, b"d-2", self.write,
                                "PATCH", if_match=b'"%d"' % version)
        self.assertEqual(stale[0], 412)

    @defer.inlineCallbacks
    def test_malformed_key_is_400(self):
        """An Idempotency-Key that is empty, too long or not visible ASCII is 400
        invalid_parameter, and nothing is applied."""
        version = self.registry.device("porch").version
        for key in (b"", b"k" * 256, "clé".encode()):
            status, _, answer = yield self.send("/devices/porch/events", {"events": [1]}, key)
            self.assertEqual((status, answer["error"]["code"]), (400, "invalid_parameter"), key)
        self.assertEqual(self.registry.device("porch").version, version)
        status, _, _ = yield self.send("/devices/porch/events", {"events": [1]},
                                       b'"' + b"k" * 253 + b'"')
        self.assertEqual(status, 200)


    @defer.inlineCallbacks
    def test_browsers_may_send_the_key(self):
        """A CORS preflight allows the Idempotency-Key header and exposes Idempotent-Replayed."""
        status, headers, _ = yield self.client.call(
            "OPTIONS", "/devices/porch/desired",
            headers={b"origin": ORIGIN.encode(), b"access-control-request-method": b"PATCH",
                     b"access-control-request-headers": b"idempotency-key"})
        self.assertEqual(status, 204)
        self.assertIn("idempotency-key", header(headers, b"access-control-allow-headers"))
        self.assertIn("idempotent-replayed", header(headers, b"access-control-expose-headers"))


class NotDurableRetryTests(TestCase):
    """A not_durable write retried with its key, over HTTP (SQLite registry)."""

    timeout = 30

    @defer.inlineCallbacks
    def test_retry_of_not_durable_events_stores_them_once(self):
        """Events answered 503 not_durable and retried with their key are not applied
        again: the retry is not_durable while the store fails, 200 once it stored them,
        and after a restart the device holds them once."""
        config = broker_config(self, registry={"backend": "sqlite"})
        broker = yield start_broker(self, config)
        registry = broker.service.registry
        prov = yield registry.add_device("porch")
        auth = b"Device " + prov.key.encode()
        client = Client(self, broker.http_url)
        key = {b"idempotency-key": b"batch-7"}
        broken = break_storage(registry)
        status, _, body = yield client.call("POST", "/devices/porch/events", auth,
                                            {"events": [2]}, key)
        self.assertEqual((status, body["error"]["code"]), (503, "not_durable"))
        status, _, body = yield client.call("POST", "/devices/porch/events", auth,
                                            {"events": [2]}, key)
        self.assertEqual((status, body["error"]["code"]), (503, "not_durable"))
        repair(broken)
        status, headers, body = yield client.call("POST", "/devices/porch/events", auth,
                                                  {"events": [2]}, key)
        self.assertEqual(status, 200, body)
        self.assertEqual(events_in(body), [[2]])
        self.assertEqual(header(headers, b"etag"), '"%d"' % body["version"])
        yield broker.service.stopService()
        again = yield start_broker(self, config)
        _, _, device = yield Client(self, again.http_url).call("GET", "/devices/porch", auth)
        self.assertEqual(events_in(device), [[2]])


class RedisStoreFailureTests(TestCase):
    """Writes with a key on a broker over Redis whose calls fail (a real redis-server)."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, port, **registry):
        """A broker on Redis at ``port`` (through a proxy, maybe) with device "porch";
        returns (its registry, a Client, the device's credential, a write token's)."""
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        admin = RedisAdmin.open(RedisOptions(url=url))
        self.addCleanup(admin.close)
        _, secret = admin.add_device("porch")
        _, token = admin.add_token("write")
        config = broker_config(self, registry={"backend": "redis",
                                               "redis_url": f"redis://127.0.0.1:{port}/0",
                                               **registry})
        broker = yield start_broker(self, config)
        return (broker.service.registry, Client(self, broker.http_url),
                b"Device " + format_key(secret).encode(), b"Bearer " + token.encode())

    @defer.inlineCallbacks
    def test_events_redis_ran_without_replicas_are_not_durable_and_stored_once(self):
        """Events Redis applied but no replica acknowledged (redis_wait_replicas) are
        answered 503 not_durable, "applied", no Retry-After (not store_error: "send it
        again"), and the retry with their key does not apply them a second time."""
        self.redis_port = start_server(self)
        registry, client, auth, _ = yield self.start(
            self.redis_port, redis_wait_replicas=1, redis_wait_timeout=0.1)
        key = {b"idempotency-key": b"batch-1"}
        status, headers, body = yield client.call("POST", "/devices/porch/events", auth,
                                                  {"events": ["press"]}, key)
        self.assertEqual((status, body["error"]["code"], body["error"].get("applied")),
                         (503, "not_durable", True))
        self.assertIsNone(header(headers, b"retry-after"))
        version = registry.device("porch").version
        yield client.call("POST", "/devices/porch/events", auth, {"events": ["press"]}, key)
        _, _, device = yield client.call("GET", "/devices/porch", auth)
        self.assertEqual((events_in(device), device["version"]), ([["press"]], version))
        # (the dashboard's first-run token misses WAIT too)
        self.flushLoggedErrors(StoreError)

    @defer.inlineCallbacks
    def test_desired_patch_with_if_match_in_doubt_is_outcome_unknown_until_the_key_expires(self):
        """A desired patch with If-Match whose Redis call was cut (Redis may or may not
        have it) is answered 503 outcome_unknown without Retry-After, and its retry with
        the same key is answered so again without being run: it applies nothing."""
        self.redis_port = start_server(self)
        proxy = CuttingProxy(self, self.redis_port)
        registry, client, _, write = yield self.start(proxy.port)
        key = {b"idempotency-key": b"mode-1", b"if-match": b'"1"'}
        proxy.cut_request(b"in-doubt")
        for _ in range(2):
            status, headers, body = yield client.call(
                "PATCH", "/devices/porch/desired", write, {"mode": "in-doubt"}, key)
            self.assertEqual((status, body["error"]["code"]), (503, "outcome_unknown"))
            self.assertIsNone(header(headers, b"retry-after"))
            self.assertNotIn("applied", body["error"])
        self.assertEqual(proxy.cuts, 1)
        self.assertEqual(registry.device("porch").version, 1)


class KeyBoundsTests(SynchronousTestCase):
    """What IdempotencyKeys remembers: bounded in age, count per device and bytes."""

    def setUp(self):
        self.clock = task.Clock()
        self.runs = 0

    def writer(self, answer=b"{}"):
        def write():
            self.runs += 1
            return defer.succeed((200, answer, None))
        return write

    def send(self, keys, scope, answer=b"{}"):
        return keys.once(scope, b"print", self.writer(answer), self.fail)

    def test_keys_expire_after_the_window(self):
        """A key is answered from memory within the window, and runs anew after it."""
        keys = IdempotencyKeys(self.clock, window=60)
        self.successResultOf(self.send(keys, (1, "device:a", b"k")))
        self.clock.advance(59)
        self.assertEqual(self.send(keys, (1, "device:a", b"k"))[0], 200)   # a replay (no Deferred)
        self.assertEqual(self.runs, 1)
        self.clock.advance(1)
        self.successResultOf(self.send(keys, (1, "device:a", b"k")))
        self.assertEqual((self.runs, len(keys)), (2, 1))

    def test_keys_per_device_are_bounded(self):
        """A device keeps its newest per_device keys; other devices keep theirs."""
        keys = IdempotencyKeys(self.clock, per_device=3)
        self.successResultOf(self.send(keys, (2, "device:b", b"other")))
        for n in range(5):
            self.successResultOf(self.send(keys, (1, "device:a", b"k%d" % n)))
        self.assertEqual(len(keys), 4)
        self.send(keys, (1, "device:a", b"k4"))
        self.send(keys, (2, "device:b", b"other"))
        self.assertEqual(self.runs, 6)              # both answered from memory
        self.successResultOf(self.send(keys, (1, "device:a", b"k0")))
        self.assertEqual(self.runs, 7)              # forgotten: ran again

    def test_answers_are_bounded_in_bytes(self):
        """The oldest keys are forgotten while the answers kept exceed max_bytes."""
        keys = IdempotencyKeys(self.clock, max_bytes=3 * (ENTRY_BYTES + 1000))
        for n in range(10):
            self.successResultOf(self.send(keys, (n, "device:a", b"k"), b"x" * 990))
        self.assertLessEqual(keys.bytes, keys.max_bytes)
        self.assertEqual(len(keys), 3)
        self.assertEqual(keys.counters["forgotten"], 7)

    def test_key_in_flight_is_409(self):
        """A retry while the first request waits for its answer is 409 idempotency_key_in_use."""
        keys = IdempotencyKeys(self.clock)
        first = keys.once((1, "device:a", b"k"), b"print", defer.Deferred, self.fail)
        with self.assertRaises(ApiError) as raised:
            keys.once((1, "device:a", b"k"), b"print", self.fail, self.fail)
        self.assertEqual((raised.exception.status, raised.exception.code),
                         (409, "idempotency_key_in_use"))
        self.assertNoResult(first)

    def test_not_durable_retry_confirms_instead_of_writing(self):
        """A retry of a not_durable write waits for the store (confirm), never writes again."""
        keys = IdempotencyKeys(self.clock)
        self.failureResultOf(keys.once((1, "device:a", b"k"), b"print",
                                       lambda: defer.fail(not_durable()), self.fail), ApiError)
        answer = keys.once((1, "device:a", b"k"), b"print", self.fail,
                           lambda: defer.succeed((200, b"now", None)))
        self.assertEqual(self.successResultOf(answer), (200, b"now", None))
        self.assertEqual(keys.once((1, "device:a", b"k"), b"print", self.fail, self.fail),
                         (200, b"now", {b"idempotent-replayed": b"true"}))

    def test_outcome_unknown_retry_is_answered_so_again_and_never_runs(self):
        """A retry of a write answered outcome_unknown (maybe applied) gets outcome_unknown
        again: it neither writes again nor confirms (nothing could tell it stored)."""
        keys = IdempotencyKeys(self.clock)
        self.failureResultOf(keys.once((1, "device:a", b"k"), b"print",
                                       lambda: defer.fail(outcome_unknown()), self.fail),
                             ApiError)
        with self.assertRaises(ApiError) as raised:
            keys.once((1, "device:a", b"k"), b"print", self.fail, self.fail)
        self.assertEqual((raised.exception.status, raised.exception.code,
                          raised.exception.headers), (503, "outcome_unknown", {}))
        self.assertEqual(len(keys), 1)
