"""wire.md 7 for real: the broker process killed with SIGKILL and restarted resumes sessions.

Integration test: a child process runs the real broker service on loopback
with the SQLite store; the node runs in the test's reactor.
"""

import os
import signal
import sys

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase

from broker.node.client import SSPNode
from broker.registry import RegistrySettings, open_registry
from broker.registry.admin import AdminDatabase
from broker.udp.sessions import SEQ_RESERVATION_BLOCK

from .loopback import DEADLINE, LossyProxy, pause, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BrokerChild(ProcessProtocol):
    """The child broker: fires ``ready`` with its UDP port, ``ended`` when it exits."""

    def __init__(self):
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.output = b""

    def outReceived(self, data):
        self.output += data
        if not self.ready.called:
            for line in self.output.split(b"\n"):
                if line.startswith(b"READY "):
                    self.ready.callback(int(line.split()[1]))
                    break

    def errReceived(self, data):
        self.output += data

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError("broker child exited: "
                                            + self.output.decode(errors="replace")[-3000:]))
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
    def kill(self, process, child):
        os.kill(process.pid, signal.SIGKILL)
        yield child.ended

    @defer.inlineCallbacks
    def test_kill_9_resumes_sessions_losing_nothing_doubling_nothing(self):
        """Events reported across two SIGKILLs are all in the registry exactly once, same session."""
        data_dir = os.path.abspath(self.mktemp())
        admin = AdminDatabase(data_dir, create=True)
        number, secret = admin.add_device("survivor")
        admin.close()
        process, child, port = yield self.start_child(self.write_config(data_dir, 0))
        config = self.write_config(data_dir, port)
        desired = []
        # A faithful relay, to see every datagram the brokers send.
        proxy = LossyProxy(("127.0.0.1", port), drop=0, duplicate=0, reorder=0)
        relay = reactor.listenUDP(0, proxy, interface="127.0.0.1")
        self.addCleanup(relay.stopListening)
        node = SSPNode(number, secret, ("127.0.0.1", relay.getHost().port), interface="127.0.0.1",
                       state_path=os.path.join(self.mktemp(), "ids.json"), heartbeat=2.0,
                       rekey_after=DEADLINE, on_desired=desired.append)
        node.start()
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
            yield self.kill(process, child)
            for _ in range(5):
                node.report({"count": sent})
                node.emit({"seq": sent})
                sent += 1
                yield pause(0.01)
            process, child, _ = yield self.start_child(config)
            yield wait_until(self, lambda: node.acknowledged > acked_before,
                             what="acks from the restarted broker")
        yield wait_until(self, node.session.idle, what="everything acknowledged")
        self.assertEqual(node.session.sessions_started, 1)
        # No nonce (direction bit | sequence number) twice under the session's key.
        # Each restarted broker resumed above the reservation of the one before.
        nonces = [data[17:25] for data in proxy.replies]
        self.assertEqual(len(set(nonces)), len(nonces))
        seqs = [int.from_bytes(nonce, "big") & ((1 << 63) - 1) for nonce in nonces]
        self.assertEqual(min(seqs), 0)
        self.assertGreaterEqual(max(seqs), 3 * SEQ_RESERVATION_BLOCK)
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
