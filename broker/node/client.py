"""The Twisted side of sensor nodes: UDP sockets, one timer, many devices.

``NodeEndpoint`` hosts any number of ``NodeSession`` objects on a few UDP
sockets (one for a real device, a handful for a simulated fleet): replies
are routed by the device number in their header, and one scheduler drives
every session's wake-up.  ``SSPNode`` is the one-device convenience API.

Called from Twisted: ``_NodeSocket.datagramReceived`` and the scheduler's
timer.  Calls into the core through ``NodeSession``.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import math
import os
import struct
import time

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from broker.node.backlog import MAX_BACKLOG
from broker.node.session import NodeSession
from broker.node.session_ids import SessionIds
from broker.ssp.crypto import CipherCache
from broker.ssp.framing import FRAMING_VERSION, HEADER_SIZE
from broker.ssp.profile import FLEET
from broker.ssp.randomness import BufferedRandom
from broker.scheduler import WakeupScheduler

__all__ = ["NodeEndpoint", "SSPNode", "node_profile"]

_HEADER = struct.Struct(">BQQ")


def node_profile(heartbeat: float = FLEET.ack_interval, rekey_after: float | None = None):
    """The device's timing: FLEET with its heartbeat (wire.md 6), retrying a state
    the broker has not acknowledged (backed off, at most ``backoff_max`` apart) for
    as long as the session lasts: ``rekey_after`` (default three heartbeats, as
    SSPNode's) since the broker was last heard.

    FLEET's ``active_retry_timeout`` (mosh's 10 s) would leave a lossy link to the
    heartbeat: a broker says nothing until it has a whole state, so after 10 s of
    lost tries the node would try once a heartbeat (25 s) while events wait.
    """
    if rekey_after is None:
        rekey_after = 3 * heartbeat
    return dataclasses.replace(FLEET, ack_interval=heartbeat, active_retry_timeout=max(
        FLEET.active_retry_timeout, rekey_after))


def _bind_address(broker_host: str) -> str:
    """Bind on the loopback the broker is on, else on every address of its family."""
    if broker_host in ("127.0.0.1", "::1"):
        return broker_host
    return "::" if ":" in broker_host else "0.0.0.0"


def _numeric(address) -> tuple:
    """(host, port) with a numeric host: datagrams go out without a lookup each.

    An IPv6 socket address (host, port, flowinfo, scope_id) with a scope (a
    link-local broker) keeps its interface as ``host%scope_id``.
    """
    host, port = address[0], address[1]
    if len(address) == 4 and address[3] and "%" not in host:
        host = f"{host}%{address[3]}"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"broker address {host!r} is not a numeric IP address; "
                         "resolve it first (broker-node does)") from None
    return (host, port)


def _sender_of(port):
    """The port's socket.sendto: Port.write checks every address again, and
    ours are the broker's, checked once."""
    socket = getattr(port, "socket", None)
    return socket.sendto if socket is not None else port.write


class _NodeSocket(DatagramProtocol):
    """One UDP socket of a NodeEndpoint; hands every datagram to it."""

    def __init__(self, owner: "NodeEndpoint") -> None:
        self.owner = owner

    def datagramReceived(self, data: bytes, addr) -> None:
        self.owner.datagram_received(data, addr)


