"""The DatagramProtocol bound to the SSP port (placeholder until the endpoint lands)."""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger


class SSPEndpoint(DatagramProtocol):
    """Receives every datagram of the fleet on one port."""

    log = Logger()

    def __init__(self) -> None:
        self.datagrams_received = 0

    def datagramReceived(self, datagram: bytes, addr) -> None:
        self.datagrams_received += 1
