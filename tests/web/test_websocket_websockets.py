"""The same protocol spoken by an independent client library (`websockets`, in a subprocess)."""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from broker.web.websocket.messages import SUBPROTOCOL
from tests.web.wsclient import WAIT, start_fleet

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "websockets_peer.py")


class Peer(protocol.ProcessProtocol):
    """The subprocess: JSON lines in, JSON lines out, like DashboardClient's expect()."""

    def __init__(self):
        self.buffer = b""
        self.received = []
        self.waiters = []
        self.ended = defer.Deferred()
        self.errors = b""

    def outReceived(self, data):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            for waiter in list(self.waiters):
                if waiter[0](message):
                    self.waiters.remove(waiter)
                    waiter[1].callback(message)
                    break
            else:
                self.received.append(message)

    def errReceived(self, data):
        self.errors += data

    def processEnded(self, reason):
        for _, d in self.waiters:
            d.errback(AssertionError(f"peer ended while waiting: {self.errors.decode()[-500:]}"))
        self.waiters = []
        self.ended.callback(reason.value.exitCode)

    def send(self, message) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")

    def expect(self, match) -> defer.Deferred:
        for message in self.received:
            if match(message):
                self.received.remove(message)
                return defer.succeed(message)
        d = defer.Deferred()
        self.waiters.append((match, d))
        return d.addTimeout(WAIT, reactor)

    def request(self, message) -> defer.Deferred:
        self.send(message)
        return self.expect(lambda m: m.get("id") == message["id"] and m.get("type") != "update"
                           and (m.get("type") != "snapshot" or m.get("done")))


class WebsocketsClientTests(unittest.TestCase):
    """A browser-like client on another WebSocket implementation."""

    timeout = 60

    @defer.inlineCallbacks
    def peer(self, fleet, token, origin=None):
        """Start the subprocess; it is ended (stdin closed, then killed) when the test ends."""
        peer = Peer()
        origin = origin if origin is not None else f"http://127.0.0.1:{fleet.port}"
        env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
        env["PYTHONPATH"] = os.pathsep.join(sys.path)
        reactor.spawnProcess(peer, sys.executable,
                             [sys.executable, PEER, fleet.url.replace("http", "ws", 1) + "/ws",
                              token, origin], env=env)

        def end():
            if peer.ended.called:
                return None
            peer.transport.closeStdin()
            late = reactor.callLater(WAIT, peer.transport.signalProcess, "KILL")
            return peer.ended.addBoth(lambda _: late.active() and late.cancel())
        self.addCleanup(end)
        first = yield peer.expect(lambda m: "open" in m or "refused" in m)
        return peer, first

    @defer.inlineCallbacks
    def test_subscribe_report_and_write(self):
        """Subscribe, see a report, write desired state and hit a version conflict."""
        fleet = yield start_fleet(self)
        peer, first = yield self.peer(fleet, fleet.write_token)
        self.assertEqual(first, {"open": SUBPROTOCOL})
        page = yield peer.request({"op": "subscribe", "id": "s", "patterns": ["pump-*"]})
        self.assertEqual(sorted(d["name"] for d in page["devices"]), ["pump-1", "pump-2"])
        fleet.registry.update_reported("pump-2", {"rpm": 1200})
        update = yield peer.expect(lambda m: m.get("type") == "update")
        self.assertEqual(update["device"], fleet.registry.device("pump-2").to_json())

        answer = yield peer.request({"op": "set_desired", "id": "w", "name": "pump-2",
                                     "desired": {"rpm": 900}})
        self.assertEqual((answer["type"], answer["version"]),
                         ("result", fleet.registry.device("pump-2").version))
        self.assertEqual(dict(fleet.registry.device("pump-2").desired), {"rpm": 900})
        answer = yield peer.request({"op": "set_desired", "id": "c", "name": "pump-2",
                                     "desired": {"rpm": 1}, "expected_version": 1})
        self.assertEqual(answer["code"], "version_conflict")

    @defer.inlineCallbacks
    def test_read_token_and_bad_messages(self):
        """A read token cannot write, and malformed text gets a precise error."""
        fleet = yield start_fleet(self)
        peer, _ = yield self.peer(fleet, fleet.read_token)
        answer = yield peer.request({"op": "set_desired", "id": 1, "name": "pump-1",
                                     "desired": {"on": True}})
        self.assertEqual(answer["code"], "forbidden")
        peer.transport.write(b"{oops\n")
        error = yield peer.expect(lambda m: m.get("type") == "error")
        self.assertEqual(error["code"], "invalid_json")
        answer = yield peer.request({"op": "nope", "id": 2})
        self.assertEqual(answer["code"], "unknown_op")

    @defer.inlineCallbacks
    def test_wrong_origin_refused(self):
        """A page from a foreign origin is refused with 403 before the connection opens."""
        fleet = yield start_fleet(self)
        _, first = yield self.peer(fleet, fleet.write_token, origin="https://evil.example")
        self.assertEqual(first["refused"], 403)
        self.assertIn("https://evil.example:443", first["reason"])

    @defer.inlineCallbacks
    def test_resume_with_cursor(self):
        """After a reconnect with its cursor the client gets exactly the device that changed."""
        fleet = yield start_fleet(self)
        peer, _ = yield self.peer(fleet, fleet.read_token)
        page = yield peer.request({"op": "subscribe", "id": 1, "patterns": ["*"]})
        cursor = page["cursor"]
        peer.transport.closeStdin()
        ended = yield peer.ended
        self.assertEqual(ended, 0)
        fleet.registry.update_reported("valve-1", {"open": True})
        fleet.registry.update_reported("valve-1", {"open": False})
        again, _ = yield self.peer(fleet, fleet.read_token)
        page = yield again.request({"op": "subscribe", "id": 2, "patterns": ["*"],
                                    "cursor": cursor})
        self.assertEqual([(d["name"], d["reported"]) for d in page["devices"]],
                         [("valve-1", {"open": False})])