class NodeEndpoint:
    """Node sessions on ``sockets`` UDP sockets, talking to one broker address.

    ``now`` is the monotonic clock the sessions run on; ``reactor`` gives
    the sockets and the one timer.  ``drops`` counts the datagrams dropped,
    by the broker's reason names (``short``, ``unknown_framing``,
    ``unknown_device``, ``auth_failed``, ...): a bad datagram is dropped,
    counted, and never answered.
    """

    log = Logger()

    def __init__(self, broker_address, *, reactor=None, now=None, sockets: int = 1,
                 interface: str | None = None, cipher_cache_size: int = 1024) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.broker_address = _numeric(broker_address)
        self.reactor = reactor
        self._now = now or time.monotonic
        self._interface = interface or _bind_address(self.broker_address[0])
        self._socket_count = max(1, sockets)
        self._ports: list = []
        self._senders: list = []  # each port's sendto (the socket's own, as the broker)
        self._nodes: dict[int, NodeSession] = {}
        self._slot: dict[int, int] = {}
        self.ciphers = CipherCache(cipher_cache_size)
        #: the sessions' chaff, for hosted sessions to share: one system call
        #: per block, not per datagram.
        self.random_bytes = BufferedRandom(os.urandom)
        self.scheduler = WakeupScheduler(reactor, self._wakeup, self._now)
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.send_errors = 0
        self.drops: collections.Counter = collections.Counter()
        self._stopped = False

    # -- sockets -----------------------------------------------------------------

    def listen(self) -> None:
        """Open the sockets (ephemeral ports); after stop(), the endpoint works again."""
        if self._stopped:
            # stop() ended the scheduler for good: a new one, for every hosted node.
            self._stopped = False
            self.scheduler = WakeupScheduler(self.reactor, self._wakeup, self._now)
            for number, node in self._nodes.items():
                self.scheduler.schedule(number, node.next_wakeup())
        while len(self._ports) < self._socket_count:
            self._ports.append(self.reactor.listenUDP(0, _NodeSocket(self),
                                                      interface=self._interface))
        self._senders = [_sender_of(port) for port in self._ports]

    def local_ports(self) -> list[int]:
        """The source ports in use."""
        return [port.getHost().port for port in self._ports]

    def move(self):
        """Change every source port (a NAT rebinding or a new network): sessions stay.

        Returns a Deferred that fires when the old sockets are closed.
        """
        from twisted.internet import defer
        old, self._ports, self._senders = self._ports, [], []
        self.listen()
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in old])

    def stop(self):
        """Close the sockets and the timer; returns a Deferred."""
        from twisted.internet import defer
        self._stopped = True
        self.scheduler.stop()
        ports, self._ports, self._senders = self._ports, [], []
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])

    # -- sessions ------------------------------------------------------------------

    def add(self, node: NodeSession) -> NodeSession:
        """Host node and start its first session now (unless it has one)."""
        number = node.device_number
        self._nodes[number] = node
        self._slot[number] = len(self._nodes) % self._socket_count
        if node.session is None:
            node.start(self._now())
        self.kick(node)
        return node

    def remove(self, node: NodeSession) -> None:
        self._nodes.pop(node.device_number, None)
        self._slot.pop(node.device_number, None)
        self.scheduler.cancel(node.device_number)

    def now(self) -> float:
        """The monotonic time the sessions run on."""
        return self._now()

    def node(self, device_number: int) -> NodeSession | None:
        return self._nodes.get(device_number)

    def __len__(self) -> int:
        return len(self._nodes)

    def kick(self, node: NodeSession) -> None:
        """Node has something new (a report): wake it when its sender wants to send.

        mosh's sender waits SEND_MINDELAY after a change before it sends, so
        reports in quick succession leave in one state.
        """
        wakeup = node.next_wakeup()
        if wakeup is None or wakeup <= self._now():
            self._flush(node, self._now())
        else:
            self.scheduler.schedule(node.device_number, wakeup)

    # -- I/O -------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr) -> None:
        if self._stopped:
            return
        self.datagrams_in += 1
        if len(data) < HEADER_SIZE or data[0] != FRAMING_VERSION:
            self.drops["unknown_framing" if data and data[0] != FRAMING_VERSION
                       else "short"] += 1
            return
        _, number, _ = _HEADER.unpack_from(data)
        node = self._nodes.get(number)
        if node is None:
            self.drops["unknown_device"] += 1
            return
        now = self._now()
        dropped = node.receive(data, addr, now)
        if dropped is not None:
            self.drops[str(dropped)] += 1
        wakeup = node.next_wakeup()
        if node.session is not None and (wakeup is None or wakeup > now):
            # The receive just computed the timers at this very now: nothing
            # is due, so asking the session (a tick) would send nothing.
            self.scheduler.schedule(number, wakeup)
            return
        self._flush(node, now)

    def _flush(self, node: NodeSession, now: float) -> None:
        out = node.datagrams(now)
        senders = self._senders
        if out and senders:
            sendto = senders[self._slot.get(node.device_number, 0) % len(senders)]
            for data, address in out:
                try:
                    sendto(data, address)
                    self.datagrams_out += 1
                except OSError:
                    self.send_errors += 1  # loss: SSP resends
        self.scheduler.schedule(node.device_number, node.next_wakeup())

    def _wakeup(self, number: int, now: float) -> None:
        node = self._nodes.get(number)
        if node is not None:
            self._flush(node, now)


