"""Every device's session, live or parked, and the one timer that drives them.

The table maps a device number to its ``LiveSession`` (recently active) or
``Parked`` form (idle: a few packed bytes).  It owns the wake-up scheduler
(one reactor timer for all sessions), the presence wheel (online/offline
without a timer per device), and the lifecycle: install, park after
``park_after`` idle seconds, unpark on demand, retire, evict offline
sessions whose record says everything.

The record's receive mark (the device's next expected sequence number:
a datagram below it cannot resume the session) is written with every
report, and besides by a session that parks when its device sent
datagrams since the stored mark (heartbeats, acks) and the stored one is
``mark_interval`` seconds old or more: after a crash a captured datagram
can then resume the session only if the device sent it within about
``mark_interval`` and a heartbeat of the crash (and probation.py keeps such
a resume from answering the replayer).  No timer: a park is the moment a
session's writes are all durable anyway.
"""

from __future__ import annotations

from collections import Counter

from twisted.logger import Logger

from broker.registry.errors import StoreError
from broker.ssp.errors import DatagramDropped
from broker.udp.park import Parked, park, unpark
from broker.udp.presence import PresenceWheel
from broker.scheduler import WakeupScheduler
from broker.udp.sessions import LiveSession, record_states

#: The scheduler key of the presence wheel (sessions use device numbers).
PRESENCE = "presence"
#: Longest wait between two checks whether a session can be parked (s).
MAX_RECHECK = 60.0
#: Smoothed RTTs kept between two metric updates (the rest of a burst is not sampled).
MAX_RTT_SAMPLES = 4096
#: ``settle``'s default: read the session's wake-up (None is a wake-up: none).
_ASK = object()


