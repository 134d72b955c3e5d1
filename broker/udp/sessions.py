"""The endpoint's record of one device's live session, and how one is built.

A ``LiveSession`` is what the broker keeps per connected device beside the
sans-IO ``SSPSession``: the device's name (shared with the registry), the
state last forwarded to the registry, and a few facts for the bridge.  It
has slots only; the session keeps just its key, and its cipher object comes
from the shared, bounded ``CipherCache`` while the device is active.
"""

from __future__ import annotations

from broker.ssp.device_state import DeviceState
from broker.ssp.framing import BrokerFraming, continues_boot, same_boot
from broker.ssp.session import SEQ_RESERVATION_BLOCK, Resumption, SSPSession
from broker.ssp.errors import DatagramDropped
from broker.udp.convert import decode_state, session_start

__all__ = ["LiveSession", "new_session", "resumed_session", "first_session",
           "record_states", "clock_floor", "SEQ_RESERVATION_BLOCK", "SEQ_PER_SECOND"]

EMPTY = DeviceState.empty()
#: ``LiveSession.marked_at`` of a session whose record this process has not written.
NEVER_MARKED = float("-inf")

#: Sequence numbers per wall-clock second below a session's first one
#: (clock_floor): far more than any session sends in a second (it would
#: need a million datagrams a second), and 2^20 per second keeps every
#: number below 2^53 until the year 2242.
SEQ_PER_SECOND = 1 << 20


def clock_floor(wall: float) -> int:
    """The lowest sequence number a session started or resumed at wall-clock
    time ``wall`` (seconds since the epoch) may use.

    A persisted reservation makes restarts safe (wire.md 7), but not a
    restore: a backup (an SQLite copy, a Redis snapshot, an older replica)
    holds reservations below numbers already sent, and sessions started
    after it are not in it at all, so a replayed first datagram would start
    one again from 0 under the same key.  Numbering from the clock instead
    puts every (re)started session above everything sent earlier, as long
    as no session averaged ``SEQ_PER_SECOND`` datagrams a second and the
    clock did not go back; the durable reservation still rules whenever it
    is higher.
    """
    return max(0, int(wall)) * SEQ_PER_SECOND


class LiveSession:
    """One device's live session as the endpoint holds it.

    ``reported``: the device state last handed to the registry (the patch
    of the next one is computed from it).  ``reserved``: the highest
    sequence reservation confirmed durable for this process (numbers below
    it are its own; for a resumed session, the record's).  ``requested``:
    the higher one whose compare-and-set write is on its way (0: none);
    ``unreserved``: one whose write failed, written again with the
    device's next authentic datagram (0: none).  ``started``: the
    session's id is durable (a new session's first reservation is a start:
    reports.py).  ``pending_state`` /
    ``pending_num``: the newest report, not yet handed to the registry
    (written at the end of the reactor turn).  ``facts_at``: when the
    registry's connection facts were last refreshed (monotonic seconds).
    ``wheel_slot``: the presence bucket holding it, -1 if none.
    ``unsaved_num``: the number of a report whose write failed and that no
    durable write has covered since (0: none); written again with the
    session's next datagram (reports.py).  ``marked_at``: when a record
    holding the device's receive mark was last written (monotonic seconds;
    -inf: not by this process), see table.py.  ``probation``: None, or the
    ``Probation`` of a session resumed from a record whose mark may lag
    (probation.py): it answers no address but the device's known one with
    more than it got, and moves no registry facts.
    """

    __slots__ = ("number", "name", "session_id", "session", "reported",
                 "reserved", "online", "facts_at", "wheel_slot", "writes",
                 "pending_state", "pending_num", "pending_count", "unsaved_num",
                 "requested", "unreserved", "started", "marked_at", "probation")

    def __init__(self, number: int, name: str, session_id: int, session: SSPSession,
                 reported: DeviceState, reserved: int, started: bool = True) -> None:
        self.number = number
        self.name = name
        self.session_id = session_id
        self.session = session
        self.reported = reported
        self.reserved = reserved
        self.online = False
        self.facts_at = float("-inf")
        self.wheel_slot = -1
        self.writes = 0  # registry writes not yet durable
        self.pending_state = None  # newest state received, written at the end of the turn
        self.pending_num = 0
        self.pending_count = 0  # reports it covers (the newer ones include the older ones)
        self.unsaved_num = 0
        self.requested = 0
        self.unreserved = 0
        self.started = started
        self.marked_at = NEVER_MARKED
        self.probation = None

    def __repr__(self) -> str:
        return (f"<LiveSession device={self.number} name={self.name!r} "
                f"session={self.session_id}>")


