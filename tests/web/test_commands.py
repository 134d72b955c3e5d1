"""Commands to devices over REST and WebSocket, end to end: a real broker, a real SSP node.

Integration tests: real UDP, HTTP and WebSocket on 127.0.0.1, waits bounded
by tests.udp.loopback.DEADLINE and tests.web.wsclient.WAIT.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.registry.errors import StoreError
from broker.udp.bridge import TooManyCommands
from broker.web.commands import CommandRefused, CommandSender
from broker.web.websocket.messages import ProtocolError, parse_request
from tests.helpers import loopback_config, start_broker
from tests.udp.loopback import commanded_node, pause, wait_until
from tests.web.test_api_rest import Client
from tests.web.wsclient import connected

#: Seconds a test keeps listening after a delivery, to see that nothing comes twice.
SETTLE = 0.5


def command_config(testcase, ssp=True):
    """A loopback broker with SSP (or not), the REST API and the WebSocket."""
    return loopback_config(testcase,
                           registry={"backend": "memory", "max_state_bytes": 512},
                           ssp={"enabled": ssp, "device_heartbeat": 2.0, "offline_after": 6.0},
                           http={"max_request_bytes": 4096})


class CommandTests(TestCase):
    """POST /devices/NAME/commands and the WebSocket op "command" against live SSP sessions."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, command_config(self))
        self.registry = self.broker.service.registry
        self.endpoint = self.broker.service.ssp_endpoint
        self.pump = yield self.registry.add_device("pump-1")
        yield self.registry.add_device("idle-1")
        _, self.write_token = yield self.registry.add_token("write")
        _, self.read_token = yield self.registry.add_token("read")
        self.client = Client(self, self.broker.http_url)
        self.write = b"Bearer " + self.write_token.encode()
        self.read = b"Bearer " + self.read_token.encode()

    @defer.inlineCallbacks
    def connected_node(self, provisioned):
        """A real SSP node for a device, once the broker holds its session; and its commands."""
        node, commands = commanded_node(self, provisioned.device_number, provisioned.secret,
                                        self.broker.udp_port)
        yield wait_until(self, lambda: self.endpoint.entry_of(provisioned.device_number)
                         is not None, what="the node's session")
        return node, commands

    @defer.inlineCallbacks
    def delivered(self, node, commands, count):
        """Wait for ``count`` commands at the node, its acknowledgement, and a while longer."""
        yield wait_until(self, lambda: len(commands) >= count, what="the command at the node")
        yield wait_until(self, lambda: node.session.idle(), what="the acknowledgement")
        yield pause(SETTLE)

    # -- REST ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_rest_command_reaches_the_node_once(self):
        """A command POSTed with a write token is answered 202 and reaches the node exactly once."""
        node, commands = yield self.connected_node(self.pump)
        status, _, body = yield self.client.call("POST", "/devices/pump-1/commands",
                                                 self.write, {"op": "reboot", "delay": 5})
        self.assertEqual((status, body), (202, {"device": "pump-1", "queued": True}))
        yield self.delivered(node, commands, 1)
        self.assertEqual(commands, [{"op": "reboot", "delay": 5}])

    @defer.inlineCallbacks
    def test_rest_commands_arrive_in_order(self):
        """Commands POSTed one after another reach the node once each, in the order sent."""
        node, commands = yield self.connected_node(self.pump)
        for value in ("first", ["second", 2], {"third": {"$bytes": "AAE="}}):
            status, _, _ = yield self.client.call("POST", "/devices/pump-1/commands",
                                                  self.write, value)
            self.assertEqual(status, 202)
        yield self.delivered(node, commands, 3)
        self.assertEqual(commands, ["first", ["second", 2], {"third": b"\x00\x01"}])

    @defer.inlineCallbacks
    def test_rest_offline_device_gets_409(self):
        """A device without an SSP session gets 409 device_offline and nothing is queued."""
        status, _, body = yield self.client.call("POST", "/devices/idle-1/commands",
                                                 self.write, {"op": "reboot"})
        self.assertEqual((status, body["error"]["code"]), (409, "device_offline"))
        self.assertIsNone(self.endpoint.entry_of(self.registry.device("idle-1").device_number))

    @defer.inlineCallbacks
    def test_rest_errors(self):
        """Unknown device 404, read token 403, bad bodies 400/413/415, no token 401, GET 405."""
        yield self.connected_node(self.pump)
        path = "/devices/pump-1/commands"
        cases = [
            ("/devices/nobody/commands", self.write, {"op": "x"}, None, 404, "unknown_device"),
            (path, self.read, {"op": "x"}, None, 403, "forbidden"),
            (path, None, {"op": "x"}, None, 401, "missing_credentials"),
            (path, self.write, None, b"{not json", 400, "invalid_json"),
            (path, self.write, None, b"null", 400, "invalid_command"),
            (path, self.write, {"bad key!": 1}, None, 400, "invalid_command"),
            (path, self.write, [[[[[[1]]]]]], None, 400, "invalid_command"),
            (path, self.write, {"$bytes": "not base64!"}, None, 400, "invalid_json"),
            (path, self.write, "x" * 600, None, 413, "command_too_large"),
            (path, self.write, "x" * 5000, None, 413, "request_too_large"),
        ]
        for where, auth, body, raw, status, code in cases:
            got, _, answer = yield self.client.call("POST", where, auth, body, raw=raw)
            self.assertEqual((got, answer["error"]["code"]), (status, code), (where, body, raw))
        got, headers, _ = yield self.client.call("POST", path, self.write, raw=b"{}",
                                                 headers={b"content-type": b"text/plain"})
        self.assertEqual(got, 415)
        got, headers, _ = yield self.client.call("GET", path, self.write)
        self.assertEqual((got, headers.getRawHeaders(b"allow")), (405, [b"OPTIONS, POST"]))
        self.assertEqual(self.broker.service.api.commands.counters["queued"], 0)

    # -- WebSocket -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_websocket_command_reaches_the_node_once(self):
        """The op "command" gets a result for its id and reaches the node exactly once."""
        node, commands = yield self.connected_node(self.pump)
        client = yield connected(self, self.broker.http_url, self.write_token)
        answer = yield client.request({"op": "command", "id": "c1", "device": "pump-1",
                                       "command": {"op": "blink", "times": 3}})
        self.assertEqual(answer, {"type": "result", "id": "c1", "op": "command",
                                  "device": "pump-1", "queued": True})
        yield self.delivered(node, commands, 1)
        self.assertEqual(commands, [{"op": "blink", "times": 3}])

    @defer.inlineCallbacks
    def test_websocket_errors_carry_the_request_id(self):
        """Offline, unknown, invalid and read-token commands get precise errors with their ids."""
        yield self.connected_node(self.pump)
        writer = yield connected(self, self.broker.http_url, self.write_token)
        reader = yield connected(self, self.broker.http_url, self.read_token)
        cases = [
            (writer, {"device": "idle-1", "command": "x"}, "device_offline"),
            (writer, {"device": "nobody", "command": "x"}, "unknown_device"),
            (writer, {"device": "pump-1", "command": None}, "invalid_field"),
            (writer, {"device": "pump-1"}, "invalid_field"),
            (writer, {"device": "pump-1", "command": [[[[[[1]]]]]]}, "invalid_command"),
            (writer, {"device": "pump-1", "command": "x" * 600}, "command_too_large"),
            (writer, {"device": "pump-1", "command": "x", "extra": 1}, "invalid_field"),
            (reader, {"device": "pump-1", "command": "x"}, "forbidden"),
        ]
        for number, (client, fields, code) in enumerate(cases):
            answer = yield client.request({"op": "command", "id": number, **fields})
            self.assertEqual((answer["type"], answer["id"], answer["op"], answer["code"]),
                             ("error", number, "command", code), fields)
        self.assertEqual(self.broker.service.websocket_factory.commands.counters["queued"], 0)


    @defer.inlineCallbacks
    def test_a_full_command_queue_is_refused_on_both(self):
        """A session holding the most unacknowledged commands it may: REST answers 429
        too_many_commands, the WebSocket a too_many_commands error, and nothing is queued."""
        node, commands = yield self.connected_node(self.pump)
        # No room at all: every command finds the device's queue full.
        self.patch(self.endpoint._bridge, "max_pending_commands", 0)
        status, headers, body = yield self.client.call("POST", "/devices/pump-1/commands",
                                                       self.write, {"op": "reboot"})
        self.assertEqual((status, body["error"]["code"]), (429, "too_many_commands"))
        self.assertIn("not yet acknowledged", body["error"]["message"])
        client = yield connected(self, self.broker.http_url, self.write_token)
        answer = yield client.request({"op": "command", "id": "c", "device": "pump-1",
                                       "command": "x"})
        self.assertEqual((answer["type"], answer["id"], answer["code"]),
                         ("error", "c", "too_many_commands"))
        yield pause(SETTLE)
        self.assertEqual(commands, [])
        record = self.registry.session_record(self.pump.device_number)
        self.assertEqual(record.local_state, b"")


