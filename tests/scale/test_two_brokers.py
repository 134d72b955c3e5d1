"""Two whole brokers sharing Redis: a device on broker A, a dashboard on broker B.

Both brokers run in the test's reactor on loopback ports (standing for two
hosts); the device is a real SSP node over UDP, the dashboard a real HTTP
client.
"""

import json

import treq
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from broker.node.client import SSPNode
from tests.helpers import http_pool

from .support import ClusterRedis, SingleRedis, start_two_brokers, wait_until


class TwoBrokersTestsMixin:
    """A fleet split over two brokers behaves as one broker."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        yield start_two_brokers(self)
        self.device = yield self.ra.add_device("sensor-1")
        _, token = yield self.rb.add_token("write")
        self.headers = {b"authorization": [b"Bearer " + token.encode()]}
        yield wait_until(self, lambda: self.ra.check_token(token) == "write", what="token on A")
        self.pool = http_pool(self)

    def request(self, broker, method, path, body=None, headers=None):
        all_headers = dict(self.headers)
        all_headers.update(headers or {})
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            all_headers[b"content-type"] = [b"application/json"]
        return treq.request(method, broker.http_url + "/api/v1" + path, data=data,
                            headers=all_headers, pool=self.pool)

    @defer.inlineCallbacks
    def get_json(self, broker, path):
        response = yield self.request(broker, "GET", path)
        body = yield response.json()
        return response.code, body

    def node_on(self, broker):
        node = SSPNode(self.device.device_number, self.device.secret,
                       ("127.0.0.1", broker.udp_port), heartbeat=1.0)
        node.start()
        self.addCleanup(node.stop)
        return node

    @defer.inlineCallbacks
    def test_device_on_a_dashboard_on_b(self):
        """B's HTTP API shows what the device reports to A, and a desired change made on B reaches the device."""
        node = self.node_on(self.a)
        node.report({"temperature": 21.5})
        state = {}

        @defer.inlineCallbacks
        def poll():
            code, body = yield self.get_json(self.b, "/devices/sensor-1")
            state.update(body)
            return code

        for _ in range(400):
            yield poll()
            if state.get("reported") == {"temperature": 21.5}:
                break
            yield wait_until(self, lambda: True)
        self.assertEqual(state["reported"], {"temperature": 21.5})
        self.assertTrue(state["connection"]["online"])
        response = yield self.request(self.b, "PATCH", "/devices/sensor-1/desired", {"led": "on"})
        self.assertEqual(response.code, 200, (yield response.text()))
        yield wait_until(self, lambda: node.desired.get("led") == "on", what="desired at device")

    @defer.inlineCallbacks
    def test_if_match_writes_on_both_brokers_exactly_one_wins(self):
        """PATCH with the same If-Match version on A and B at once: one 200, one 412."""
        yield wait_until(self, lambda: self.rb.device("sensor-1") is not None, what="B knows it")
        version = self.ra.device("sensor-1").version
        match = {b"if-match": [f'"{version}"'.encode()]}
        responses = yield defer.gatherResults([
            self.request(self.a, "PATCH", "/devices/sensor-1/desired", {"mode": "a"}, match),
            self.request(self.b, "PATCH", "/devices/sensor-1/desired", {"mode": "b"}, match)])
        self.assertEqual(sorted(r.code for r in responses), [200, 412])
        yield wait_until(self, lambda: self.ra.device("sensor-1").version == version + 1
                         and self.rb.device("sensor-1").version == version + 1, what="in step")
        self.assertEqual(self.ra.device("sensor-1").desired["mode"],
                         self.rb.device("sensor-1").desired["mode"])

    @defer.inlineCallbacks
    def test_cursor_from_a_resumes_on_b(self):
        """A /changes cursor handed out by A, given to B, yields exactly the changes after it."""
        code, first = yield self.get_json(self.a, "/changes?since=0")
        self.assertEqual(code, 200)
        yield self.ra.update_desired("sensor-1", {"fan": 3})
        yield wait_until(self, lambda: self.rb.cursor >= self.ra.cursor, what="B caught up")
        code, body = yield self.get_json(self.b, f"/changes?since={first['cursor']}")
        self.assertEqual(code, 200)
        self.assertEqual([(d["name"], d["desired"]) for d in body["devices"]],
                         [("sensor-1", {"fan": 3})])
        self.assertEqual(body["cursor"], self.ra.cursor)


class TwoBrokersSingleRedisTests(SingleRedis, TwoBrokersTestsMixin, TestCase):
    """Two brokers on one Redis server."""


class TwoBrokersClusterTests(ClusterRedis, TwoBrokersTestsMixin, TestCase):
    """Two brokers on a three-node Redis Cluster."""
