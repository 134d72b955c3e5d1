"""Steering by device on one shared port: SO_REUSEPORT sockets and a classic BPF program.

The supervisor (broker/workers.py) opens N UDP sockets on the SSP port and
attaches to their group a program that picks the socket from the device
number in the datagram's header (wire.md 1): every datagram of a device
reaches the same worker, whatever its source address. HTTP needs no
steering: each worker listens with its own SO_REUSEPORT socket.
"""

from __future__ import annotations

import ctypes
import socket
import struct

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from broker.config import ConfigError

#: Linux socket option numbers (asm-generic/socket.h).
SO_ATTACH_REUSEPORT_CBPF = 51

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS = 0x20
_TAX = 0x07
_XOR_X = 0xAC
_MOD_K = 0x94
_RET_A = 0x16


def worker_of(device_number: int, workers: int) -> int:
    """The worker the steering program picks for a device (the program's arithmetic)."""
    return ((device_number >> 32) ^ (device_number & 0xFFFFFFFF)) % workers


def steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """The BPF program: socket index = (high u32 ^ low u32 of the device number) % workers.

    For UDP the program sees the datagram from its first payload byte, so
    the device number is at offset 1 (after the framing version). A
    datagram too short to hold it makes the load fail and the program
    return 0: worker 0 drops it as malformed.
    """
    return [(_LD_W_ABS, 0, 0, 1), (_TAX, 0, 0, 0), (_LD_W_ABS, 0, 0, 5), (_XOR_X, 0, 0, 0),
            (_MOD_K, 0, 0, workers), (_RET_A, 0, 0, 0)]


def attach_steering(sock: socket.socket, workers: int) -> None:
    """Attach the steering program to sock's reuseport group; OSError if the kernel cannot."""
    program = steering_program(workers)
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def steered_udp_sockets(host: str, port: int, workers: int) -> list[socket.socket]:
    """N UDP sockets on one port with SO_REUSEPORT and the steering program.

    OSError when the port cannot be bound; ConfigError with the fallback
    when the kernel lacks the steering option.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    try:
        attach_steering(sockets[0], workers)
    except OSError as problem:
        for sock in sockets:
            sock.close()
        raise ConfigError(
            f"broker.workers: cannot steer UDP datagrams by device on {host}:{port} "
            f"({problem.strerror or problem}); this needs Linux >= 4.5 "
            "(SO_ATTACH_REUSEPORT_CBPF). Run workers = 1, one broker per port or host "
            "(see docs/scaling.md)") from None
    for sock in sockets:
        sock.setblocking(False)
    return sockets


def reserve_tcp_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket holding the HTTP port for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def parse_tcp_endpoint(description: str, key: str = "http.endpoint") -> tuple[str, int, int]:
    """(interface, port, backlog) of a ``tcp:PORT[:interface=H][:backlog=N]`` endpoint
    string; ``key`` names the setting in the refusal."""
    parts = description.split(":")
    if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit():
        raise ConfigError(f"{key}: workers > 1 need a plain tcp:PORT endpoint "
                          f"(TLS belongs on a proxy in front), not {description!r}")
    options = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
    return options.get("interface", "0.0.0.0"), int(parts[1]), int(options.get("backlog", 50))


def worker_metrics_address(description: str, index: int, count: int) -> tuple[str, int, int]:
    """(interface, port, backlog) of worker ``index``'s own metrics listener.

    Each worker is a scrape target of its own (its counters are its own):
    ``tcp:PORT`` gives worker i the port PORT + i, ``tcp:0`` an ephemeral one.
    """
    host, port, backlog = parse_tcp_endpoint(description, "metrics.endpoint")
    if port and port + count - 1 > 65535:
        raise ConfigError(f"metrics.endpoint: worker i listens on port {port} + i, and "
                          f"{count} workers need ports up to {port + count - 1} (max 65535)")
    return host, (port + index if port else 0), backlog


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose listening socket has SO_REUSEPORT (a worker's HTTP port)."""

    def __init__(self, reactor, host, port, backlog=50):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.backlog = backlog

    def listen(self, factory):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as problem:
            return defer.fail(error.CannotListenError(self.host, self.port, problem))
        finally:
            sock.close()  # the port holds its own duplicate
        return defer.succeed(port)