class WithoutSSPTests(TestCase):
    """A broker with [ssp] enabled = false refuses commands with a precise code."""

    timeout = 30

    @defer.inlineCallbacks
    def test_ssp_disabled(self):
        """REST answers 409 ssp_disabled and the WebSocket an ssp_disabled error."""
        broker = yield start_broker(self, command_config(self, ssp=False))
        registry = broker.service.registry
        yield registry.add_device("pump-1")
        _, token = yield registry.add_token("write")
        status, _, body = yield Client(self, broker.http_url).call(
            "POST", "/devices/pump-1/commands", b"Bearer " + token.encode(), {"op": "x"})
        self.assertEqual((status, body["error"]["code"]), (409, "ssp_disabled"))
        client = yield connected(self, broker.http_url, token)
        answer = yield client.request({"op": "command", "id": 1, "device": "pump-1",
                                       "command": {"op": "x"}})
        self.assertEqual((answer["type"], answer["code"]), ("error", "ssp_disabled"))


class RecordingEndpoint:
    """Stands in for SSPEndpoint.send_command: records what it is given, online or not."""

    def __init__(self, online):
        self.online = online
        self.sent = []

    def send_command(self, device_number, *commands):
        if not self.online:
            return None
        self.sent.append((device_number, commands))
        return defer.succeed(True)


