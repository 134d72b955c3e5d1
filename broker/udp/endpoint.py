"""The DatagramProtocol bound to the SSP port: one port, every device.

Called from Twisted: ``datagramReceived`` for each datagram, the single
scheduler timer for sessions that want to send.  Calls into the sans-IO
core: ``SSPSession.receive_datagram`` / ``datagrams_to_send`` /
``next_wakeup`` / ``pop_events``.  Calls into the registry through the
``RegistryBridge``.

The cleartext 17-byte header (wire.md 1) says which device and session a
datagram claims to be.  Everything that did not authenticate is dropped
without a reply and counted by reason; cheap checks come first, and the
expensive ones (a decryption, a key derivation) are within the budgets of
``admission.py`` so a flood of garbage cannot crowd out authentic devices.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
from collections import Counter

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from broker.registry.errors import StoreError
from broker.ssp import events as ssp_events
from broker.ssp.bounds import BROKER_RECEIVED_STATES, MAX_VALUES, StateBounds
from broker.ssp.crypto import OVERHEAD
from broker.ssp.datagram import TIMESTAMP_SIZE
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.fragment import FRAGMENT_HEADER_SIZE
from broker.ssp.framing import FRAMING_VERSION, HEADER_SIZE, continues_boot
from broker.ssp.randomness import BufferedRandom
from broker.udp.admission import Admission, first_datagram_fails, parked_datagram_fails
from broker.udp.bridge import RegistryBridge
from broker.udp.downstream import Downstream
from broker.udp.drops import EndpointDrop, not_authentic
from broker.udp.limits import WindowCounter
from broker.udp.park import Parked
from broker.udp.probation import Probation, same_address
from broker.udp.profile import endpoint_profile
from broker.udp.reports import SessionWrites
from broker.udp.convert import session_start
from broker.udp.sessions import LiveSession, clock_floor, durable_event_end, first_session
from broker.udp.table import SessionTable

__all__ = ["SSPEndpoint", "EndpointDrop"]

#: The shortest datagram that can carry anything: header, nonce and tag,
#: timestamps and a fragment header (shorter ones are dropped unopened).
MIN_DATAGRAM = HEADER_SIZE + OVERHEAD + TIMESTAMP_SIZE + FRAGMENT_HEADER_SIZE
#: Compressed bytes of one half-assembled instruction a session may hold
#: (the sans-IO default is 1 MiB): a device's state is bounded by the
#: registry's max_state_bytes, so an authentic device needs far less.
MAX_ASSEMBLY_BYTES = 64 * 1024

_HEADER = struct.Struct(">BQQ")
_unpack_header = _HEADER.unpack_from

_SESSION_OVER = (ssp_events.ShutdownAcknowledged, ssp_events.PeerShutdownAcknowledged,
                 ssp_events.ShutdownTimedOut)
# (Module globals for _handle's tests, run for every event.)
_STATE_RECEIVED = ssp_events.StateReceived
_DATAGRAM_REJECTED = ssp_events.DatagramRejected
_RESERVATION_REQUESTED = ssp_events.SequenceReservationRequested
_PEER_ROAMED = ssp_events.PeerRoamed
_STATE_ACKNOWLEDGED = ssp_events.StateAcknowledged


def assembly_bytes(registry) -> int:
    """The fragment assembly cap of the broker's sessions: room for the largest
    state the registry takes (twice over, for CBOR and diff overhead)."""
    return max(MAX_ASSEMBLY_BYTES, 2 * registry.settings.max_state_bytes)


def session_profile(settings, registry):
    """The profile of the broker's sessions: the ``[ssp]`` timings, and what a
    device's received states may hold (broker.ssp.bounds: a diff inflates to
    at most the assembly cap, a state holds at most the registry's key count
    twice over, and 16 states are kept above the throwaway one, not mosh's
    1,024)."""
    limits = registry.settings
    bounds = StateBounds(max_diff_bytes=assembly_bytes(registry),
                         max_values=max(MAX_VALUES, 2 * limits.max_keys))
    return dataclasses.replace(endpoint_profile(settings), state_bounds=bounds,
                               received_states_cap=BROKER_RECEIVED_STATES)


def own_address(entry, addr, parked: bool) -> bool:
    """Whether ``addr`` is the address of the device's current session (admission:
    its datagrams from there are not a stranger's).  On probation that is the
    device's last known address, not the session's (a replayer's) one, if the
    registry knows one (probation.py)."""
    if parked:
        return addr == entry.remote_address()
    probation = entry.probation
    if probation is not None and probation.known is not None:
        return probation.is_known(addr)
    return addr == entry.session.remote_address


class SSPEndpoint(Downstream, DatagramProtocol):
    """Every device's sessions on one UDP port, bridged into the registry.

    ``clock`` is the reactor (IReactorTime) for the one timer; ``now`` the
    monotonic time source sessions run on (``clock.seconds`` by default,
    ``time.monotonic`` in production); ``wall_clock`` the seconds since the
    epoch sessions number their datagrams from (``clock.seconds``, the
    reactor's wall clock: sessions.clock_floor).  ``settings`` is the config's
    ``[ssp]`` section: limits, timings, ``park_after`` (idle seconds before
    a session is packed), ``auth_failure_budget`` (failed authentications
    per device or source host and second before datagrams from strangers
    are dropped unopened, see admission.py) and ``facts_interval``.
    """

    log = Logger()

    def __init__(self, registry, settings, *, clock=None, now=None, ciphers=None,
                 random_bytes=None, wall_clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        from broker.ssp.crypto import CipherCache

        self.settings = settings
        self._now = now or clock.seconds
        self._clock = clock
        # Seconds since the epoch: where new and resumed sessions number from.
        self._wall_clock = wall_clock or clock.seconds
        self._bridge = RegistryBridge(registry,
                                      max_pending_commands=settings.max_pending_commands)
        self._profile = session_profile(settings, registry)
        self._ciphers = ciphers if ciphers is not None else CipherCache(settings.cipher_cache_size)
        if random_bytes is None:
            # The sessions' chaff: one system call per block, not per datagram.
            random_bytes = BufferedRandom(os.urandom)
        self._random_bytes = random_bytes
        #: datagrams in and out, sessions started, resumed, parked, roams ...
        self.counters: Counter = Counter()
        #: dropped datagrams by reason (DropReason or EndpointDrop value).
        self.drops: Counter = Counter()
        self._table = SessionTable(bridge=self._bridge, ciphers=self._ciphers,
                                   profile=self._profile, random_bytes=random_bytes,
                                   clock=clock, now=self._now,
                                   offline_after=settings.offline_after,
                                   park_after=settings.park_after,
                                   facts_interval=settings.facts_interval,
                                   max_assembly_bytes=assembly_bytes(registry),
                                   mark_interval=settings.mark_interval,
                                   flush=self._flush, counters=self.counters)
        self._writes = SessionWrites(table=self._table, bridge=self._bridge, clock=clock,
                                     now=self._now, flush=self._flush,
                                     counters=self.counters)
        self._limits(settings)
        #: devices whose unusable session record was logged this second.
        self._record_errors = WindowCounter(1)
        self._sendto = None

    def _limits(self, settings) -> None:
        #: the budgets a datagram may use before it authenticated (admission.py).
        self.admission = admission = Admission(settings, self._now())
        self._admit = admission.datagrams.allow

    def reconfigure(self, settings) -> None:
        """New [ssp] limits and timings (SIGHUP): limits at once, timings for new sessions.

        The bind address, port and receive buffer need a restart.
        """
        self.settings = settings
        self._limits(settings)
        self._profile = session_profile(settings, self._bridge.registry)
        self._table.profile = self._profile
        table = self._table
        table.presence.offline_after = settings.offline_after
        table.park_after = settings.park_after
        table.facts_interval = settings.facts_interval
        table.mark_interval = settings.mark_interval

    # -- the table --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._table)

    def session_of(self, device_number: int) -> LiveSession | None:
        """The device's session, unparked if it was parked (None if it has none)."""
        return self._table.live(device_number, self._now())

    def entry_of(self, device_number: int):
        """The device's table entry as it is (LiveSession, Parked or None)."""
        return self._table.get(device_number)

    @property
    def table(self) -> SessionTable:
        return self._table

    @property
    def scheduler(self):
        return self._table.scheduler

    @property
    def bridge(self) -> RegistryBridge:
        return self._bridge

    # -- called by Twisted ------------------------------------------------------

    def startProtocol(self) -> None:
        socket = getattr(self.transport, "socket", None)
        self._sendto = socket.sendto if socket is not None else self.transport.write
        self._bridge.watch(self.desired_changed, self.key_changed)

    def stopProtocol(self) -> None:
        self.write_reports(flush=False)   # what this turn received still goes to the store
        self._table.mark_all()
        self._table.stop()
        self._bridge.stop()

    def datagramReceived(self, data: bytes, addr) -> None:
        """Demultiplex one datagram by its header; never raises, never answers garbage."""
        now = self._now()
        self.counters["datagrams_in"] += 1
        if len(data) < MIN_DATAGRAM or data[0] != FRAMING_VERSION:
            if data and data[0] != FRAMING_VERSION:
                self._drop(DropReason.UNKNOWN_FRAMING)
            else:
                self._drop(DropReason.SHORT)
            return
        _, number, session_id = _unpack_header(data)
        if not number or not session_id:
            self._drop(DropReason.BAD_HEADER)
            return
        try:
            entry = self._table.get(number)
            if entry is not None and session_id == entry.session_id:
                self._receive_current(entry, number, data, addr, now)
            elif entry is not None and session_id < entry.session_id:
                # A replay of a retired session: it can neither revive nor displace.
                self._drop(EndpointDrop.OLD_SESSION)
            else:
                self._receive_other(entry, number, session_id, data, addr, now)
        except Exception:
            self._drop(EndpointDrop.INTERNAL_ERROR)
            self.log.failure("datagram of device {number} failed", number=number)

    # -- receiving --------------------------------------------------------------

    def _drop(self, reason) -> None:
        self.drops[reason.value if isinstance(reason, enum.Enum) else reason] += 1

    def _record_error(self, number: int, now: float, message: str, **fields) -> None:
        """Log a device's unusable session record: an error once a second, then debug."""
        if self._record_errors.allow(number, now):
            self.log.error(message, number=number, **fields)
        else:
            self.log.debug(message, number=number, **fields)

    def _receive_current(self, entry, number: int, data: bytes, addr, now: float) -> None:
        """A datagram of the device's current session, live or parked."""
        parked = type(entry) is Parked
        admission = self.admission
        if parked or entry.probation is not None:
            stranger = None if own_address(entry, addr, parked) else addr[0]
            before = None
        else:
            # (own_address of a live session not on probation, inline: every datagram.)
            before = entry.session.remote_address
            stranger = None if addr == before else addr[0]
        refused = admission.current(number, stranger, now)
        if refused is not None:
            self._drop(refused)
            return
        if parked:
            failure = parked_datagram_fails(entry, data)
            if failure is not None:
                # Forged or replayed: refused before the session is rebuilt.
                self._drop(failure)
                admission.failed_current(number, stranger, now)
                return
            live = self._table.wake(entry, number, now)
            if live is None:
                self._table.drop(number)
                self._drop(EndpointDrop.BAD_RECORD)
                return
        else:
            live = entry
        session = live.session
        if before is None:
            before = session.remote_address
        session.receive_datagram(data, addr, now)
        found = session.pop_events()
        # (Nothing below receives a datagram: the session's last_heard stays.)
        authentic = session.last_heard is now
        if authentic:
            # Authentic and in order: it counts against the device's rate.
            if live.probation is not None:
                found = self._on_probation(live, found, addr, len(data), now)
            elif addr != before and self._roams_unproven(live, before, addr):
                # A roam (or a detached session attached again elsewhere), as mosh's
                # rule has it; but the datagram may be one the device lost on a
                # failing link, replayed: the new address is unproven until the
                # device answers there (QUIC's path validation).
                self._start_probation(live, session.newest_sent_num + 1, addr, len(data),
                                      known=before or self._bridge.address(number))
            if parked:
                self._table.install(live)
                self.counters["sessions_unparked"] += 1
            admission.device_rate.allow(number, now)
            if not live.online or now - live.facts_at >= self._table.facts_interval:
                # (Else heard has nothing to do: the facts are fresh.)
                self._table.heard(live, addr, now)
        elif parked:
            # Not authentic, or an old datagram: the parked form stays as it was.
            if stranger is not None or not_authentic(found):
                admission.failed_current(number, stranger, now)
            for event in found:
                if type(event) is ssp_events.DatagramRejected:
                    self._drop(event.reason)
            return
        elif stranger is not None or not_authentic(found):
            # A stranger's replay costs a failure as a forgery does: one host
            # replaying a captured datagram must not spend every attempt.
            admission.failed_current(number, stranger, now)
        if found:
            self._handle(live, found, now)
        if authentic:
            # Authentic: a forgery never causes a write.
            if live.unsaved_num:
                self._writes.retry(live)
            if live.unreserved:
                self._writes.reserve_again(live)
        if live.pending_num:
            return  # flushed once at the end of the turn, after its report is queued
        self._flush(live, now)

    def _receive_other(self, entry, number: int, session_id: int, data: bytes, addr,
                       now: float) -> None:
        """A datagram of a session not in the table: new, or to resume after a restart."""
        bridge = self._bridge
        secret = bridge.secret(number)
        if secret is None:
            self._drop(EndpointDrop.UNKNOWN_DEVICE)
            return
        record = unreadable = None
        if entry is None:
            try:
                record = bridge.record(number)
            except StoreError as error:
                unreadable = error
            if record is not None and (session_id < record.session_id or (
                    session_id == record.session_id and not record.resumable)):
                self._drop(EndpointDrop.OLD_SESSION)    # (retired: a restored backup's)
                return
            if len(self._table) >= self.settings.max_sessions:
                self._drop(EndpointDrop.SESSION_CAP)
                return
            stranger = addr[0]
        else:
            stranger = None if own_address(entry, addr, type(entry) is Parked) else addr[0]
        admission = self.admission
        if admission.device_sessions.exhausted(number, now):
            # A device in a boot loop gets no more of the fleet's budget.
            self._drop(EndpointDrop.NEW_SESSION_RATE_LIMITED)
            return
        if stranger is None:
            # A new session from the live one's own address: no failure budget
            # stops it, but its key derivation is an attempt all the same.
            if not admission.attempts.allow(now):
                self._drop(EndpointDrop.RATE_LIMITED)
                return
        elif not admission.stranger(number, stranger, now, entry is not None):
            self._drop(EndpointDrop.RATE_LIMITED)
            return
        if not self._admit(now):
            self._drop(EndpointDrop.GLOBAL_RATE_LIMITED)
            return
        # Authenticated on a throwaway cipher first: a forgery builds no session
        # and uses up no new-session budget (only authentic starts do).
        mark = record.remote_seq if record is not None and record.session_id == session_id else 0
        failure = first_datagram_fails(secret, number, session_id, data, mark)
        if failure is not None:
            self._drop(failure)
            admission.failed(number, stranger, now, entry is not None)
            return
        if unreadable is not None:
            # Never a session over it (its sequence numbers); logged only for
            # an authentic datagram, once a second a device (not floodable).
            self._drop(EndpointDrop.BAD_RECORD)
            self._record_error(number, now, "session record of device {number} cannot be "
                               "read: {error}", error=unreadable)
            return
        if not admission.new_sessions.allow(now):
            self._drop(EndpointDrop.NEW_SESSION_RATE_LIMITED)
            return
        admission.device_sessions.allow(number, now)
        floor = clock_floor(self._wall_clock())
        try:
            session, remote, resume = first_session(
                record, seq_floor=floor, secret=secret, device_number=number, session_id=session_id,
                ciphers=self._ciphers, profile=self._profile, random_bytes=self._random_bytes,
                now=now, max_assembly_bytes=self._table.max_assembly_bytes)
        except DatagramDropped:
            self._drop(EndpointDrop.BAD_RECORD)
            self._record_error(number, now, "session record of device {number} holds a bad state")
            return
        session.receive_datagram(data, addr, now)
        found = session.pop_events()
        if session.last_heard is not now:
            # Authentic yet unusable: forget its key schedule, answer nothing.
            self._ciphers.discard(session.key)
            for event in found:
                if type(event) is ssp_events.DatagramRejected:
                    self._drop(event.reason)
            return
        live = self._install(entry, number, session_id, session, remote, resume, record, now)
        if self._table.get(number) is not live:
            return   # its start was refused at once (another process started it)
        if self._unproven(number, addr, resume, record):
            first = max(record.seq_reservation, floor) if resume else floor
            self._start_probation(live, first + 1, addr, len(data))
        admission.device_rate.allow(number, now)
        self._table.heard(live, addr, now)
        if found:
            self._handle(live, found, now)
        self._flush(live, now)

    # -- probation (probation.py) -------------------------------------------------

    def _unproven(self, number: int, addr, resume: bool, record) -> bool:
        """Whether a session's first datagram here may be a replay: a resumed session
        whose record's mark may lag (a crash), whatever address it comes from (a
        source can be spoofed); or any session, new or resumed, heard first from
        elsewhere than the device's known address, since a datagram lost on the
        way (a failing link, a session no broker heard) is above every mark."""
        if resume and not self._bridge.mark_is_final(record):
            return True
        known = self._bridge.address(number)
        return known is not None and not same_address(addr, known)

    def _roams_unproven(self, live: LiveSession, before, addr) -> bool:
        """Whether a session in memory heard from ``addr``, not its address
        ``before`` (None: detached), moves to an address not yet proven: not the
        same host and port, nor (detached) the device's known address."""
        if before is None:
            known = self._bridge.address(live.number)
            return known is not None and not same_address(addr, known)
        return not same_address(addr, before)

    def _start_probation(self, live: LiveSession, fresh_from: int, addr, size: int,
                         known=None) -> None:
        """The session is on probation until the device proves itself by acknowledging
        a state numbered from ``fresh_from``: above every number sent in the session
        before (probation.py).  ``known``: the session's address before it roamed
        (else the registry's address of the device)."""
        roamed = known is not None
        if not roamed:
            known = self._bridge.address(live.number)
        probation = live.probation = Probation(known, fresh_from, roamed)
        probation.earned(addr, size)
        live.session.ask_acks(True)   # the device's proof comes within ACK_DELAY
        self.counters["sessions_on_probation"] += 1

    def _on_probation(self, live: LiveSession, found, addr, size: int, now: float):
        """An in-order datagram of a session on probation: it verifies the session
        (which then follows it as a roam would, facts included), or earns its
        address one datagram back.  Returns the events left to handle."""
        probation = live.probation
        if not probation.verified_by(live.session):
            probation.earned(addr, size)
            return found
        live.probation = None
        live.session.ask_acks(False)
        self.counters["sessions_verified"] += 1
        if probation.roamed and not probation.is_known(addr):
            self.counters["roams"] += 1
        self._table.moved(live, addr, now)
        return [event for event in found if type(event) is not ssp_events.PeerRoamed]

    def _durable_event_end(self, old, record, number, session_id) -> int:
        """Where the device's stored events end, before its new session.

        0 (skip nothing: at least once) with a shared registry: a device's
        newer session may live in another process, unseen here yet, after
        a reboot there; an end read from an older one would skip events
        numbered afresh since.
        """
        if self._bridge.registry.shared:
            return 0
        if type(old) is Parked:
            # Parked: everything durable, and the record is the whole story.
            try:
                record = self._bridge.record(number)
            except StoreError:
                return 0
        return durable_event_end(old, record, session_id)

    def _install(self, old, number, session_id, session, remote, resume, record, now):
        """Make an authenticated session the device's live one (wire.md 3 and 7)."""
        bridge = self._bridge
        table = self._table
        if not resume:
            remote = session_start(self._durable_event_end(old, record, number, session_id),
                                   continues_boot(session_id))
        if old is not None:
            table.retire(number, old, "replaced")
        name = bridge.name(number) if old is None else old.name
        # A resumed session's first reservation is a compare-and-set from the
        # record's; a new one's is a start (reports.py).
        reserved = record.seq_reservation if resume else 0
        live = LiveSession(number, name, session_id, session, remote, reserved, resume)
        if old is not None and old.online:
            # Still online: the presence wheel keeps following the device.
            live.online, live.wheel_slot, old.wheel_slot = True, old.wheel_slot, -1
        table.install(live)
        if resume:
            self.counters["sessions_resumed"] += 1
            self.log.info("resumed session {session_id} of {name}", session_id=session_id,
                          name=name)
        else:
            self.counters["sessions_started"] += 1
            # The new id is durable before anything is sent or acknowledged.
            self._writes.start(live)
        # Desired values on the commands a resumed session kept (or nothing).
        base = session.local_state
        outgoing = bridge.outgoing(number, base)
        if outgoing is not None and outgoing is not base:
            session.set_local_state(outgoing, now)
        return live

    # -- events of a session ----------------------------------------------------

    def _handle(self, live: LiveSession, found, now: float) -> None:
        for event in found:
            kind = type(event)
            if kind is _STATE_RECEIVED:
                self._writes.report(live, event.state, event.num)
            elif kind is _STATE_ACKNOWLEDGED:    # (the two events of nearly every datagram)
                self.counters["states_acknowledged"] += 1
            elif kind is _DATAGRAM_REJECTED:
                self._drop(event.reason)
            elif kind is _RESERVATION_REQUESTED:
                self._writes.reserve(live, event.limit)
            elif kind is _PEER_ROAMED:
                if live.probation is None:   # (else the move may be a replay's)
                    self.counters["roams"] += 1
                    self._table.moved(live, event.address, now)
            elif kind in _SESSION_OVER:
                self.counters["sessions_shut_down"] += 1

    def write_reports(self, flush: bool = True) -> None:
        """Hand the reports gathered this turn to the registry (called at its end),
        then send what those sessions have due (once per session, not per datagram)."""
        self._writes.write_reports(flush)

    # -- sending ------------------------------------------------------------------

    def _flush(self, live: LiveSession, now: float) -> None:
        """Send what the session has due, act on its events, and set its wake-up."""
        session = live.session
        sent_num = session.newest_sent_num
        out = session.datagrams_to_send(now)
        if out:
            if session.newest_sent_num == sent_num:
                # The same state number again: a retransmission for want of an ack.
                self.counters["retransmissions"] += 1
            probation = live.probation
            if probation is not None:
                # Unverified: what does not fit its allowance is lost (SSP resends)
                # and a probe goes instead, small enough to fit (probation.py).
                out, withheld = probation.allowed(out, session.newest_sent_num)
                self.counters["datagrams_withheld"] += withheld
                if withheld and probation.owed():
                    probe = session.probe(now, probation.went_out)
                    probe, _ = probation.allowed(probe, session.newest_sent_num)
                    out += probe
                    self.counters["probes_sent"] += len(probe)
            self._send(out)
        found = session.pop_events()
        if found:
            self._handle(live, found, now)
        if session.closed:
            self._table.retire(live.number, live, "shut down")
            return
        self._table.settle(live, now)

    def _send(self, out) -> None:
        sendto = self._sendto
        if sendto is None:
            return
        for data, address in out:
            try:
                sendto(data, address)
            except OSError as error:
                # A full socket buffer or an unreachable peer is loss: SSP resends.
                self.counters["send_errors"] += 1
                self.log.debug("sendto {address} failed: {error}", address=address,
                               error=error)
        self.counters["datagrams_out"] += len(out)
