"""The supervisor's HTTP port reservation over connections of an earlier run left in
TIME_WAIT (real sockets on loopback): after a single-process broker's stop, the
port is still the broker's to take, and still refused to another broker."""

import errno
import socket

from twisted.trial.unittest import TestCase

from broker.config import ConfigError, parse_config
from broker.steering import reserve_tcp_port
from broker.workers import SupervisorService

HOST = "127.0.0.1"
#: the state number of TIME_WAIT in /proc/net/tcp (include/net/tcp_states.h).
TIME_WAIT = "06"


def time_wait_port(testcase):
    """A loopback port whose only sockets are a connection in TIME_WAIT, as a
    single-process broker leaves them: its listener (SO_REUSEADDR, no
    SO_REUSEPORT, as Twisted's) accepted a connection and closed it first."""
    listener = socket.socket()
    testcase.addCleanup(listener.close)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = socket.create_connection((HOST, port), timeout=5)
    testcase.addCleanup(client.close)
    accepted, _ = listener.accept()
    accepted.close()                          # the server closes first: its side waits
    testcase.assertEqual(client.recv(16), b"")
    client.close()
    listener.close()
    testcase.assertEqual(local_states(port), [TIME_WAIT])
    return port


def local_states(port):
    """The TCP states of the IPv4 sockets whose local port is ``port`` (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return [row[3] for row in rows if int(row[1].rsplit(":", 1)[1], 16) == port]


class ReservationOverTimeWaitTests(TestCase):
    """reserve_tcp_port and the supervisor on a port with TIME_WAIT connections."""

    def test_a_single_process_runs_time_wait_connections_do_not_refuse_it(self):
        """The port a single-process broker served just before (its connections in
        TIME_WAIT, without SO_REUSEPORT) is reserved; before, the bind with
        SO_REUSEPORT alone failed and `workers = 2` refused to start (exit 2)."""
        port = time_wait_port(self)
        with socket.socket() as plain, self.assertRaises(OSError) as caught:
            plain.bind((HOST, port))          # the port is held: by TIME_WAIT only
        self.assertEqual(caught.exception.errno, errno.EADDRINUSE)
        reservation = reserve_tcp_port(HOST, port)
        self.addCleanup(reservation.close)
        self.assertEqual(reservation.getsockname(), (HOST, port))
        self.assertEqual(reservation.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR), 0)
        self.assertEqual(reservation.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)

    def test_a_reservation_made_over_time_wait_still_refuses_another_broker(self):
        """Once reserved over TIME_WAIT, the port is refused to a second reservation (a
        second broker's supervisor) instead of being shared with it."""
        port = time_wait_port(self)
        reservation = reserve_tcp_port(HOST, port)
        self.addCleanup(reservation.close)
        with self.assertRaises(OSError) as caught:
            reserve_tcp_port(HOST, port)
        self.assertEqual(caught.exception.errno, errno.EADDRINUSE)

    def test_the_supervisor_starts_on_the_port_and_workers_can_listen(self):
        """A supervisor of two workers takes the HTTP port over the TIME_WAIT
        connections, and a worker's listener (SO_REUSEADDR and SO_REUSEPORT) joins it."""
        port = time_wait_port(self)
        config = parse_config({"broker": {"workers": 2, "data_dir": self.mktemp()},
                               "http": {"endpoint": f"tcp:{port}:interface={HOST}"},
                               "ssp": {"enabled": False},
                               "registry": {"backend": "redis"}})
        try:
            supervisor = SupervisorService(config, "broker.toml", environ={})
        except ConfigError as problem:
            self.fail(f"refused: {problem}")
        self.addCleanup(supervisor.http_reservation.close)
        self.assertEqual(supervisor.http_port, port)
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((HOST, port))
            listener.listen(1)
            with socket.create_connection((HOST, port), timeout=5) as client:
                accepted, _ = listener.accept()
                accepted.close()
                self.assertEqual(client.recv(16), b"")