class FullEndpoint:
    """Stands in for SSPEndpoint.send_command of a session whose command queue is full."""

    def send_command(self, device_number, *commands):
        raise TooManyCommands(4, 4)


class CommandSenderTests(SynchronousTestCase):
    """The checks every command passes before it reaches an SSP session."""

    def setUp(self):
        self.registry = DeviceRegistry(MemoryStore(), clock=Clock(),
                                       settings=RegistrySettings(reload_interval=0,
                                                                 max_state_bytes=256))
        self.device = self.successResultOf(self.registry.add_device("pump-1"))

    def refusal(self, sender, name, command):
        with self.assertRaises(CommandRefused) as caught:
            sender.send(name, command)
        return caught.exception.status, caught.exception.code

    def test_queues_the_frozen_command_for_the_device_number(self):
        """A valid command goes to send_command with the device's number, frozen, and is counted."""
        endpoint = RecordingEndpoint(online=True)
        sender = CommandSender(self.registry, endpoint)
        sender.send("pump-1", {"op": "set", "values": [1, 2]})
        self.assertEqual(endpoint.sent, [(self.device.device_number,
                                          ({"op": "set", "values": (1, 2)},))])
        self.assertEqual(sender.counters["queued"], 1)

    def test_refusals(self):
        """Unknown device, null, bad key, depth, NaN, size, no SSP and offline: each its code."""
        online = CommandSender(self.registry, RecordingEndpoint(online=True))
        self.assertEqual(self.refusal(online, "nobody", 1), (404, "unknown_device"))
        self.assertEqual(self.refusal(online, "pump-1", None), (400, "invalid_command"))
        self.assertEqual(self.refusal(online, "pump-1", {"a b": 1}), (400, "invalid_command"))
        self.assertEqual(self.refusal(online, "pump-1", [[[[[[1]]]]]]), (400, "invalid_command"))
        self.assertEqual(self.refusal(online, "pump-1", float("nan")), (400, "invalid_command"))
        self.assertEqual(self.refusal(online, "pump-1", "x" * 300), (413, "command_too_large"))
        self.assertEqual(self.refusal(CommandSender(self.registry), "pump-1", 1),
                         (409, "ssp_disabled"))
        offline = CommandSender(self.registry, RecordingEndpoint(online=False))
        self.assertEqual(self.refusal(offline, "pump-1", 1), (409, "device_offline"))
        full = CommandSender(self.registry, FullEndpoint())
        self.assertEqual(self.refusal(full, "pump-1", 1), (429, "too_many_commands"))
        self.assertEqual(full.counters["too_many_commands"], 1)
        self.assertEqual(online.counters["invalid_command"], 4)
        self.assertEqual(online.counters["queued"], 0)


