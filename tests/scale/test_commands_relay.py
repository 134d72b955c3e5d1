"""Commands relayed between two brokers sharing Redis: the device's session on
broker A, the command sent to broker B over REST.

Both brokers run in the test's reactor on loopback ports; the device is a
real SSP node over UDP, the client real HTTP, Redis a real redis-server.
"""

import json

import treq
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.helpers import http_pool
from tests.udp.loopback import commanded_node, pause

from .support import ClusterRedis, SingleRedis, start_two_brokers, wait_until

#: Seconds a test keeps listening after a delivery, to see that nothing comes twice.
SETTLE = 0.5


class CommandRelayTestsMixin:
    """A command sent to the broker without the device's session reaches it through Redis."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        yield start_two_brokers(self)
        self.device = yield self.ra.add_device("pump-1")
        yield self.ra.add_device("idle-1")
        _, token = yield self.ra.add_token("write")
        self.headers = {b"authorization": [b"Bearer " + token.encode()],
                        b"content-type": [b"application/json"]}
        yield wait_until(self, lambda: self.rb.check_token(token) == "write"
                         and self.rb.device("idle-1") is not None, what="B caught up")
        self.pool = http_pool(self)

    @defer.inlineCallbacks
    def post_command(self, broker, name, command):
        response = yield treq.post(f"{broker.http_url}/api/v1/devices/{name}/commands",
                                   data=json.dumps(command).encode(), headers=self.headers,
                                   pool=self.pool)
        body = yield response.json()
        return response.code, body

    @defer.inlineCallbacks
    def node_on_a(self):
        """A real SSP node connected to A, once B's replica says the device is online."""
        node, commands = commanded_node(self, self.device.device_number, self.device.secret,
                                        self.a.udp_port)
        yield wait_until(self, lambda: self.rb.device("pump-1").online, what="online on B")
        return node, commands

    @defer.inlineCallbacks
    def test_command_on_b_reaches_node_on_a_once(self):
        """A command POSTed to B is answered 202 and reaches the node connected to A exactly once."""
        node, commands = yield self.node_on_a()
        self.assertIsNone(self.b.service.ssp_endpoint.entry_of(self.device.device_number))
        code, body = yield self.post_command(self.b, "pump-1", {"op": "reboot", "delay": 5})
        self.assertEqual((code, body),
                         (202, {"device": "pump-1", "queued": True, "relayed": True}))
        yield wait_until(self, lambda: len(commands) >= 1, what="the command at the node")
        yield wait_until(self, lambda: node.session.idle(), what="the acknowledgement")
        yield pause(SETTLE)
        self.assertEqual(commands, [{"op": "reboot", "delay": 5}])
        self.assertEqual(self.rb.counters["command_relayed"], 1)
        self.assertEqual(self.ra.counters["command_relay_delivered"], 1)

    @defer.inlineCallbacks
    def test_commands_relayed_in_order(self):
        """Commands POSTed to B one after another reach the node on A once each, in order."""
        node, commands = yield self.node_on_a()
        for value in ("first", ["second", 2], {"third": {"$bytes": "AAE="}}):
            code, _ = yield self.post_command(self.b, "pump-1", value)
            self.assertEqual(code, 202)
        yield wait_until(self, lambda: len(commands) >= 3, what="the commands at the node")
        yield wait_until(self, lambda: node.session.idle(), what="the acknowledgement")
        yield pause(SETTLE)
        self.assertEqual(commands, ["first", ["second", 2], {"third": b"\x00\x01"}])

    @defer.inlineCallbacks
    def test_offline_device_still_gets_409(self):
        """A device the shared registry says is offline gets 409 device_offline, nothing relayed."""
        code, body = yield self.post_command(self.b, "idle-1", {"op": "reboot"})
        self.assertEqual((code, body["error"]["code"]), (409, "device_offline"))
        self.assertEqual(self.rb.counters["command_relayed"], 0)

    @defer.inlineCallbacks
    def test_damaged_relay_message_is_dropped_and_counted(self):
        """A message on the command channel that is not a relayed command is counted and dropped."""
        node, commands = yield self.node_on_a()
        store = self.ra._store
        client = store._connector.client()
        self.assertGreaterEqual(client.publish(store.key_commands, b"\xff\x00"), 2)
        yield wait_until(self, lambda: self.ra.counters["command_relay_damaged"] == 1
                         and self.rb.counters["command_relay_damaged"] == 1, what="drops")
        code, _ = yield self.post_command(self.b, "pump-1", "after")
        self.assertEqual(code, 202)
        yield wait_until(self, lambda: commands == ["after"], what="the next command")


class CommandRelaySingleRedisTests(SingleRedis, CommandRelayTestsMixin, TestCase):
    """Two brokers on one Redis server."""


class CommandRelayClusterTests(ClusterRedis, CommandRelayTestsMixin, TestCase):
    """Two brokers on a three-node Redis Cluster."""
