"""The kernel steers each device's datagrams to one socket of the reuseport group (real sockets)."""

import os
import random
import select
import socket
import struct

from twisted.trial.unittest import SkipTest, TestCase

from broker.config import ConfigError
from broker import steering as steering_module
from broker.steering import (parse_tcp_endpoint, reserve_tcp_port, steered_udp_sockets,
                             steering_program, worker_of)
from broker.workers import SupervisorService


def datagram(number, session_id=1):
    """A datagram with the broker header (wire.md 1) and some ciphertext-sized padding."""
    return struct.pack(">BQQ", 1, number, session_id) + os.urandom(40)


class SteeringTests(TestCase):
    """SO_ATTACH_REUSEPORT_CBPF steering on loopback."""

    host = "127.0.0.1"
    family = socket.AF_INET

    def setUp(self):
        self.workers = steered_udp_sockets(self.host, 0, 2)
        self.port = self.workers[0].getsockname()[1]
        self.clients = [socket.socket(self.family, socket.SOCK_DGRAM) for _ in range(4)]
        for client in self.clients:
            client.bind((self.host, 0))
        for sock in self.workers + self.clients:
            self.addCleanup(sock.close)

    def drain(self, seen, expect):
        """Read datagrams from the worker sockets until ``expect`` arrived (bounded)."""
        got = 0
        while got < expect:
            ready, _, _ = select.select(self.workers, [], [], 2.0)
            self.assertTrue(ready, f"only {got} of {expect} datagrams arrived")
            for sock in ready:
                data = sock.recv(2048)
                index = self.workers.index(sock)
                if len(data) >= 9:
                    number = struct.unpack_from(">Q", data, 1)[0]
                    seen.setdefault(number, set()).add(index)
                else:
                    seen.setdefault("short", set()).add(index)
                got += 1

    def send_all(self, numbers, rotation, seen):
        for start in range(0, len(numbers), 100):
            chunk = numbers[start:start + 100]
            for i, number in enumerate(chunk):
                client = self.clients[(start + i + rotation) % len(self.clients)]
                client.sendto(datagram(number, session_id=rotation + 1), (self.host, self.port))
            self.drain(seen, len(chunk))

    def test_every_device_reaches_one_worker_also_after_roaming(self):
        """1,000 devices from 4 source ports, then each from another port and session: each always lands on worker_of(number)."""
        rng = random.Random(7)
        numbers = [rng.getrandbits(63) | 1 for _ in range(1000)]
        seen = {}
        self.send_all(numbers, 0, seen)
        self.send_all(numbers, 1, seen)
        self.send_all(numbers, 2, seen)
        for number in numbers:
            self.assertEqual(seen[number], {worker_of(number, 2)}, number)
        shares = [sum(1 for n in numbers if worker_of(n, 2) == i) for i in range(2)]
        self.assertGreater(min(shares), 400)

    def test_short_datagram_goes_to_worker_zero(self):
        """A datagram too short for a device number is steered to worker 0 (which drops it)."""
        self.clients[0].sendto(b"\x01\x02", (self.host, self.port))
        seen = {}
        self.drain(seen, 1)
        self.assertEqual(seen["short"], {0})

    def test_program_matches_python_mapping(self):
        """The BPF program divides by the worker count it was built for."""
        self.assertEqual(steering_program(3)[4][3], 3)
        self.assertEqual(worker_of((5 << 32) | 6, 3), (5 ^ 6) % 3)


class SteeringIPv6Tests(SteeringTests):
    """The same steering on ::1: the program's offsets count from the UDP
    payload whatever the IP header's length."""

    host = "::1"
    family = socket.AF_INET6

    def setUp(self):
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                probe.bind(("::1", 0))
        except OSError as problem:
            raise SkipTest(f"no IPv6 loopback here: {problem}") from None
        super().setUp()