class RelayingRegistry:
    """The relay side of a shared registry: keeps the callback relayed commands go to."""

    def relay_to(self, deliver):
        self.deliver = deliver


class RelayedToFullQueueTests(SynchronousTestCase):

    def test_relayed_command_for_a_full_queue_is_dropped_and_counted(self):
        """A command relayed to this process for a session whose queue is full is not taken, counted, and logs no failure."""
        registry = RelayingRegistry()
        sender = CommandSender(registry, FullEndpoint())
        self.assertIs(registry.deliver(7, "x"), False)
        self.assertEqual(sender.counters["too_many_commands"], 1)
        self.assertEqual(self.flushLoggedErrors(), [])


class AnsweringEndpoint:
    """Stands in for SSPEndpoint.send_command with a given answer (a Deferred)."""

    def __init__(self, answer):
        self.answer = answer

    def send_command(self, device_number, *commands):
        return self.answer


class DurableAnswerTests(SynchronousTestCase):
    """The answer waits for the session record; a failed write or an ended session says so."""

    def setUp(self):
        self.registry = DeviceRegistry(MemoryStore(), clock=Clock(),
                                       settings=RegistrySettings(reload_interval=0))
        self.successResultOf(self.registry.add_device("pump-1"))

    def test_answer_waits_for_the_record(self):
        """queued: true only once the endpoint's Deferred fired."""
        pending = defer.Deferred()
        answer = CommandSender(self.registry, AnsweringEndpoint(pending)).send("pump-1", 1)
        self.assertNoResult(answer)
        pending.callback(True)
        self.assertEqual(self.successResultOf(answer), {"queued": True})

    def test_store_failure_is_503_store_error(self):
        """A record write that failed is 503 store_error, counted."""
        sender = CommandSender(self.registry,
                               AnsweringEndpoint(defer.fail(StoreError("disk full"))))
        failure = self.failureResultOf(sender.send("pump-1", 1), CommandRefused)
        self.assertEqual((failure.value.status, failure.value.code), (503, "store_error"))
        self.assertEqual(sender.counters["store_error"], 1)
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)

    def test_session_ended_meanwhile_is_409(self):
        """A session that ended before the command was queued is 409 device_offline."""
        sender = CommandSender(self.registry, AnsweringEndpoint(defer.succeed(False)))
        failure = self.failureResultOf(sender.send("pump-1", 1), CommandRefused)
        self.assertEqual((failure.value.status, failure.value.code), (409, "device_offline"))


class CommandMessageTests(SynchronousTestCase):
    """The WebSocket op "command" as parsed from a text message."""

    def test_parses_device_and_any_command(self):
        """device and command are the request's arguments; the command may be any non-null value."""
        request = parse_request(b'{"op": "command", "id": 4, "device": "pump-1", "command": [1]}')
        self.assertEqual((request.op, request.request_id, request.args),
                         ("command", 4, {"device": "pump-1", "command": [1]}))

    def test_null_or_missing_fields_are_invalid(self):
        """A null command, a missing device or an unknown field is invalid_field naming it."""
        for payload, name in ((b'{"op": "command", "device": "p", "command": null}', "command"),
                              (b'{"op": "command", "command": 1}', "device"),
                              (b'{"op": "command", "device": "p", "command": 1, "x": 0}', "x")):
            with self.assertRaises(ProtocolError) as caught:
                parse_request(payload)
            self.assertEqual((caught.exception.code, caught.exception.details["field"]),
                             ("invalid_field", name))


class RelayAnswerTests(SynchronousTestCase):
    """What a relayed command's sender is told, from how many processes heard it."""

    def test_heard_by_another_process(self):
        """Two or more receivers (this process is one of them): queued and relayed."""
        self.assertEqual(CommandSender.relay_answer(2, "pump"), {"queued": True, "relayed": True})

    def test_heard_by_nobody_else(self):
        """Only this process heard it: no broker holds the session, 409 device_offline."""
        with self.assertRaises(CommandRefused) as caught:
            CommandSender.relay_answer(1, "pump")
        self.assertEqual((caught.exception.status, caught.exception.code), (409, "device_offline"))

    def test_redis_did_not_take_it(self):
        """Zero receivers means the publish failed: 503 relay_failed, so the client retries."""
        with self.assertRaises(CommandRefused) as caught:
            CommandSender.relay_answer(0, "pump")
        self.assertEqual((caught.exception.status, caught.exception.code), (503, "relay_failed"))
