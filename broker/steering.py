"""Steering by device on one shared port: SO_REUSEPORT sockets and a classic BPF program.

The supervisor (broker/workers.py) opens N UDP sockets on the SSP port and
attaches to their group a program that picks the socket from the device
number in the datagram's header (wire.md 1): every datagram of a device
reaches the same worker, whatever its source address. HTTP needs no
steering: each worker listens with its own SO_REUSEPORT socket.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from broker.config import ConfigError, _endpoint_fields

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


def refuse_port_in_use(family: int, kind: int, host: str, port: int) -> None:
    """OSError (EADDRINUSE) when something already holds the port, as a plain bind says.

    With SO_REUSEPORT alone, our sockets would silently join the group of
    another process of this user holding the port (a second broker, or the
    orphans of a killed one): that process's steering program would keep
    its datagrams or split the devices between the two brokers, and HTTP
    connections would be spread over both. A probe bound without
    SO_REUSEPORT (with SO_REUSEADDR for TCP, as a listener has: our own last
    run's TIME_WAIT connections are no conflict) fails on any such holder.
    """
    if not port:
        return    # an ephemeral port is free by definition
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def steered_udp_sockets(host: str, port: int, workers: int) -> list[socket.socket]:
    """N UDP sockets on one port with SO_REUSEPORT and the steering program.

    OSError when the port cannot be bound, also when another process's
    SO_REUSEPORT sockets hold it; ConfigError with the fallback when the
    kernel lacks the steering option.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    refuse_port_in_use(family, socket.SOCK_DGRAM, host, port)
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
    """A bound, not listening, SO_REUSEPORT socket holding the HTTP port for the workers
    (OSError when another process holds the port, also with SO_REUSEPORT).

    Connections of an earlier run in TIME_WAIT on the port (a single-process
    broker's have no SO_REUSEPORT) refuse a bind with SO_REUSEPORT alone: the
    bind is then made with SO_REUSEADDR, as a listener's, which is cleared
    once bound, so that another broker's probe (refuse_port_in_use) still
    finds the port held.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    refuse_port_in_use(family, socket.SOCK_STREAM, host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as problem:
            if problem.errno != errno.EADDRINUSE:
                raise
            # The probe passed: only sockets that allow SO_REUSEADDR hold the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError:
        sock.close()
        raise
    return sock


def _plain_tcp_only(kind: str) -> str:
    """Why workers > 1 refuse an endpoint of this kind, for the refusal line."""
    kind = kind.lower()
    if kind in ("ssl", "tls"):
        return "TLS belongs on a proxy in front"
    if kind == "systemd":
        return ("socket activation cannot be combined with workers: the supervisor binds "
                "the port and shares it among the workers; docs/operations.md, "
                "\"Socket activation\"")
    return "the workers share one TCP port"


def parse_tcp_endpoint(description: str, key: str = "http.endpoint",
                       source: str | None = None) -> tuple[str, int, int]:
    """(interface, port, backlog) of a ``tcp:PORT[:interface=H][:backlog=N]`` endpoint
    string (``tcp6:``, ``port=PORT`` and backslash-escaped colons as Twisted reads
    them: ``interface=\\:\\:1``); the refusal names ``key`` and the config file ``source``."""
    where = f"{source}: {key}" if source else key
    kind, *fields = _endpoint_fields(description)
    positional = [field for field in fields if "=" not in field]
    options = dict(field.split("=", 1) for field in fields if "=" in field)
    port = options.pop("port", None)
    if port is None and positional:
        port = positional.pop(0)
    if kind.lower() not in ("tcp", "tcp6"):
        raise ConfigError(f"{where}: workers > 1 need a plain tcp:PORT endpoint "
                          f"({_plain_tcp_only(kind)}), not {description!r}")
    # After the port, Twisted reads unnamed fields as the interface, then the backlog.
    for name, value in zip(("interface", "backlog"), positional):
        if name in options or len(positional) > 2:
            raise ConfigError(f"{where}: {description!r}: {value!r} has no name: "
                              "write interface=ADDRESS, backlog=N")
        options[name] = value
    unknown = sorted(set(options) - {"interface", "backlog"})
    if port is None or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: {description!r} needs a port of 0 to 65535")
    if unknown:
        raise ConfigError(f"{where}: {description!r}: unknown option {unknown[0]!r} "
                          "(workers > 1 take interface and backlog)")
    backlog = options.get("backlog", "50")
    if not backlog.isdigit() or not 1 <= int(backlog) <= 65535:
        raise ConfigError(f"{where}: {description!r}: backlog must be a whole number "
                          f"of 1 to 65535, not {backlog!r}")
    default = "::" if kind.lower() == "tcp6" else "0.0.0.0"
    return options.get("interface", default), int(port), int(backlog)


def worker_metrics_address(description: str, index: int, count: int,
                           source: str | None = None) -> tuple[str, int, int]:
    """(interface, port, backlog) of worker ``index``'s own metrics listener.

    Each worker is a scrape target of its own (its counters are its own):
    ``tcp:PORT`` gives worker i the port PORT + i, ``tcp:0`` an ephemeral one.
    """
    host, port, backlog = parse_tcp_endpoint(description, "metrics.endpoint", source)
    if port and port + count - 1 > 65535:
        where = f"{source}: metrics.endpoint" if source else "metrics.endpoint"
        raise ConfigError(f"{where}: worker i listens on port {port} + i, and "
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
