"""Tests for the broker-node command line: parsing, and both commands against a real broker."""

import errno
import io
import json
import os
import pty
import socket
import sys

from twisted.internet import defer, error, reactor
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.node.cli import (MIN_HEARTBEAT, UsageError, build_parser, main, parse_broker,
                             read_keys)
from broker.node.run import SKIPPED_LINES, parse_line, run_node
from broker.ssp.keys import format_key
from tests.helpers import loopback_config, start_broker
from tests.udp.loopback import pause, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def key_file(testcase, secret=bytes(16)):
    """A private file (0600) holding a device key, for --secret-file (absolute path)."""
    path = os.path.abspath(testcase.mktemp())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(format_key(secret) + "\n")
    return path


class ParsingTests(SynchronousTestCase):
    """Command-line values and input lines, with precise errors."""

    def test_broker_addresses(self):
        """HOST:PORT and [IPv6]:PORT give numeric addresses; bad ports are refused."""
        self.assertEqual(parse_broker("127.0.0.1:5000"), ("127.0.0.1", 5000))
        self.assertEqual(parse_broker("[::1]:6000"), ("::1", 6000))
        self.assertEqual(parse_broker("127.0.0.1"), ("127.0.0.1", 60001))
        for bad in ("127.0.0.1:x", "127.0.0.1:0", "127.0.0.1:70000", "[::1]6000", "[::1",
                    "[::1:6000"):
            self.assertRaises(UsageError, parse_broker, bad)

    def test_link_local_broker_keeps_its_interface(self):
        """A link-local IPv6 broker keeps its scope (the interface): without it the
        kernel picks the link, and datagrams may leave on the wrong one."""
        index = socket.if_nametoindex("lo")
        self.assertEqual(parse_broker("[fe80::1%lo]:5000"), (f"fe80::1%{index}", 5000))
        self.assertEqual(parse_broker(f"[fe80::1%{index}]:5000"), (f"fe80::1%{index}", 5000))

    def test_keys_from_admin_json(self):
        """broker-admin --json device add output (lines or one array) gives numbers and secrets."""
        line = {"device_number": "42", "key": format_key(bytes(16)), "name": "a"}
        other = dict(line, device_number="43")
        self.assertEqual(read_keys([json.dumps(line) + "\n", json.dumps(other) + "\n"]),
                         [(42, bytes(16)), (43, bytes(16))])
        self.assertEqual(read_keys([json.dumps([line])]), [(42, bytes(16))])
        self.assertEqual(read_keys([]), [])
        self.assertRaises(UsageError, read_keys, ['{"name": "a"}'])

    def test_bad_keys_are_usage_errors(self):
        """Keys that are not admin JSON, or list one device twice, are refused with a message."""
        line = json.dumps({"device_number": "42", "key": format_key(bytes(16))})
        for bad in (["{bad\n"], ["device greenhouse-7\nnumber 42\n"], [line + "\n"] * 2):
            self.assertRaises(UsageError, read_keys, bad)

    def test_keys_entries_are_named_in_their_errors(self):
        """A keys entry whose key is not text (a number, null, a list) or whose device
        number is bad is a UsageError naming the entry, not --device or --secret."""
        good = {"device_number": "41", "key": format_key(bytes(16))}
        for entry in ({"device_number": "42", "key": 123}, {"device_number": "42", "key": None},
                      {"device_number": "42", "key": ["x"]}, {"device_number": "42", "key": "x"},
                      {"device_number": "0", "key": format_key(bytes(16))},
                      {"device_number": [42], "key": format_key(bytes(16))}):
            with self.assertRaises(UsageError) as caught:
                read_keys([json.dumps(good) + "\n", json.dumps(entry) + "\n"])
            message = str(caught.exception)
            self.assertTrue(message.startswith("keys: entry 2: "), message)
            self.assertNotIn("--", message)

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
            bad_key = os.path.abspath(self.mktemp())
            with open(bad_key, "w") as handle:
                handle.write("short\n")
            os.chmod(bad_key, 0o600)
            self.assertEqual(main(["run", "--device", "5", "--secret-file", bad_key,
                                   "--broker", "127.0.0.1:1"]), 2)
        finally:
            sys.stderr = old
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("--device", lines[0])
        self.assertIn("--secret-file", lines[1])
        self.assertNotIn("short", lines[1])


    def run_main(self, *argv):
        """main(argv) -> (status, stderr); argparse's exits count as a status."""
        err = io.StringIO()
        old, sys.stderr = sys.stderr, err
        try:
            status = main(list(argv))
        except SystemExit as stop:
            status = stop.code
        finally:
            sys.stderr = old
        return status, err.getvalue()

    def test_unresolvable_broker_names_exit_2(self):
        """A --broker name that is not even a valid host name (an empty label) exits 2
        with one line naming --broker, as an unknown one does, never a traceback."""
        for bad in ("a..b:5000", "x" * 300 + ":5000"):
            self.assertRaises(UsageError, parse_broker, bad)
            for command in (["run", "--device", "5", "--secret-file", key_file(self)],
                            ["simulate", "--devices", "1"]):
                status, err = self.run_main(*command, "--broker", bad)
                self.assertEqual(status, 2, (command, bad))
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertIn("--broker", err)

    def test_timing_options_are_checked(self):
        """Times that are not positive and finite, or a rekey not after a heartbeat, exit 2."""
        base = ["run", "--device", "5", "--secret-file", key_file(self),
                "--broker", "127.0.0.1:1"]
        for bad in (["--heartbeat", "0"], ["--heartbeat", "nan"], ["--heartbeat", "inf"],
                    ["--rekey-after", "0"], ["--heartbeat", "10", "--rekey-after", "10"],
                    ["--linger", "-1"], ["--linger", "nan"]):
            status, err = self.run_main(*base, *bad)
            self.assertEqual(status, 2, bad)
            self.assertIn(bad[-2], err)

    def test_heartbeat_below_the_floor_is_refused(self):
        """A --heartbeat under MIN_HEARTBEAT (its rekey would come before any ack) exits 2
        with a message naming it, for run and simulate."""
        for command in (["run", "--device", "5", "--secret-file", key_file(self)],
                        ["simulate", "--devices", "1"]):
            status, err = self.run_main(*command, "--broker", "127.0.0.1:1",
                                        "--heartbeat", "0.01")
            self.assertEqual(status, 2)
            self.assertIn("--heartbeat", err)
            self.assertIn(f"at least {MIN_HEARTBEAT:g}", err)

    def test_simulate_options_are_checked(self):
        """simulate refuses a zero connect rate, a NaN rate and a missing keys file with exit 2."""
        base = ["simulate", "--devices", "1", "--broker", "127.0.0.1:1"]
        for bad in (["--connect-rate", "0"], ["--rate", "nan"],
                    ["--keys", os.path.join(self.mktemp(), "missing.jsonl")]):
            status, err = self.run_main(*base, *bad)
            self.assertEqual(status, 2, bad)
            self.assertIn(bad[0], err.splitlines()[-1])
            self.assertNotIn("Traceback", err)

    def test_unusable_state_file_exits_2(self):
        """A --state file that cannot be read or written exits 2 with one line, no traceback."""
        blocker = self.mktemp()
        with open(blocker, "w") as handle:
            handle.write("not a directory")
        damaged = self.mktemp()
        with open(damaged, "w") as handle:
            handle.write('{"5": "x"}')
        for path in (os.path.join(blocker, "ids.json"), damaged):
            status, err = self.run_main("run", "--device", "5", "--secret-file",
                                        key_file(self), "--broker", "127.0.0.1:1",
                                        "--state", path)
            self.assertEqual(status, 2)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn("--state", err)


