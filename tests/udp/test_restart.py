"""wire.md 7 for real: the broker process killed with SIGKILL and restarted resumes sessions.

Integration test: a child process runs the real broker service on loopback
with the SQLite store; the node runs in the test's reactor.
"""

import os
import signal
import sys
import time

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase

from broker.node.client import SSPNode
from broker.registry import RegistrySettings, open_registry
from broker.registry.admin import AdminDatabase
from broker.udp.sessions import clock_floor

from .loopback import DEADLINE, LossyProxy, pause, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BrokerChild(ProcessProtocol):
    """The child broker: fires ``ready`` with its UDP port, ``ended`` when it exits;
    ``request(line)`` asks it something on stdin (tests/udp/broker_process.py)."""

    def __init__(self):
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.output = b""
        self._lines = b""
        self._waiting = []

    def outReceived(self, data):
        self.output += data
        self._lines += data
        *lines, self._lines = self._lines.split(b"\n")
        for line in lines:
            if line.startswith(b"READY ") and not self.ready.called:
                self.ready.callback(int(line.split()[1]))
            elif line.startswith((b"DONE", b"STATUS", b"FAILED")) and self._waiting:
                self._waiting.pop(0).callback(line.decode())

    def errReceived(self, data):
        self.output += data

    def request(self, line):
        """Send one request line; a Deferred firing with the child's answer line."""
        d = defer.Deferred()
        self._waiting.append(d)
        self.transport.write(line.encode() + b"\n")
        return d

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError("broker child exited: "
                                            + self.output.decode(errors="replace")[-3000:]))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(RuntimeError("broker child exited"))
        self.ended.callback(reason.value.signal if hasattr(reason.value, "signal") else None)


