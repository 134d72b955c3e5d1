"""sd_notify messages, the watchdog timer and socket-activation descriptors (broker.systemd)."""

import os
import socket
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.systemd import Activation, Notifier, listen_udp, notify, watchdog_interval


def notify_socket(testcase):
    """A bound AF_UNIX datagram socket in a short private directory: (socket, path)."""
    directory = tempfile.mkdtemp(prefix="sd")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    testcase.addCleanup(os.rmdir, directory)
    testcase.addCleanup(os.unlink, path)
    testcase.addCleanup(sock.close)
    return sock, path


class NotifyTests(SynchronousTestCase):
    def test_message_reaches_notify_socket(self):
        """notify() sends its text as one datagram to the path in NOTIFY_SOCKET."""
        sock, path = notify_socket(self)
        self.assertTrue(notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=up")

    def test_abstract_namespace(self):
        """A NOTIFY_SOCKET starting with @ names a socket in the abstract namespace."""
        name = f"ssp-broker-test-{os.getpid()}-{id(self)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind("\0" + name)
        sock.settimeout(5)
        self.assertTrue(notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(sock.recv(4096), b"WATCHDOG=1")

    def test_not_under_systemd(self):
        """Without NOTIFY_SOCKET nothing is sent and notify() says so."""
        self.assertFalse(notify("READY=1", {}))

    def test_unreachable_socket_is_logged_not_raised(self):
        """A NOTIFY_SOCKET nobody listens on gives False and a logged warning, never an exception."""
        path = os.path.join(tempfile.mkdtemp(prefix="sd"), "gone")
        self.addCleanup(os.rmdir, os.path.dirname(path))
        with capturedLogs() as events:
            self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": path}))
        warnings = [formatEvent(event) for event in events if event["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(path, warnings[0])


class WatchdogTests(SynchronousTestCase):
    def test_interval_is_half_the_timeout(self):
        """WATCHDOG_USEC=30 s gives a ping every 15 s; another process's WATCHDOG_PID gives none."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=7), 15.0)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"},
                                           pid=7), 15.0)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"},
                                            pid=7))
        self.assertIsNone(watchdog_interval({}, pid=7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "zero"}, pid=7))

    def test_pings_from_one_looping_call(self):
        """The notifier pings WATCHDOG=1 at start and every half timeout, and stops on stop."""
        sock, path = notify_socket(self)
        sock.setblocking(False)
        clock = Clock()
        notifier = Notifier(clock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        notifier.startService()
        clock.advance(1.0)
        clock.advance(1.0)
        notifier.stopService()
        clock.advance(5.0)
        pings = []
        while True:
            try:
                pings.append(sock.recv(4096))
            except BlockingIOError:
                break
        self.assertEqual(pings, [b"WATCHDOG=1"] * 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_watchdog_no_timer(self):
        """Without WATCHDOG_USEC the notifier schedules nothing."""
        clock = Clock()
        notifier = Notifier(clock, {})
        notifier.startService()
        self.addCleanup(notifier.stopService)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_state_messages(self):
        """ready, reloading and stopping send the sd_notify keys systemd waits for."""
        sock, path = notify_socket(self)
        notifier = Notifier(Clock(), {"NOTIFY_SOCKET": path})
        notifier.ready("serving")
        notifier.reloading()
        notifier.stopping()
        ready, reloading, stopping = (sock.recv(4096).decode() for _ in range(3))
        self.assertEqual(ready, "READY=1\nSTATUS=serving")
        self.assertTrue(reloading.startswith("RELOADING=1\nMONOTONIC_USEC="))
        self.assertTrue(stopping.startswith("STOPPING=1\n"))


class ActivationTests(SynchronousTestCase):
    def test_reads_descriptors_for_this_pid_only(self):
        """LISTEN_FDS counts descriptors from 3, only when LISTEN_PID is this process."""
        environ = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:ssp"}
        activation = Activation.from_environment(environ, pid=42)
        self.assertEqual((activation.fds, activation.names), ((3, 4), ("web", "ssp")))
        self.assertEqual(Activation.from_environment(environ, pid=43).fds, ())
        self.assertEqual(Activation.from_environment({}, pid=42).fds, ())

    def test_environment_left_alone(self):
        """Reading the activation variables does not remove them (Twisted's parser still needs them)."""
        environ = {"LISTEN_PID": "42", "LISTEN_FDS": "1"}
        Activation.from_environment(environ, pid=42)
        self.assertEqual(environ, {"LISTEN_PID": "42", "LISTEN_FDS": "1"})

    def test_finds_the_datagram_socket(self):
        """Among inherited stream and datagram sockets, the UDP one is found with its family."""
        stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        datagram = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.addCleanup(stream.close)
        self.addCleanup(datagram.close)
        activation = Activation([stream.fileno(), datagram.fileno()])
        self.assertEqual(activation.datagram_socket(), (datagram.fileno(), socket.AF_INET6))
        self.assertIsNone(Activation([stream.fileno()]).datagram_socket())

    def test_two_datagram_sockets_refused(self):
        """Two inherited UDP sockets are ambiguous: a clear error, not a guess."""
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        self.assertRaises(ValueError, Activation([first.fileno(), second.fileno()]).datagram_socket)


class Collector(DatagramProtocol):
    def __init__(self):
        self.received = defer.Deferred()

    def datagramReceived(self, data, addr):
        if not self.received.called:
            self.received.callback(data)


class ListenUDPTests(TestCase):
    timeout = 10

    def test_adopts_inherited_socket(self):
        """listen_udp adopts a blocking inherited UDP socket, makes it non-blocking and serves on it."""
        inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        inherited.bind(("127.0.0.1", 0))
        address = inherited.getsockname()
        fd = inherited.detach()  # listen_udp closes it once the port holds its duplicate
        self.assertTrue(os.get_blocking(fd))
        activation = Activation([fd])
        protocol = Collector()
        port = listen_udp(reactor, activation, protocol, port=1, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, address[1])
        self.assertFalse(os.get_blocking(port.fileno()))
        self.assertIsNone(activation.datagram_socket(), "adopted twice")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"hello", address)
        return protocol.received.addCallback(self.assertEqual, b"hello")

    def test_log_names_where_the_socket_came_from(self):
        """The adoption line says "socket-activated" for systemd's socket and names the
        supervisor for a worker's, so operators can trust it to tell them apart."""
        lines = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        for origin in (None, "the supervisor's"):
            inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            inherited.bind(("127.0.0.1", 0))
            fd = inherited.detach()
            activation = Activation([fd]) if origin is None else Activation([fd], origin=origin)
            port = listen_udp(reactor, activation, Collector(), port=1, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
        adopted = [formatEvent(event) for event in lines if "adopted" in formatEvent(event)]
        self.assertEqual(len(adopted), 2)
        self.assertIn("adopted the socket-activated UDP socket 127.0.0.1:", adopted[0])
        self.assertIn("adopted the supervisor's UDP socket 127.0.0.1:", adopted[1])

    def test_binds_without_activation(self):
        """Without an inherited socket listen_udp binds the configured interface and port."""
        port = listen_udp(reactor, Activation(), Collector(), port=0, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().host, "127.0.0.1")
        self.assertNotEqual(port.getHost().port, 0)