class UnusableFamilyTests(SynchronousTestCase):
    """A broker address this host has no sockets for."""

    def test_a_broker_of_a_family_the_host_cannot_use_is_a_usage_error(self):
        """An IPv6 broker on a host without IPv6 is one line naming --broker, not a traceback."""
        class NoSockets(MemoryReactorClock):
            def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
                raise error.CannotListenError(interface, port, OSError(
                    errno.EAFNOSUPPORT, "Address family not supported by protocol"))
        args = build_parser().parse_args(
            ["run", "--device", "5", "--secret-file", key_file(self), "--broker", "[::1]:60001",
             "--state", os.path.join(self.mktemp(), "ids.json")])
        with self.assertRaises(UsageError) as raised:
            run_node(args, reactor=NoSockets(), stdin=0, out=io.StringIO(), err=io.StringIO())
        self.assertIn("--broker [::1]:60001: cannot open a UDP socket", str(raised.exception))
        self.assertIn("Address family not supported", str(raised.exception))


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


def spawn_node(testcase, *args, fds=None):
    """broker-node as a child process; killed at cleanup if still running.  ``fds``:
    the child's descriptors (one left out is closed in the child)."""
    child = Child()
    process = reactor.spawnProcess(
        child, sys.executable, [sys.executable, "-m", "broker.node.cli", *args],
        env=dict(os.environ), path=ROOT, childFDs=fds)
    testcase.addCleanup(lambda: child.ended if process.pid is None
                        else (process.signalProcess("KILL"), child.ended)[1])
    return process, child


