"""Tests for the broker-node command line: parsing, and both commands against a real broker."""

import io
import json
import os
import sys

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.node.cli import UsageError, main, parse_broker, read_keys
from broker.node.run import parse_line
from broker.ssp.keys import format_key
from tests.helpers import loopback_config, start_broker
from tests.udp.loopback import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ParsingTests(SynchronousTestCase):
    """Command-line values and input lines, with precise errors."""

    def test_broker_addresses(self):
        """HOST:PORT and [IPv6]:PORT give numeric addresses; bad ports are refused."""
        self.assertEqual(parse_broker("127.0.0.1:5000"), ("127.0.0.1", 5000))
        self.assertEqual(parse_broker("[::1]:6000"), ("::1", 6000))
        self.assertEqual(parse_broker("127.0.0.1"), ("127.0.0.1", 60001))
        for bad in ("127.0.0.1:x", "127.0.0.1:0", "127.0.0.1:70000", "[::1]6000"):
            self.assertRaises(UsageError, parse_broker, bad)

    def test_keys_from_admin_json(self):
        """broker-admin --json device add output (lines or one array) gives numbers and secrets."""
        line = {"device_number": "42", "key": format_key(bytes(16)), "name": "a"}
        self.assertEqual(read_keys([json.dumps(line) + "\n"] * 2), [(42, bytes(16))] * 2)
        self.assertEqual(read_keys([json.dumps([line])]), [(42, bytes(16))])
        self.assertEqual(read_keys([]), [])
        self.assertRaises(UsageError, read_keys, ['{"name": "a"}'])

    def test_input_lines(self):
        """A line is an object of values; $event and $events append events."""
        self.assertEqual(parse_line('{"t": 1}'), ({"t": 1}, []))
        self.assertEqual(parse_line('{"t": 1, "$event": "x", "$events": ["y", 2]}'),
                         ({"t": 1}, ["x", "y", 2]))
        for bad in ("[1]", "nope", '{"$events": 3}'):
            self.assertRaises(ValueError, parse_line, bad)

    def test_bad_usage_exits_2_with_one_line(self):
        """A bad device number or key ends with status 2 and one line on stderr."""
        err = io.StringIO()
        old, sys.stderr = sys.stderr, err
        try:
            self.assertEqual(main(["run", "--device", "0", "--secret", "x", "--broker",
                                   "127.0.0.1:1"]), 2)
            self.assertEqual(main(["run", "--device", "5", "--secret", "short", "--broker",
                                   "127.0.0.1:1"]), 2)
        finally:
            sys.stderr = old
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("--device", lines[0])
        self.assertIn("--secret", lines[1])


class Child(ProcessProtocol):
    """A broker-node child process: collects stdout lines and stderr."""

    def __init__(self):
        self.lines = []
        self.err = b""
        self._buffer = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.lines.extend(json.loads(line) for line in lines if line.strip())

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class CommandTests(TestCase):
    """broker-node run and simulate as real processes against a real broker on loopback."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, loopback_config(self))
        self.registry = self.broker.service.registry
        self.address = f"127.0.0.1:{self.broker.udp_port}"

    def spawn(self, *args):
        child = Child()
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-m", "broker.node.cli", *args],
            env=dict(os.environ), path=ROOT)
        self.addCleanup(lambda: child.ended if process.pid is None
                        else (process.signalProcess("KILL"), child.ended)[1])
        return process, child

    @defer.inlineCallbacks
    def test_run_reports_stdin_and_prints_desired(self):
        """Lines on stdin reach the registry; a desired change comes out as a JSON line."""
        device = yield self.registry.add_device("cli-node")
        process, child = self.spawn(
            "run", "--device", str(device.device_number), "--secret", format_key(device.secret),
            "--broker", self.address, "--state", os.path.abspath(self.mktemp()),
            "--heartbeat", "2", "--linger", "1")
        process.writeToChild(0, b'{"temp": 20.5, "$event": {"kind": "boot"}}\nnot json\n')
        yield wait_until(self, lambda: self.registry.device("cli-node").reported.get("temp")
                         == 20.5, what="reported via the CLI")
        yield self.registry.update_desired("cli-node", {"led": "on"})
        yield wait_until(self, lambda: {"led": "on"} in child.lines, what="desired printed")
        process.closeChildFD(0)
        code = yield child.ended
        self.assertEqual(code, 0)
        self.assertIn(b"line skipped", child.err)

    @defer.inlineCallbacks
    def test_simulate_fleet(self):
        """simulate drives several devices from admin-style keys and prints a JSON summary."""
        keys = []
        for i in range(4):
            device = yield self.registry.add_device(f"sim-{i}")
            keys.append(json.dumps({"device_number": str(device.device_number),
                                    "key": format_key(device.secret), "name": device.name}))
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("\n".join(keys) + "\n")
        process, child = self.spawn("simulate", "--devices", "4", "--rate", "40",
                                    "--duration", "1", "--sockets", "2", "--broker",
                                    self.address, "--keys", path)
        code = yield child.ended
        self.assertEqual(code, 0, child.err.decode())
        summary = child.lines[-1]
        self.assertEqual(summary["connected"], 4)
        self.assertGreater(summary["acknowledged_states"], 10)
        self.assertEqual(summary["pending_devices"], 0)
        self.assertTrue(all(self.registry.device(f"sim-{i}").reported.get("seq")
                            for i in range(4)))