def new_session(*, secret: bytes, device_number: int, session_id: int, ciphers,
                profile, random_bytes, now: float, first_seq: int = 0,
                max_assembly_bytes: int | None = None) -> SSPSession:
    """A brand-new broker session numbering from ``first_seq``: no sequence
    number may be used until the owner confirms a durable reservation (so
    a crash before the record is durable can never reuse a nonce under
    this key)."""
    return SSPSession(key=secret, cipher_provider=ciphers, is_server=True,
                      local_state=EMPTY, remote_state=EMPTY,
                      random_bytes=random_bytes, now=now, profile=profile,
                      framing=BrokerFraming(device_number, session_id),
                      ack_requires_confirm=True, seq_reserved=first_seq,
                      first_seq=first_seq, max_assembly_bytes=max_assembly_bytes)


def resumed_session(*, secret: bytes, device_number: int, session_id: int, ciphers,
                    profile, random_bytes, now: float, remote_num: int,
                    remote_state: DeviceState, seq_floor: int, expected_seq: int = 0,
                    max_assembly_bytes: int | None = None) -> SSPSession:
    """A session resumed from its persisted record after a restart (wire.md 7):
    it knows the device's last durable state and numbers above the old
    reservation, asks for a new reservation before sending, and takes no
    datagram older than the device's persisted sequence mark as in order."""
    return SSPSession(key=secret, cipher_provider=ciphers, is_server=True,
                      local_state=EMPTY, remote_state=EMPTY,
                      random_bytes=random_bytes, now=now, profile=profile,
                      framing=BrokerFraming(device_number, session_id),
                      ack_requires_confirm=True,
                      resume=Resumption(remote_num, remote_state, seq_floor, expected_seq),
                      seq_reserved=seq_floor, max_assembly_bytes=max_assembly_bytes)


def durable_event_end(old, record, session_id: int) -> int:
    """Where the events the device's earlier sessions handed to the registry end,
    as new session ``session_id`` takes over: the live session's report (its
    writes, if not yet durable, are kept and written again until they are),
    else the session record's durable state (or, before the session's first
    durable report, where its start found them ending: bridge.reserve).  0
    when unknown (a carried event may then be stored twice, never lost), for
    a boot's first session (its events are numbered from 0 again: all new),
    and for a session that says it continues a boot other than that earlier
    session's (framing.same_boot): the broker never heard its boot's first
    session, so its events are all new too."""
    if not continues_boot(session_id):
        # A boot's first session numbers its events from 0: all of them new.
        # (Handing it the previous boot's end would let a later session of
        # this boot take that end for its own, were this one never to report.)
        return 0
    earlier = old.session_id if type(old) is LiveSession else getattr(record, "session_id", None)
    if not same_boot(earlier, session_id):
        return 0
    if type(old) is LiveSession:
        return old.reported.event_end
    if record is None or not record.acked_remote_state:
        return 0
    if not record.acked_remote_num and not continues_boot(record.session_id):
        # A boot's first session that never reported: its start record holds
        # no end of this boot's (one an older broker wrote holds the previous
        # boot's, which must not be taken for this boot's).
        return 0
    try:
        return decode_state(record.acked_remote_state).event_end
    except DatagramDropped:
        return 0


def record_states(record) -> tuple[DeviceState, DeviceState]:
    """The device states a session rebuilt from its record (resumed, or woken
    from parking) starts from: the SSP session's reference, state number
    ``record.acked_remote_num``, and the bridge's ``reported`` (what the next
    report is compared with).  They differ for a session with no durable
    report yet (number 0): its state 0 is the empty one, and its start record
    holds where the device's earlier sessions' events end (bridge.reserve),
    so its first report is still a session start's (convert.SessionStart),
    whose carried events below that end are not stored again.  Raises
    DatagramDropped if the record's state does not decode."""
    remote = decode_state(record.acked_remote_state)
    if record.acked_remote_num:
        return remote, remote
    return EMPTY, session_start(remote.event_end, continues_boot(record.session_id))


def first_session(record, *, seq_floor: int = 0, **common):
    """The session an authentic first datagram starts: resumed from ``record``
    when the record is of its session id (after a restart or an eviction),
    else new; either numbers from ``seq_floor`` (clock_floor) or above.
    Returns (session, the device state its reports are compared with: see
    record_states, resumed); raises
    DatagramDropped if the record's state does not decode.
    """
    if record is not None and common["session_id"] == record.session_id:
        remote, reported = record_states(record)
        session = resumed_session(remote_num=record.acked_remote_num, remote_state=remote,
                                  seq_floor=max(record.seq_reservation, seq_floor),
                                  expected_seq=record.remote_seq, **common)
        if record.local_state:
            # The commands not yet acknowledged, with their indices: the
            # device takes those it has not seen, once.
            session.set_local_state(decode_state(record.local_state))
        return session, reported, True
    return new_session(first_seq=seq_floor, **common), EMPTY, False
