"""What the kernel does with our UDP socket: its receive buffer and its drops.

Linux's default receive buffer (net.core.rmem_default, about 208 KiB) holds
only a few hundred small datagrams once each one's skb overhead is counted;
a burst from a fleet overflows it and the kernel drops silently.  We ask for
a larger ``SO_RCVBUF`` and export the host-wide ``RcvbufErrors`` counter so
such drops show up in the metrics instead of as mysterious loss.
"""

from __future__ import annotations

import socket

from twisted.logger import Logger

log = Logger()

SNMP_PATH = "/proc/net/snmp"
SNMP6_PATH = "/proc/net/snmp6"


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for an ``SO_RCVBUF`` of size bytes; return what the kernel granted.

    Linux doubles the request for its bookkeeping and caps it at
    net.core.rmem_max unless the process may use SO_RCVBUFFORCE (root), so
    the granted size is logged when it falls short.
    """
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            break
        except OSError:
            continue  # SO_RCVBUFFORCE needs CAP_NET_ADMIN; fall back
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < size:
        log.warn("UDP receive buffer is {granted} bytes, {size} asked: raise "
                 "net.core.rmem_max", granted=granted, size=size)
    return granted


def udp_receive_buffer_errors(snmp_path: str = SNMP_PATH,
                              snmp6_path: str = SNMP6_PATH) -> int | None:
    """Host-wide count of UDP datagrams dropped for a full receive buffer.

    The sum of ``Udp: RcvbufErrors`` in /proc/net/snmp and ``Udp6RcvbufErrors``
    in /proc/net/snmp6; None where neither file exists (not Linux).
    """
    total = None
    try:
        with open(snmp_path, encoding="ascii") as handle:
            lines = [line.split() for line in handle if line.startswith("Udp:")]
        if len(lines) >= 2:
            names, values = lines[0], lines[1]
            if "RcvbufErrors" in names:
                total = int(values[names.index("RcvbufErrors")])
    except (OSError, ValueError):
        pass
    try:
        with open(snmp6_path, encoding="ascii") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "Udp6RcvbufErrors":
                    total = (total or 0) + int(parts[1])
    except (OSError, ValueError):
        pass
    return total
