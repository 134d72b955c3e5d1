"""Slow dashboards: bounded memory while they do not read, latest state when they do."""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from broker.web.websocket.messages import CLOSE_TOKEN_REVOKED, CLOSE_TOO_SLOW
from tests.web.wsclient import connected, eventually, start_fleet

DEVICES = tuple(f"dev-{i:02d}" for i in range(20))
PAD = "x" * 2000


def buffered(transport) -> int:
    """Bytes a Twisted TCP transport holds in user space, not yet given to the kernel."""
    return len(transport.dataBuffer) + transport._tempDataLen


def server_side(fleet):
    """The broker's protocol object of the only connected dashboard."""
    (client,) = fleet.factory.clients
    return client


def shrink_socket_buffers(client, server) -> None:
    """Small fixed kernel buffers on both ends (no autotuning), so "not reading" shows at once."""
    client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)


@defer.inlineCallbacks
def fill_until_paused(fleet, server, counter):
    """Report changes in bursts until the broker stays paused for this client across turns."""
    quiet = 0
    for _ in range(2000):
        for _ in range(40):
            counter[0] += 1
            fleet.registry.update_reported(DEVICES[counter[0] % len(DEVICES)],
                                           {"n": counter[0], "pad": PAD})
        yield task.deferLater(reactor, 0.005, lambda: None)
        quiet = quiet + 1 if server.sync.paused else 0
        if quiet >= 5:
            return
    raise AssertionError("the broker never paused for a client that does not read")


@defer.inlineCallbacks
def paused_client(testcase, fleet):
    """A client subscribed to every device that stopped reading until the broker paused it.

    Returns (client, server side, [updates sent so far]).
    """
    client = yield connected(testcase, fleet.url, fleet.read_token)
    yield client.request({"op": "subscribe", "id": 1, "patterns": ["dev-*"], "history": False})
    server = server_side(fleet)
    shrink_socket_buffers(client, server)
    client.stop_reading()
    counter = [0]
    yield fill_until_paused(fleet, server, counter)
    return client, server, counter


