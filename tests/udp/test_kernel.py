"""Tests for broker.udp.kernel: the receive buffer and the kernel's drop counter."""

import socket

from twisted.trial.unittest import SynchronousTestCase

from broker.udp.kernel import set_receive_buffer, udp_receive_buffer_errors

SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors
Udp: 100 2 7 90 5 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors
UdpLite: 0 0 0 0 0 0 0
"""
SNMP6 = "Udp6InDatagrams                 \t10\nUdp6RcvbufErrors                \t3\n"


class KernelTests(SynchronousTestCase):
    """SO_RCVBUF and /proc/net/snmp{,6} RcvbufErrors."""

    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_receive_buffer_errors_summed(self):
        """IPv4 and IPv6 RcvbufErrors are added up (not UdpLite's)."""
        self.assertEqual(udp_receive_buffer_errors(self.write(SNMP), self.write(SNMP6)), 8)

    def test_missing_files(self):
        """Without the files (not Linux) the counter is None, not an error."""
        self.assertIsNone(udp_receive_buffer_errors(self.mktemp(), self.mktemp()))
        self.assertEqual(udp_receive_buffer_errors(self.write(SNMP), self.mktemp()), 5)

    def test_receive_buffer_is_raised(self):
        """A socket gets a receive buffer larger than the kernel default it started with."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            default = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            granted = set_receive_buffer(sock, 4 * default)
        self.assertGreater(granted, default)