class Silent(DatagramProtocol):
    """A UDP peer that never answers (as the broker is to a wrong key or device)."""

    def __init__(self):
        self.received = 0

    def datagramReceived(self, data, addr):
        self.received += 1


class SilentBrokerTests(TestCase):
    """broker-node run against a broker that never answers: a message and status 1."""

    timeout = 60

    def setUp(self):
        self.silent = Silent()
        port = reactor.listenUDP(0, self.silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.args = ["run", "--device", "5", "--secret-file", key_file(self),
                     "--broker", f"127.0.0.1:{port.getHost().port}", "--linger", "0.5"]

    @defer.inlineCallbacks
    def test_unacknowledged_reports_exit_1_with_a_message(self):
        """Reports nobody acknowledged end with status 1 and a message naming the likely
        causes, at end of input and on SIGTERM alike (never a silent 0)."""
        process, child = spawn_node(self, *self.args, "--state",
                                    os.path.abspath(self.mktemp()))
        process.writeToChild(0, b'{"t": 1}\n')
        process.closeChildFD(0)
        code = yield child.ended
        self.assertEqual(code, 1)
        self.assertIn(b"no answer from the broker", child.err)
        self.assertIn(b"--secret", child.err)
        self.assertNotIn(b"Traceback", child.err)

        process, child = spawn_node(self, *self.args, "--state",
                                    os.path.abspath(self.mktemp()))
        before = self.silent.received
        process.writeToChild(0, b'{"t": 2}\n')
        yield wait_until(self, lambda: self.silent.received >= before + 2,
                         what="the session start and the report sent")
        process.signalProcess("TERM")
        code = yield child.ended
        self.assertEqual(code, 1)
        self.assertIn(b"no answer from the broker", child.err)
        self.assertNotIn(b"Traceback", child.err)


class CommandTests(TestCase):
    """broker-node run and simulate as real processes against a real broker on loopback."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        # (A long history: a test reads every event stored back from it.)
        self.broker = yield start_broker(self, loopback_config(
            self, registry={"history_size": 10_000}))
        self.registry = self.broker.service.registry
        self.address = f"127.0.0.1:{self.broker.udp_port}"

    def spawn(self, *args):
        return spawn_node(self, *args)

    @defer.inlineCallbacks
    def test_run_reports_stdin_and_prints_desired(self):
        """Lines on stdin reach the registry; a desired change comes out as a JSON line."""
        device = yield self.registry.add_device("cli-node")
        process, child = self.spawn(
            "run", "--device", str(device.device_number), "--secret-file", key_file(self, device.secret),
            "--broker", self.address, "--state", os.path.abspath(self.mktemp()),
            "--heartbeat", "2", "--linger", "1")
        process.writeToChild(0, b'{"temp": 20.5, "blob": {"$bytes": "AAEC"}, '
                                b'"$event": {"kind": "boot"}}\nnot json\n')
        yield wait_until(self, lambda: self.registry.device("cli-node").reported.get("temp")
                         == 20.5, what="reported via the CLI")
        self.assertEqual(self.registry.device("cli-node").reported["blob"], b"\x00\x01\x02")
        yield self.registry.update_desired("cli-node", {"led": "on", "key": b"\xff"})
        yield wait_until(self, lambda: {"led": "on", "key": {"$bytes": "/w=="}} in child.lines,
                         what="desired printed, bytes as the API writes them")
        process.closeChildFD(0)
        code = yield child.ended
        self.assertEqual(code, SKIPPED_LINES)
        self.assertIn(b"line skipped: not JSON", child.err)
        self.assertIn(b"1 input line(s) skipped", child.err)

    @defer.inlineCallbacks
    def test_a_key_the_registry_refuses_skips_its_line_only(self):
        """A line with a key the registry refuses is skipped with a message naming it and
        the exit status says lines were skipped; the good lines around it reach the
        registry (it would refuse a report holding the bad key whole)."""
        args = yield self.run_args("cli-bad-key")
        process, child = self.spawn(*args)
        process.writeToChild(0, b'{"humidity": 40}\n{"temp C": 21.5}\n{"pressure": 1013}\n')
        process.closeChildFD(0)
        code = yield child.ended
        self.assertEqual(code, SKIPPED_LINES, child.err)
        self.assertIn(b"line skipped: key 'temp C'", child.err)
        self.assertEqual(dict(self.registry.device("cli-bad-key").reported),
                         {"humidity": 40, "pressure": 1013})

    @defer.inlineCallbacks
    def test_signal_with_end_of_input_stops_quietly(self):
        """SIGTERM or SIGINT arriving with end of input (Ctrl-C on a pipeline kills the
        producer too) stops the node once: status 0 and nothing on stderr."""
        for number, signal_name in enumerate(("TERM", "INT")):
            args = yield self.run_args(f"cli-signal-eof-{number}")
            process, child = self.spawn(*args)
            process.writeToChild(0, b'{"t": 1}\n')
            yield wait_until(self, lambda: self.registry.device(
                f"cli-signal-eof-{number}").reported.get("t") == 1, what="reported")
            yield pause(0.3)  # the node hears the acknowledgement
            process.signalProcess(signal_name)
            process.closeChildFD(0)
            code = yield child.ended
            self.assertEqual((code, child.err), (0, b""))

    @defer.inlineCallbacks
    def test_terminal_input_is_left_blocking(self):
        """With a terminal as standard input (and output to a pipe), the terminal is
        blocking again after the node exits: the shell and the next program reading it
        would otherwise fail (EAGAIN)."""
        args = yield self.run_args("cli-tty")
        master, terminal = pty.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, terminal)
        self.assertTrue(os.get_blocking(terminal))
        process, child = spawn_node(self, *args, fds={0: terminal, 1: "r", 2: "r"})
        os.write(master, b'{"t": 1}\n')
        yield wait_until(self, lambda: self.registry.device("cli-tty").reported.get("t") == 1,
                         what="reported from the terminal")
        os.write(master, b"\x04")  # Ctrl-D: end of input
        code = yield child.ended
        self.assertEqual(code, 0, child.err)
        self.assertTrue(os.get_blocking(terminal))

    @defer.inlineCallbacks
    def test_signal_stops_quietly_after_acknowledgement(self):
        """SIGINT (Ctrl-C) after the broker acknowledged everything ends with status 0 and
        nothing on stderr."""
        device = yield self.registry.add_device("cli-signal")
        process, child = self.spawn(
            "run", "--device", str(device.device_number), "--secret-file", key_file(self, device.secret),
            "--broker", self.address, "--state", os.path.abspath(self.mktemp()))
        process.writeToChild(0, b'{"temp": 7}\n')
        yield wait_until(self, lambda: self.registry.device("cli-signal").reported.get("temp")
                         == 7, what="reported via the CLI")
        yield self.registry.update_desired("cli-signal", {"led": "on"})
        yield wait_until(self, lambda: {"led": "on"} in child.lines, what="desired printed")
        yield pause(0.5)  # the node's ack of the desired state goes out (ack delay 0.1 s)
        process.signalProcess("INT")
        code = yield child.ended
        self.assertEqual(code, 0)
        self.assertEqual(child.err, b"")

    @defer.inlineCallbacks
    def test_closed_output_stops_the_node(self):
        """When the reader of stdout goes away (broker-node run | head -1), the node stops
        with status 1 and one message, no traceback, without waiting for end of input."""
        device = yield self.registry.add_device("cli-pipe")
        process, child = self.spawn(
            "run", "--device", str(device.device_number), "--secret-file", key_file(self, device.secret),
            "--broker", self.address, "--state", os.path.abspath(self.mktemp()),
            "--linger", "1")
        process.writeToChild(0, b'{"temp": 8}\n')
        yield wait_until(self, lambda: self.registry.device("cli-pipe").reported.get("temp")
                         == 8, what="reported via the CLI")
        process.closeChildFD(1)
        yield self.registry.update_desired("cli-pipe", {"led": "on"})
        codes = []
        child.ended.addCallback(codes.append)
        yield wait_until(self, lambda: codes, what="the node stopping by itself")
        self.assertEqual(codes, [1])
        self.assertIn(b"cannot write to standard output", child.err)
        self.assertNotIn(b"Traceback", child.err)

    @defer.inlineCallbacks
    def test_closed_output_noticed_without_a_line_to_write(self):
        """The node notices its stdout reader went away while it has nothing to print (no
        desired change comes): it stops by itself all the same, with the one message."""
        device = yield self.registry.add_device("cli-pipe-idle")
        process, child = self.spawn(
            "run", "--device", str(device.device_number), "--secret-file", key_file(self, device.secret),
            "--broker", self.address, "--state", os.path.abspath(self.mktemp()),
            "--linger", "1")
        process.writeToChild(0, b'{"temp": 8}\n')
        yield wait_until(self, lambda: self.registry.device("cli-pipe-idle").reported.get("temp")
                         == 8, what="reported via the CLI")
        process.closeChildFD(1)
        codes = []
        child.ended.addCallback(codes.append)
        yield wait_until(self, lambda: codes, what="the node stopping by itself")
        self.assertEqual(codes, [1])
        self.assertIn(b"cannot write to standard output (its reader closed it)", child.err)
        self.assertNotIn(b"Traceback", child.err)

    @defer.inlineCallbacks
    def run_args(self, name):
        device = yield self.registry.add_device(name)
        return ["run", "--device", str(device.device_number),
                "--secret-file", key_file(self, device.secret), "--broker", self.address,
                "--state", os.path.abspath(self.mktemp()), "--linger", "2"]

    @defer.inlineCallbacks
    def test_output_closed_from_the_start_exits_1(self):
        """With standard output closed from the start, what was read is still reported,
        and the first desired value it cannot print stops the node with status 1 and
        one message."""
        args = yield self.run_args("cli-no-out")
        yield self.registry.update_desired("cli-no-out", {"led": "on"})
        process, child = spawn_node(self, *args, fds={0: "w", 2: "r"})
        process.writeToChild(0, b'{"t": 1}\n')
        yield wait_until(self, lambda: self.registry.device("cli-no-out").reported.get("t")
                         == 1, what="reported without a standard output")
        code = yield child.ended
        self.assertEqual(code, 1, child.err)
        self.assertIn(b"cannot write to standard output", child.err)
        self.assertNotIn(b"Traceback", child.err)

    @defer.inlineCallbacks
    def test_input_closed_from_the_start_is_end_of_input(self):
        """With standard input closed from the start, run ends as at the end of an
        empty input: status 0 once its session is acknowledged, no traceback."""
        args = yield self.run_args("cli-no-in")
        process, child = spawn_node(self, *args, fds={1: "r", 2: "r"})
        code = yield child.ended
        self.assertEqual(code, 0, child.err)
        self.assertEqual(child.err, b"")

    @defer.inlineCallbacks
    def test_slow_reader_of_output_loses_nothing(self):
        """A reader of stdout that falls behind (its pipe full) slows the node down but
        neither stops it nor loses a line: every command comes out once, in order."""
        device = yield self.registry.add_device("cli-slow")
        process, child = self.spawn(
            "run", "--device", str(device.device_number),
            "--secret-file", key_file(self, device.secret), "--broker", self.address,
            "--state", os.path.abspath(self.mktemp()), "--linger", "2")
        process.writeToChild(0, b'{"temp": 9}\n')
        yield wait_until(self, lambda: self.registry.device("cli-slow").reported.get("temp")
                         == 9, what="reported via the CLI")
        process.pipes[1].stopReading()  # the reader falls behind: the pipe fills up
        endpoint = self.broker.service.ssp_endpoint
        commands = [f"{i:03d}" + "x" * 2000 for i in range(60)]  # 120 KB, over a pipe's 64
        for start in range(0, len(commands), 10):
            yield endpoint.send_command(device.device_number, *commands[start:start + 10])
        yield pause(1.0)
        codes = []
        child.ended.addCallback(codes.append)
        self.assertEqual(codes, [], child.err.decode())
        process.pipes[1].startReading()
        yield wait_until(self, lambda: len(child.lines) >= 1 + len(commands),
                         what="every command printed")
        self.assertEqual([line["$command"] for line in child.lines if "$command" in line],
                         commands)
        process.closeChildFD(0)
        yield wait_until(self, lambda: codes, what="the node's exit")
        self.assertEqual(codes, [0], child.err.decode())
        self.assertEqual(child.err, b"")

    @defer.inlineCallbacks
    def test_full_backlog_pushes_back_on_input(self):
        """More events than the backlog holds, written at once: the node stops reading
        while its backlog is full and goes on as the broker acknowledges, so every event
        is stored once, in order, no line is skipped, and the status is 0."""
        args = yield self.run_args("cli-backlog")
        process, child = self.spawn(*args, "--max-backlog", "5")
        count = 600
        process.writeToChild(0, b"".join(b'{"$event": "%04d%s"}\n' % (i, b"x" * 100)
                                         for i in range(count)))
        process.closeChildFD(0)
        code = yield child.ended
        self.assertEqual((code, child.err), (0, b""))
        view = self.registry.device("cli-backlog")
        stored = [event for entry in view.history if entry[3] in ("reported", "events")
                  for event in (entry[4].get("events", ()) if hasattr(entry[4], "get")
                                else entry[4])]
        self.assertEqual(stored, [f"{i:04d}" + "x" * 100 for i in range(count)])

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
        self.assertEqual(summary["drops"], {})
        self.assertTrue(all(self.registry.device(f"sim-{i}").reported.get("seq")
                            for i in range(4)))

    @defer.inlineCallbacks
    def test_interrupted_simulation_exits_1(self):
        """simulate stopped by SIGINT before its end says so and exits 1 (no summary is no
        success)."""
        device = yield self.registry.add_device("sim-int")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write(json.dumps({"device_number": str(device.device_number),
                                     "key": format_key(device.secret)}) + "\n")
        process, child = self.spawn("simulate", "--devices", "1", "--rate", "5",
                                    "--duration", "30", "--broker", self.address,
                                    "--keys", path)
        yield wait_until(self, lambda: self.registry.device("sim-int").reported.get("seq"),
                         what="the simulated device reporting")
        process.signalProcess("INT")
        code = yield child.ended
        self.assertEqual(code, 1)
        self.assertIn(b"stopped before its end", child.err)
        self.assertEqual(child.lines, [])