class KillRestartTests(TestCase):
    """A SIGKILLed broker comes back and its devices only saw a pause."""

    timeout = 120

    def write_config(self, data_dir, udp_port):
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as handle:
            handle.write(f'''
[broker]
data_dir = "{data_dir}"
[http]
endpoint = "tcp:0:interface=127.0.0.1"
[ssp]
host = "127.0.0.1"
port = {udp_port}
device_heartbeat = 2.0
offline_after = 6.0
[registry]
history_size = 10000
''')
        return path

    @defer.inlineCallbacks
    def start_child(self, config):
        child = BrokerChild()
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-m", "tests.udp.broker_process", config],
            env=dict(os.environ), path=ROOT)

        def cleanup():
            if process.pid is not None:
                process.signalProcess("KILL")
                return child.ended
        self.addCleanup(cleanup)
        port = yield child.ready
        return process, child, port

    @defer.inlineCallbacks
    def start_survivor(self, **callbacks):
        """A broker child with one provisioned device, a faithful relay in front of it (to
        see, or cut, every datagram the brokers send) and a node for the device, not started.

        Returns (data directory, device number, process, child, the config to restart it
        with, the relay's proxy, the node).
        """
        data_dir = os.path.abspath(self.mktemp())
        admin = AdminDatabase(data_dir, create=True)
        number, secret = admin.add_device("survivor")
        admin.close()
        process, child, port = yield self.start_child(self.write_config(data_dir, 0))
        config = self.write_config(data_dir, port)
        proxy = LossyProxy(("127.0.0.1", port), drop=0, duplicate=0, reorder=0)
        relay = reactor.listenUDP(0, proxy, interface="127.0.0.1")
        self.addCleanup(relay.stopListening)
        node = SSPNode(number, secret, ("127.0.0.1", relay.getHost().port), interface="127.0.0.1",
                       state_path=os.path.join(self.mktemp(), "ids.json"), heartbeat=2.0,
                       rekey_after=DEADLINE, **callbacks)
        return data_dir, number, process, child, config, proxy, node

    @defer.inlineCallbacks
    def kill(self, process, child):
        os.kill(process.pid, signal.SIGKILL)
        yield child.ended

    @defer.inlineCallbacks
    def test_kill_9_resumes_sessions_losing_nothing_doubling_nothing(self):
        """Events reported across two SIGKILLs are all in the registry exactly once, same session."""
        desired = []
        started_at = time.time()
        data_dir, number, process, child, config, proxy, node = yield self.start_survivor(
            on_desired=desired.append)
        node.start()
        # A desired change made before each kill reaches the device after the restart.
        yield child.request('desired survivor {"round": -1}')
        self.addCleanup(node.stop)
        sent = 0
        for round_ in range(3):
            # Report steadily, and kill the broker while reports are in flight.
            for _ in range(20):
                node.report({"count": sent})
                node.emit({"seq": sent})
                sent += 1
                yield pause(0.01)
            acked_before = node.acknowledged
            self.assertGreater(acked_before, 0)
            answer = yield child.request(f'desired survivor {{"round": {round_}}}')
            self.assertEqual(answer, "DONE desired")
            yield self.kill(process, child)
            for _ in range(5):
                node.report({"count": sent})
                node.emit({"seq": sent})
                sent += 1
                yield pause(0.01)
            process, child, _ = yield self.start_child(config)
            yield wait_until(self, lambda: node.acknowledged > acked_before,
                             what="acks from the restarted broker")
            yield wait_until(self, lambda: node.desired == {"round": round_},
                             what=f"the desired change of round {round_}")
        yield wait_until(self, node.session.idle, what="everything acknowledged")
        self.assertEqual(node.session.sessions_started, 1)
        self.assertEqual(desired[-1], {"round": 2})
        self.assertIn({"round": -1}, desired)
        # No nonce (direction bit | sequence number) twice under the session's key.
        # Each restarted broker resumed above the reservation of the one
        # before, numbering from its wall clock (sessions.clock_floor).
        nonces = [data[17:25] for data in proxy.replies]
        self.assertEqual(len(set(nonces)), len(nonces))
        seqs = [int.from_bytes(nonce, "big") & ((1 << 63) - 1) for nonce in nonces]
        self.assertGreaterEqual(min(seqs), clock_floor(started_at))
        self.assertLess(max(seqs), clock_floor(time.time() + 1))
        yield self.kill(process, child)
        registry = open_registry(data_dir, clock=reactor,
                                 settings=RegistrySettings(history_size=10000))
        try:
            view = registry.device("survivor")
            events = []
            for _, _, _, kind, data in view.history:
                if kind == "events":
                    events.extend(data)
                elif kind == "reported" and "events" in data:
                    events.extend(data["events"])
            self.assertEqual(list(events), [{"seq": i} for i in range(sent)])
            self.assertEqual(dict(view.reported), {"count": sent - 1})
            record = registry.session_record(number)
            self.assertEqual(record.session_id, node.session_id)
        finally:
            yield registry.stop()

    @defer.inlineCallbacks
    def test_kill_9_desired_and_commands_survive_exactly_once(self):
        """Across a kill -9: a desired change the device never got before it arrives after the
        restart; a command it acknowledged before is not delivered again, and one it had not
        acknowledged (durable in the session record) arrives once, before newer ones."""
        commands = []
        _, number, process, child, config, proxy, node = yield self.start_survivor(
            on_command=commands.append)
        node.start()
        self.addCleanup(node.stop)
        node.report({"up": 1})
        yield wait_until(self, lambda: node.acknowledged > 0, what="the session")
        answer = yield child.request(f'command {number} "acked-before"')
        self.assertEqual(answer, "DONE command True")
        yield wait_until(self, lambda: commands == ["acked-before"], what="the first command")
        yield self.wait_status(child, number, "STATUS acked")
        # From now on the broker's datagrams are lost: neither of these reaches the device.
        proxy.cut_replies = True
        answer = yield child.request('desired survivor {"mode": "eco"}')
        self.assertEqual(answer, "DONE desired")
        answer = yield child.request(f'command {number} "unacked"')
        self.assertEqual(answer, "DONE command True")
        yield pause(0.3)
        self.assertEqual((yield child.request(f"status {number}")), "STATUS pending")
        self.assertEqual(node.desired, {})
        yield self.kill(process, child)
        proxy.cut_replies = False
        process, child, _ = yield self.start_child(config)
        node.report({"up": 2})
        yield wait_until(self, lambda: node.desired == {"mode": "eco"},
                         what="the desired change made before the kill")
        yield wait_until(self, lambda: "unacked" in commands,
                         what="the command not acknowledged before the kill")
        yield wait_until(self, node.session.idle, what="everything acknowledged")
        # New commands still arrive after the restart, each once, numbered after it.
        answer = yield child.request(f'command {number} "after"')
        self.assertEqual(answer, "DONE command True")
        yield wait_until(self, lambda: "after" in commands, what="a command after the restart")
        yield self.wait_status(child, number, "STATUS acked")
        yield pause(0.5)  # room for any (wrong) second delivery
        self.assertEqual(commands, ["acked-before", "unacked", "after"])
        self.assertEqual(node.session.sessions_started, 1)

    @defer.inlineCallbacks
    def wait_status(self, child, number, expected):
        """Ask the child for the session's status until it answers ``expected`` (bounded)."""
        for _ in range(int(DEADLINE / 0.05)):
            answer = yield child.request(f"status {number}")
            if answer == expected:
                return
            yield pause(0.05)
        self.fail(f"the broker never answered {expected!r}, last {answer!r}")