class SSPNode:
    """One sensor node: report values and events, get desired values and commands.

    ``state_path``: a file that keeps the last session id, so a reboot
    starts a strictly newer session (required for a real device).
    ``heartbeat`` and ``rekey_after`` (default three heartbeats, more than
    one) are seconds; ValueError for others.  ``max_backlog``: events held
    while the broker has not acknowledged the earlier ones (backlog.py).
    """

    def __init__(self, device_number: int, secret: bytes, broker_address, *,
                 state_path=None, heartbeat: float = FLEET.ack_interval,
                 rekey_after: float | None = None, on_desired=None, on_command=None,
                 reactor=None, now=None, interface=None, random_bytes=os.urandom,
                 session_ids: SessionIds | None = None,
                 max_backlog: int = MAX_BACKLOG) -> None:
        if not 0 < heartbeat < math.inf:
            raise ValueError(f"heartbeat {heartbeat!r}: seconds, finite and above 0")
        if rekey_after is None:
            rekey_after = 3 * heartbeat
        elif not heartbeat < rekey_after < math.inf:
            # An idle node is acknowledged once a heartbeat: a shorter wait
            # starts a new session (and writes state_path) every rekey_after.
            raise ValueError(f"rekey_after {rekey_after!r}: seconds, finite and more than "
                             f"the heartbeat ({heartbeat:g})")
        self.endpoint = NodeEndpoint(broker_address, reactor=reactor, now=now,
                                     interface=interface)
        if session_ids is None:
            session_ids = SessionIds(state_path, random_bytes=random_bytes)
        self.session = NodeSession(
            device_number, secret, self.endpoint.broker_address, session_ids=session_ids,
            profile=node_profile(heartbeat, rekey_after), ciphers=self.endpoint.ciphers,
            rekey_after=rekey_after,
            random_bytes=random_bytes, on_desired=on_desired, on_command=on_command,
            max_backlog=max_backlog)

    def start(self) -> None:
        """Start a new session and open the socket (again after stop()).

        The session id is stored first: a state file that cannot be
        written fails here (OSError), before any socket is open.
        """
        self.session.start(self.endpoint.now())
        self.endpoint.listen()
        self.endpoint.add(self.session)

    def stop(self):
        """Close the socket and the timer (a Deferred); start() may follow."""
        return self.endpoint.stop()

    def report(self, values) -> None:
        self.session.report(values, self.endpoint.now())
        self.endpoint.kick(self.session)

    def emit(self, *events) -> None:
        self.session.emit(*events, now=self.endpoint.now())
        self.endpoint.kick(self.session)

    def update(self, values, events) -> None:
        """report(values) and emit(*events) at once: both, or neither with the error."""
        self.session.update(values, events, self.endpoint.now())
        self.endpoint.kick(self.session)

    def move(self):
        """Change the source port mid-session (the session stays)."""
        return self.endpoint.move()

    @property
    def desired(self) -> dict:
        return self.session.desired

    @property
    def session_id(self) -> int | None:
        return self.session.session_id

    @property
    def acknowledged(self) -> int:
        return self.session.acknowledged

    @property
    def backlog(self) -> int:
        """Events emitted and waiting for the broker to acknowledge earlier ones."""
        return self.session.backlog