class SessionTable:
    """Live and parked sessions by device number (see the module docstring).

    ``flush(live, now)`` is the owner's "send what is due" callback, run
    when a live session's wake-up time comes.  ``facts_interval``: the
    registry's connection facts (last heard, RTT) of a device are refreshed
    at most this often (seconds).  ``rtt_samples`` holds the smoothed RTTs
    measured at those refreshes until the metrics take them.
    """

    log = Logger()

    def __init__(self, *, bridge, ciphers, profile, random_bytes, clock, now,
                 offline_after: float, park_after: float | None, flush, counters: Counter,
                 facts_interval: float = 1.0, max_assembly_bytes: int | None = None,
                 mark_interval: float = 60.0) -> None:
        self.bridge = bridge
        self.ciphers = ciphers
        self.profile = profile
        self.random_bytes = random_bytes
        self.park_after = park_after
        self.facts_interval = facts_interval
        self.mark_interval = mark_interval
        self.max_assembly_bytes = max_assembly_bytes
        self.rtt_samples: list[float] = []
        self.counters = counters
        self._now = now
        self._flush = flush
        self._sessions: dict[int, LiveSession | Parked] = {}
        #: ``get(number)``: the device's LiveSession or Parked entry, or None
        #: (the dict's own method: a lookup for every datagram, no Python frame).
        self.get = self._sessions.get
        self.scheduler = WakeupScheduler(clock, self._wakeup, now)
        self.presence = PresenceWheel(offline_after)

    def __len__(self) -> int:
        return len(self._sessions)

    def parked_count(self) -> int:
        return sum(1 for entry in self._sessions.values() if type(entry) is Parked)

    # -- live and parked --------------------------------------------------------

    def wake(self, parked: Parked, number: int, now: float) -> LiveSession | None:
        """A live copy of a parked session (not installed: see install), or None
        if its record is gone or damaged."""
        bridge = self.bridge
        try:
            record = bridge.record(number)
        except StoreError:
            return None  # the endpoint logs it once a datagram authenticates
        if (bridge.secret(number) is None or record is None
                or record.session_id != parked.session_id or not record.resumable):
            return None
        try:
            remote, reported = record_states(record)
        except DatagramDropped:
            self.log.error("session record of {name} holds a bad state", name=parked.name)
            return None
        live = unpark(parked, number, remote_state=remote, reported=reported,
                      ciphers=self.ciphers, profile=self.profile,
                      random_bytes=self.random_bytes, now=now,
                      max_assembly_bytes=self.max_assembly_bytes)
        # A desired change made while the session was parked (and not yet
        # seen by it) goes out now.
        session = live.session
        outgoing = bridge.outgoing(number, session.local_state)
        if outgoing is not None and outgoing is not session.local_state:
            session.set_local_state(outgoing, now)
        return live

    def live(self, number: int, now: float) -> LiveSession | None:
        """The device's session as a live one (unparking it), or None."""
        entry = self._sessions.get(number)
        if type(entry) is Parked:
            live = self.wake(entry, number, now)
            if live is None:
                self.drop(number)
                return None
            self.counters["sessions_unparked"] += 1
            self._sessions[number] = live
            return live
        return entry

    def install(self, live: LiveSession) -> None:
        """Make live the device's session (replacing any other entry)."""
        self._sessions[live.number] = live

    def settle(self, live: LiveSession, now: float, wakeup=_ASK) -> None:
        """Set the live session's next wake-up: its own timer, or a park check.
        ``wakeup``: the session's ``next_wakeup()`` if the caller just read it
        (nothing ran on the session since), to save reading it again."""
        if wakeup is _ASK:
            wakeup = live.session.next_wakeup()
        if wakeup is None and self.park_after is not None:
            wakeup = now + self.park_after
        self.scheduler.schedule(live.number, wakeup)

    def _wakeup(self, key, now: float) -> None:
        """The scheduler's callback: a session's timer, a park check, or the presence wheel."""
        if type(key) is str and key == PRESENCE:
            self._expire(now)
            return
        live = self._sessions.get(key)
        if type(live) is not LiveSession:
            return
        session = live.session
        if session.next_wakeup() is None:
            if self.park_after is None:
                return
            heard = session.last_heard
            parked = None
            marking = now - live.marked_at >= self.mark_interval
            if heard is not None and now - heard >= self.park_after - 0.001:
                parked = park(live, now if marking else None)
            if parked is not None:
                self._sessions[live.number] = parked
                self.ciphers.discard(session.key)
                self.counters["sessions_parked"] += 1
                if marking and self.bridge.mark(live.number, live.session_id,
                                                session.expected_seq):
                    self.counters["marks_at_park"] += 1
            else:
                # Not idle yet (a write or a command on its way): look again
                # later, less often the longer the device has been silent.
                silent = 0.0 if heard is None else now - heard
                self.scheduler.schedule(live.number,
                                        now + min(MAX_RECHECK, max(self.park_after, silent / 2)))
            return
        self._flush(live, now)

    # -- presence -----------------------------------------------------------------

    def heard(self, live: LiveSession, address, now: float) -> None:
        """An authentic datagram: the device is online; facts refreshed at most once a
        second (none while on probation: the datagram may be a replay)."""
        if not live.online:
            live.online = True
            live.facts_at = now
            heard = live.session.last_heard
            live.wheel_slot = self.presence.add(live.number, now if heard is None else heard)
            self._arm_presence()
            if live.probation is None:
                self._facts(live, address)
        elif now - live.facts_at >= self.facts_interval and live.probation is None:
            live.facts_at = now
            self._facts(live, address)

    def moved(self, live: LiveSession, address, now: float) -> None:
        """The session roamed: the registry hears of the new address at once."""
        live.facts_at = now
        self._facts(live, address)

    def _facts(self, live: LiveSession, address) -> None:
        """Refresh the registry's connection facts; a measured RTT is also a metric sample."""
        rtt = live.session.rtt
        srtt = rtt.srtt if rtt.hit else None
        if srtt is not None and len(self.rtt_samples) < MAX_RTT_SAMPLES:
            self.rtt_samples.append(srtt)
        self.bridge.connection(live, online=True, address=address, rtt=srtt)

    def _arm_presence(self) -> None:
        due = self.presence.next_due()
        current = self.scheduler.when(PRESENCE)
        if due is not None and (current is None or due < current):
            self.scheduler.schedule(PRESENCE, due)

    def _expire(self, now: float) -> None:
        sessions = self._sessions
        offline_after = self.presence.offline_after
        for slot, number in self.presence.due(now):
            entry = sessions.get(number)
            if entry is None or entry.wheel_slot != slot or not entry.online:
                continue  # stale: replaced or retired since
            if type(entry) is Parked:
                heard = entry.last_heard()
            else:
                heard = entry.session.last_heard
            if heard is not None and heard + offline_after > now:
                entry.wheel_slot = self.presence.add(number, heard)
                continue
            entry.wheel_slot = -1
            entry.online = False
            self.counters["went_offline"] += 1
            self.bridge.connection_of(number, entry.session_id, online=False)
            if type(entry) is Parked or self.evictable(entry):
                # Its record is durable and complete: a returning device
                # resumes from it, and the memory goes back to the pool.
                # The record keeps where the device's numbering stood.
                if type(entry) is Parked:
                    self.bridge.mark(number, entry.session_id, entry.expected_seq(), entry.local,
                                     final=True)
                else:
                    # (Final unless on probation: its mark covers only the
                    # replays it took, not every captured datagram.)
                    session = entry.session
                    self.bridge.mark(number, entry.session_id, session.expected_seq,
                                     session.local_state, final=entry.probation is None)
                self.drop(number)
                self.counters["sessions_evicted"] += 1
        due = self.presence.next_due()
        if due is not None:
            self.scheduler.schedule(PRESENCE, due)

    @staticmethod
    def evictable(live: LiveSession) -> bool:
        """Its record and the registry say it all: nothing unwritten.  Commands not
        yet acknowledged are in the record (written before they went out, and by
        the mark): the device gets them when it resumes, as after a restart,
        and one gone for good holds no memory."""
        return live.writes == 0 and live.session.ack_num == live.session.latest_remote_num

    # -- retiring -------------------------------------------------------------------

    def drop(self, number: int) -> None:
        """Forget the device's entry from memory (its durable record stays)."""
        entry = self._sessions.pop(number, None)
        self.scheduler.cancel(number)
        if type(entry) is LiveSession:
            self.ciphers.discard(entry.session.key)

    def retire(self, number: int, entry, why: str) -> None:
        """End a session for good (replaced, shut down, key changed)."""
        if self._sessions.get(number) is entry:
            self.drop(number)
        self.counters["sessions_retired"] += 1
        if entry.online and why != "replaced":
            entry.online = False
            self.bridge.connection_of(number, entry.session_id, online=False)
        self.log.debug("session {session_id} of {name} retired: {why}",
                       session_id=entry.session_id, name=entry.name, why=why)

    def mark_all(self) -> None:
        """Persist every session's device sequence mark (a clean stop): a datagram
        taken before, a heartbeat since the last report too, cannot resume its
        session after the restart (only a kill -9 leaves that window)."""
        mark = self.bridge.mark
        for number, entry in self._sessions.items():
            if type(entry) is Parked:
                mark(number, entry.session_id, entry.expected_seq(), final=True)
            else:
                mark(number, entry.session_id, entry.session.expected_seq,
                     final=entry.probation is None)

    def stop(self) -> None:
        self.scheduler.stop()