class SteeringFallbackTests(TestCase):
    """Where the workers' ports cannot be set up, the supervisor refuses to start, saying why."""

    def held_port(self, kind):
        holder = socket.socket(socket.AF_INET, kind)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        return holder.getsockname()[1]

    def config(self, **ssp):
        from broker.config import parse_config
        return parse_config({"broker": {"workers": 2, "data_dir": self.mktemp()},
                             "http": {"endpoint": ssp.pop("http", "tcp:0:interface=127.0.0.1")},
                             "ssp": {"host": "127.0.0.1", **ssp},
                             "registry": {"backend": "redis"}}, source="broker.toml")

    def test_udp_port_in_use_names_ssp_port(self):
        """A UDP port held by another socket is a ConfigError naming ssp.port, not the kernel."""
        port = self.held_port(socket.SOCK_DGRAM)
        with self.assertRaises(ConfigError) as caught:
            SupervisorService(self.config(port=port), "broker.toml")
        message = str(caught.exception)
        self.assertIn(f"broker.toml: ssp.port: cannot listen on UDP 127.0.0.1:{port}", message)
        self.assertNotIn("Linux", message)

    def test_http_port_in_use_names_http_endpoint(self):
        """An HTTP port held by another socket is a ConfigError naming http.endpoint."""
        port = self.held_port(socket.SOCK_STREAM)
        with self.assertRaises(ConfigError) as caught:
            SupervisorService(self.config(port=0, http=f"tcp:{port}:interface=127.0.0.1"),
                              "broker.toml")
        self.assertIn("broker.toml: http.endpoint: cannot listen on", str(caught.exception))

    def test_udp_port_of_another_broker_is_refused(self):
        """A UDP port already held by another broker's workers (an SO_REUSEPORT group) is
        refused naming ssp.port, instead of joining that group: the other broker's
        steering would keep every datagram, or split the devices between the two."""
        others = steered_udp_sockets("127.0.0.1", 0, 2)
        for sock in others:
            self.addCleanup(sock.close)
        port = others[0].getsockname()[1]
        with self.assertRaises(ConfigError) as caught:
            SupervisorService(self.config(port=port), "broker.toml")
        self.assertIn(f"broker.toml: ssp.port: cannot listen on UDP 127.0.0.1:{port}",
                      str(caught.exception))

    def test_http_port_of_another_broker_is_refused(self):
        """An HTTP port another broker's supervisor holds (an SO_REUSEPORT reservation)
        is refused naming http.endpoint, not shared with it."""
        other = reserve_tcp_port("127.0.0.1", 0)
        self.addCleanup(other.close)
        port = other.getsockname()[1]
        with self.assertRaises(ConfigError) as caught:
            SupervisorService(self.config(port=0, http=f"tcp:{port}:interface=127.0.0.1"),
                              "broker.toml")
        self.assertIn("broker.toml: http.endpoint: cannot listen on", str(caught.exception))

    def test_ports_free_again_once_the_other_broker_is_gone(self):
        """The refusal is only while the port is held: the same UDP and HTTP ports are
        taken once the earlier holders closed them."""
        udp = steered_udp_sockets("127.0.0.1", 0, 2)
        http = reserve_tcp_port("127.0.0.1", 0)
        ports = udp[0].getsockname()[1], http.getsockname()[1]
        for sock in udp + [http]:
            sock.close()
        supervisor = SupervisorService(
            self.config(port=ports[0], http=f"tcp:{ports[1]}:interface=127.0.0.1"),
            "broker.toml")
        for sock in supervisor.udp_sockets + [supervisor.http_reservation]:
            self.addCleanup(sock.close)
        self.assertEqual((supervisor.udp_port, supervisor.http_port), ports)

    def test_kernel_without_steering_names_the_fallback(self):
        """A kernel that refuses the steering program gives the fallback of docs/scaling.md."""
        def refuse(sock, workers):
            raise OSError(92, "Protocol not available")
        self.patch(steering_module, "attach_steering", refuse)
        with self.assertRaises(ConfigError) as caught:
            steered_udp_sockets("127.0.0.1", 0, 2)
        self.assertIn("docs/scaling.md", str(caught.exception))


class TcpEndpointTests(TestCase):
    """The tcp: endpoint strings whose port the workers share, read as Twisted reads them."""

    def test_ipv6_interface_with_escaped_colons(self):
        """An IPv6 interface is written with backslash-escaped colons (Twisted's syntax):
        it is read as the address, not cut at its first colon."""
        self.assertEqual(parse_tcp_endpoint("tcp:8080:interface=\\:\\:1"), ("::1", 8080, 50))
        self.assertEqual(parse_tcp_endpoint("tcp:port=8080:backlog=7:interface=127.0.0.1"),
                         ("127.0.0.1", 8080, 7))
        self.assertEqual(parse_tcp_endpoint("tcp6:8080"), ("::", 8080, 50))

    def test_bad_options_are_refused_naming_the_setting(self):
        """A backlog that is not a number, or an option the workers' listener does not
        know, is a ConfigError naming the setting, not a traceback nor silently ignored."""
        for description, words in (("tcp:8080:backlog=many", "backlog"),
                                   ("tcp:8080:interfce=127.0.0.1", "interfce"),
                                   ("tcp:interface=127.0.0.1", "port")):
            with self.assertRaises(ConfigError) as caught:
                parse_tcp_endpoint(description, "metrics.endpoint")
            self.assertIn("metrics.endpoint", str(caught.exception))
            self.assertIn(words, str(caught.exception))

    def test_supervisor_holds_an_ipv6_http_port(self):
        """workers > 1 with an HTTP endpoint on ::1: the supervisor reserves that port
        on ::1 (before, it tried to resolve a host named backslash)."""
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
        except OSError as problem:
            raise SkipTest(f"no IPv6 loopback here: {problem}") from None
        from broker.config import parse_config
        config = parse_config({"broker": {"workers": 2, "data_dir": self.mktemp()},
                               "http": {"endpoint": "tcp:0:interface=\\:\\:1"},
                               "ssp": {"host": "::1", "port": 0},
                               "registry": {"backend": "redis"}})
        supervisor = SupervisorService(config, None)
        for sock in supervisor.udp_sockets + [supervisor.http_reservation]:
            self.addCleanup(sock.close)
        self.assertEqual(supervisor.http_reservation.getsockname()[0], "::1")
        self.assertEqual(supervisor.udp_sockets[0].getsockname()[0], "::1")
