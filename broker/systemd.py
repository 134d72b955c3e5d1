"""systemd integration: readiness and watchdog notifications, socket activation.

Notifications follow sd_notify(3): one datagram of `KEY=value` lines to the
AF_UNIX socket named by $NOTIFY_SOCKET (a leading "@" names the abstract
namespace). It is a dozen lines over the standard library, so we write them
rather than take a dependency that swallows errors silently.

Socket activation (sd_listen_fds(3)): systemd passes listening sockets from
fd 3 on, with $LISTEN_FDS, $LISTEN_PID and $LISTEN_FDNAMES. Importing
`twisted.internet.endpoints` consumes LISTEN_FDS and LISTEN_PID from the
environment (Twisted keeps its own copy for `systemd:` endpoint strings), so
this module takes a snapshot when it is imported: broker.tap imports it
before anything else. The HTTP listener uses Twisted's `systemd:domain=INET:
index=N` endpoints; the UDP socket for SSP is the one inherited descriptor of
type SOCK_DGRAM, adopted with `reactor.adoptDatagramPort` (`listen_udp`).
"""

from __future__ import annotations

import os
import socket
import sys
import time

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

_FIRST_FD = 3  # SD_LISTEN_FDS_START


class Activation:
    """The descriptors systemd passed to this process (none when not socket-activated),
    or a supervisor to its worker (``origin`` says which, for the log)."""

    def __init__(self, fds=(), names=(), origin: str = "the socket-activated") -> None:
        self.fds = tuple(fds)
        self.names = tuple(names)
        self.origin = origin
        self.adopted = set()

    def __repr__(self) -> str:
        return f"Activation(fds={self.fds!r}, names={self.names!r})"

    @classmethod
    def from_environment(cls, environ=None, pid=None) -> "Activation":
        """Read $LISTEN_FDS for this pid without changing the environment."""
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        if environ.get("LISTEN_PID") != str(pid):
            return cls()
        try:
            count = int(environ.get("LISTEN_FDS", ""))
        except ValueError:
            return cls()
        names = tuple(filter(None, environ.get("LISTEN_FDNAMES", "").split(":")))
        return cls(range(_FIRST_FD, _FIRST_FD + max(count, 0)), names)

    def datagram_socket(self):
        """(fd, address family) of the inherited UDP socket not yet adopted, or None."""
        found = []
        for fd in self.fds:
            if fd in self.adopted:
                continue
            try:
                probe = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            with probe:
                if probe.type == socket.SOCK_DGRAM and probe.family in (socket.AF_INET,
                                                                         socket.AF_INET6):
                    found.append((fd, probe.family))
        if len(found) > 1:
            raise ValueError(f"systemd passed {len(found)} UDP sockets; the broker takes one")
        return found[0] if found else None


def _snapshot() -> Activation:
    activation = Activation.from_environment()
    if activation.fds or "twisted.internet.endpoints" not in sys.modules:
        return activation
    # Something imported Twisted's endpoints before us and consumed the
    # variables; its parser kept the descriptors it found for this pid.
    from twisted.internet.endpoints import _SystemdParser
    inherited = _SystemdParser._sddaemon
    return Activation(inherited.inheritedDescriptors(), inherited.inheritedNamedDescriptors())


#: taken once, at import, before anything can consume the environment.
INHERITED = _snapshot()


def listen_udp(reactor, activation: Activation, protocol, *, port: int, interface: str = "",
               max_packet_size: int = 8192):
    """The SSP port: the socket-activated UDP socket if systemd passed one, else a new bind.

    Returns the IListeningPort. The UDP service calls this from its
    `_getPort` (twisted.application.internet.UDPServer's hook).
    """
    found = activation.datagram_socket()
    if found is None:
        return reactor.listenUDP(port, protocol, interface=interface,
                                 maxPacketSize=max_packet_size)
    fd, family = found
    # systemd hands sockets over in blocking mode; the reactor needs them non-blocking.
    os.set_blocking(fd, False)
    listening = reactor.adoptDatagramPort(fd, family, protocol, max_packet_size)
    os.close(fd)  # the port holds its own duplicate
    activation.adopted.add(fd)
    host = listening.getHost()
    log.info("SSP: adopted {origin} UDP socket {host}:{port} "
             "([ssp] host and port are not used)", origin=activation.origin,
             host=host.host, port=host.port)
    return listening


def notify(message: str, environ=None) -> bool:
    """Send one sd_notify message; False when not under systemd (or it failed, logged)."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the reactor on a busy systemd: a full queue is an error, logged.
            sock.sendto(message.encode("utf-8"), socket.MSG_DONTWAIT, address)
    except OSError as problem:
        log.warn("sd_notify to {address} failed: {problem}", address=address, problem=str(problem))
        return False
    return True


def watchdog_interval(environ=None, pid=None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds when the watchdog is on for this process, else None."""
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    if environ.get("WATCHDOG_PID", str(pid)) != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier(Service):
    """Tells systemd when the broker is ready, reloading or stopping, and pets the watchdog.

    The watchdog ping comes from one LoopingCall on the reactor, so a
    reactor that stops turning stops the pings and systemd restarts us.
    """

    name = "systemd"

    def __init__(self, clock, environ=None) -> None:
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self._watchdog = None

    def send(self, *lines: str) -> bool:
        return notify("\n".join(lines), self.environ)

    def startService(self) -> None:
        super().startService()
        interval = watchdog_interval(self.environ)
        if interval is not None:
            self._watchdog = LoopingCall(self.send, "WATCHDOG=1")
            self._watchdog.clock = self.clock
            self._watchdog.start(interval, now=True)
            log.info("systemd watchdog: pinging every {interval} s", interval=interval)

    def stopService(self):
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd (Type=notify-reload) wants the CLOCK_MONOTONIC time of the reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: draining clients")