class SlowClientTests(unittest.TestCase):
    """Producer/consumer flow control and state sync for a client that stops reading."""

    timeout = 60

    @defer.inlineCallbacks
    def test_buffer_stays_bounded_and_latest_state_arrives(self):
        """While a client does not read, the broker's buffer stays bounded; on reading it gets every latest state."""
        fleet = yield start_fleet(self, devices=DEVICES,
                                  websocket={"ping_interval": 0.0, "max_behind": 600.0})
        client, server, counter = yield paused_client(self, fleet)

        reported_while_paused = 0
        peak = 0
        message_size = len(str(fleet.registry.device(DEVICES[0]).to_json()))
        for _ in range(50):
            for _ in range(40):
                counter[0] += 1
                reported_while_paused += 1
                fleet.registry.update_reported(DEVICES[counter[0] % len(DEVICES)],
                                               {"n": counter[0], "pad": PAD})
                peak = max(peak, buffered(server.transport))
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.assertTrue(server.sync.paused)
        self.assertLessEqual(peak, server.transport.bufferSize + 2 * message_size)
        self.assertLessEqual(len(server.sync.pending), len(DEVICES))
        self.assertGreater(reported_while_paused * message_size, 20 * peak)

        client.start_reading()
        latest = {}

        def caught_up():
            for message in client.received:
                if message["type"] == "update":
                    latest[message["device"]["name"]] = message["device"]
            client.received.clear()
            return all(name in latest and latest[name]["version"]
                       == fleet.registry.device(name).version for name in DEVICES)
        yield eventually(caught_up)
        for name in DEVICES:
            expected = fleet.registry.device(name).to_json()
            del expected["history"]
            self.assertEqual(latest[name], expected)
        self.assertIsNone(server.sync.behind_since)

    @defer.inlineCallbacks
    def test_client_behind_too_long_is_closed_with_reason(self):
        """A client behind for longer than max_behind is closed with code 4008 and a reason."""
        fleet = yield start_fleet(self, devices=DEVICES,
                                  websocket={"ping_interval": 0.0, "max_behind": 1.0})
        client, server, counter = yield paused_client(self, fleet)
        fleet.registry.update_reported(DEVICES[0], {"n": -1})
        self.assertIsNotNone(server.sync.behind_since)
        behind_since = server.sync.behind_since

        def closed_by_broker():
            fleet.registry.update_reported(DEVICES[1], {"n": -2})
            return server.state != server.STATE_OPEN
        yield eventually(closed_by_broker, timeout=5.0)
        self.assertEqual(server.sync.behind_since, behind_since)
        self.assertEqual(fleet.factory.counters["closed_too_slow"], 1)
        client.start_reading()
        was_clean, code, reason = yield client.closed
        self.assertEqual(code, CLOSE_TOO_SLOW)
        self.assertIn("behind for more than 1 s", reason)
        yield eventually(lambda: not fleet.factory.clients)

    @defer.inlineCallbacks
    def test_revoked_token_closes_a_client_that_is_behind(self):
        """A client behind (not reading) whose token is revoked is closed with 4001 at
        the next housekeeping round, not only once it is too slow (max_behind)."""
        fleet = yield start_fleet(self, devices=DEVICES,
                                  websocket={"ping_interval": 0.0, "max_behind": 60.0})
        client, server, counter = yield paused_client(self, fleet)
        fleet.registry.update_reported(DEVICES[0], {"n": -1})
        self.assertIsNotNone(server.sync.behind_since)
        read_id = next(info.token_id for info in fleet.registry.tokens() if info.role == "read")
        yield fleet.registry.revoke_token(read_id)
        yield eventually(lambda: server.state != server.STATE_OPEN, timeout=5.0)
        self.assertEqual(fleet.factory.counters["closed_token_revoked"], 1)
        self.assertEqual(fleet.factory.counters["closed_too_slow"], 0)
        client.start_reading()
        _, code, _ = yield client.closed
        self.assertEqual(code, CLOSE_TOKEN_REVOKED)

    @defer.inlineCallbacks
    def test_unread_answers_are_bounded(self):
        """A client that sends requests but reads no answers is closed with 4009, not buffered."""
        from broker.web.websocket.messages import CLOSE_TOO_MANY_REPLIES

        fleet = yield start_fleet(self, websocket={"ping_interval": 0.0})
        fleet.factory.max_reply_backlog = 64 * 1024
        client = yield connected(self, fleet.url, fleet.read_token)
        server = server_side(fleet)
        shrink_socket_buffers(client, server)
        client.stop_reading()
        peak = 0
        for n in range(5000):
            client.send({"op": "ping", "id": f"{n:0100d}"})
            if n % 50 == 0:
                yield task.deferLater(reactor, 0.002, lambda: None)
                peak = max(peak, buffered(server.transport))
            if server.state != server.STATE_OPEN:
                break
        yield eventually(lambda: server.state != server.STATE_OPEN, timeout=5.0)
        self.assertEqual(fleet.factory.counters["closed_replies_unread"], 1)
        self.assertLess(peak, server.transport.bufferSize + fleet.factory.max_reply_backlog + 4096)
        client.start_reading()
        _, code, reason = yield client.closed
        self.assertEqual(code, CLOSE_TOO_MANY_REPLIES)
        self.assertIn("too many answers unread", reason)

    @defer.inlineCallbacks
    def test_unread_subscribe_answers_are_bounded(self):
        """A paused client's subscribe requests queue at most max_subscriptions snapshots; the rest are refused."""
        fleet = yield start_fleet(self, devices=DEVICES,
                                  websocket={"ping_interval": 0.0, "max_behind": 600.0,
                                             "max_subscriptions": 5})
        client, server, _ = yield paused_client(self, fleet)
        for n in range(300):
            client.send({"op": "subscribe", "id": n, "patterns": ["dev-*"], "cursor": 0})
            if n % 50 == 0:
                yield task.deferLater(reactor, 0.002, lambda: None)
        yield eventually(lambda: fleet.factory.counters["error_too_many_requests"] > 200)
        self.assertTrue(server.sync.paused)
        self.assertLessEqual(len(server.sync.jobs), 5)
