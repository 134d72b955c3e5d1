"""The endpoint's writes to the store: reports, session starts, sequence reservations.

Reports are gathered for the end of the reactor turn so the registry sees
one write for every report of the turn, and one per device however many
states it sent meanwhile (the newest one covers the others' acks).  A
write's answer is what lets a session acknowledge (``confirm_durable``)
or use its reserved sequence numbers (``confirm_seq_reservation``):
nothing is acknowledged before it is durable.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from broker.registry.provisioning import SessionConflict
from broker.udp.sessions import SEQ_RESERVATION_BLOCK, LiveSession
from broker.udp.store_outage_log import StoreOutageLog

__all__ = ["SessionWrites"]


class SessionWrites:
    """The durable writes of every live session on one endpoint.

    ``table`` is the endpoint's SessionTable (a session retired meanwhile
    is never written nor confirmed), ``bridge`` its RegistryBridge,
    ``clock`` the reactor for the end-of-turn call, ``now`` the session
    time source, ``flush`` the endpoint's send-what-is-due callable and
    ``counters`` the endpoint's Counter (registry_writes,
    updates_durable, store_failures).

    A report whose write failed stays unacknowledged and is written again
    (``retry``): the registry keeps its changes, and a device that gave up
    on the session would send its events again in a new one.  Failures are
    counted one by one, but logged once per outage (store_outage_log.py).
    """

    log = Logger()

    __slots__ = ("_table", "_bridge", "_clock", "_now", "_flush", "_counters", "_pending",
                 "_outage")

    def __init__(self, *, table, bridge, clock, now, flush, counters) -> None:
        self._table = table
        self._bridge = bridge
        self._clock = clock
        self._now = now
        self._flush = flush
        self._counters = counters
        self._pending: list[LiveSession] = []   # sessions with a report to write this turn
        # One outage log for the endpoint's writes, the bridge's too, on the
        # endpoint's time source.
        self._outage = bridge.outage_log = StoreOutageLog(now)

    def __len__(self) -> int:
        return len(self._pending)

    def _current(self, live: LiveSession) -> bool:
        return self._table.get(live.number) is live

    # -- reports ------------------------------------------------------------------

    def report(self, live: LiveSession, state, num: int) -> None:
        """Queue the session's newest received state for the end of the turn."""
        if live.pending_num:
            live.pending_state, live.pending_num = state, num
            live.pending_count += 1
            return
        live.writes += 1
        live.pending_state, live.pending_num, live.pending_count = state, num, 1
        pending = self._pending
        pending.append(live)
        if len(pending) == 1:
            self._clock.callLater(0, self.write_reports)

    def write_reports(self, flush: bool = True) -> None:
        """Hand the reports gathered this turn to the registry (called at its end),
        then send what those sessions have due (once per session, not per datagram)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        reports = []
        counts = []
        handed = []
        current = self._table.get
        now = self._now()
        for live in pending:
            state, num, count = live.pending_state, live.pending_num, live.pending_count
            live.pending_state, live.pending_num, live.pending_count = None, 0, 0
            if current(live.number) is not live:
                # Retired meanwhile (replaced, key changed): its record must
                # not overwrite the new session's, and it is never acknowledged.
                live.writes -= 1
                continue
            reports.append((live, state, num))
            counts.append(count)
            handed.append(live.reported)
            live.marked_at = now    # each record carries the device's receive mark
        if not reports:
            return
        self._counters["registry_writes"] += len(reports)
        try:
            answer = self._bridge.report_many(reports)
        except Exception:
            # Never leave a session waiting for a write that was not queued,
            # nor taking its states as handed over: unacknowledged, they come
            # again, and their events then still count as new.
            self._counters["store_failures"] += 1
            self._outage.failed(Failure(), "the reports of a turn")
            for (live, _, _), reported in zip(reports, handed):
                live.writes -= 1
                live.reported = reported
            return
        # One callback for the turn's reports, not a Deferred chain per report.
        answer.addCallbacks(self._reported, self._not_durable,
                            callbackArgs=(reports, counts), errbackArgs=(reports,))
        if flush:
            table = self._table
            for live, _, _ in reports:
                if current(live.number) is not live:
                    continue
                wakeup = live.session.next_wakeup()
                if wakeup is None or wakeup > now:
                    # Its timers were computed when its datagram came, this
                    # turn; computed again now they come no earlier before
                    # that wake-up has passed, so a tick would send nothing.
                    # Only its wake-up is set (the ack waits for durability).
                    table.settle(live, now, wakeup)
                else:
                    self._flush(live, now)

    def _reported(self, results, reports, counts) -> None:
        """The records of a turn's reports are durable (each result a record,
        or the error that kept that one from being durable): acknowledge them."""
        table = self._table
        now = self._now()
        durable = 0
        for (live, _, num), count, result in zip(reports, counts, results):
            if isinstance(result, Exception):    # (a record, nearly always)
                if isinstance(result, SessionConflict):
                    # The record is another process's now (or a newer session's).
                    live.writes -= 1
                    self.conflict(live, result)
                else:
                    self._report_failed(Failure(result), live, num)
                continue
            live.writes -= 1
            if num >= live.unsaved_num:
                live.unsaved_num = 0
            # Every report the write covered is durable (and acknowledged with num).
            durable += count
            if table.get(live.number) is live:
                try:
                    live.session.confirm_durable(num)
                    table.settle(live, now)
                except Exception:
                    # One broken session must not keep the others unacknowledged.
                    self.log.failure("acknowledging a report of {name} failed", name=live.name)
        self._counters["updates_durable"] += durable
        if durable:
            self._outage.succeeded()

    def _not_durable(self, failure, reports) -> None:
        for live, _, num in reports:
            self._report_failed(failure, live, num)

    def _report_failed(self, failure, live: LiveSession, num: int) -> None:
        """Nothing is acknowledged; but the registry keeps the report's changes
        (it writes them again), so the device must not have to send them in
        a new session: the report is written again (``retry``)."""
        if num > live.unsaved_num:
            live.unsaved_num = num
        self._failed(failure, live, "report")

    def retry(self, live: LiveSession) -> None:
        """Write the failed report again (its state is the last handed to the
        registry) when the session has no write on its way: called for each
        authentic datagram of the device, so the device's own retransmissions
        pace it, and it costs no timer."""
        if not live.writes and not live.pending_num:
            self.report(live, live.reported, live.unsaved_num)

    # -- session ids and sequence reservations --------------------------------------

    def start(self, live: LiveSession) -> None:
        """Make a new session's id durable, with the first reservation block
        (from its first number: sessions.clock_floor)."""
        self._reserve(live, live.session.next_seq + SEQ_RESERVATION_BLOCK)

    def reserve(self, live: LiveSession, limit: int) -> None:
        """Reserve sequence numbers up to ``limit`` (once per limit)."""
        if limit <= live.reserved or limit <= live.requested:
            return  # confirmed, or a write covering it is on its way
        self._reserve(live, limit)

    def reserve_again(self, live: LiveSession) -> None:
        """Write a reservation whose write failed again (called for each authentic
        datagram of the device, so the device paces it; no timer). The session
        still waits for it: it asked once and keeps waiting for the answer."""
        if live.unreserved and not live.requested:
            self._reserve(live, live.unreserved)

    def _reserve(self, live: LiveSession, limit: int) -> None:
        """A compare-and-set of the session's reservation (wire.md 7): from the
        one this process confirmed (or resumed from), or a start. Until it is
        confirmed the session uses none of the block, and ``live.reserved``
        stays the confirmed one (report records carry ``requested`` too, see
        bridge._record: they are written after it, in order)."""
        live.requested, live.unreserved = limit, 0
        live.writes += 1
        live.marked_at = self._now()   # the record carries the receive mark too
        expected = live.reserved if live.started else None
        self._bridge.reserve(live, limit, expected).addCallbacks(
            self._reserved, self._not_reserved,
            callbackArgs=(live, limit), errbackArgs=(live, limit))

    def _reserved(self, _, live: LiveSession, limit: int) -> None:
        live.writes -= 1
        if live.requested == limit:
            live.requested = 0
        if limit > live.reserved:
            live.reserved = limit
        live.started = True
        self._outage.succeeded()
        if self._current(live):
            live.session.confirm_seq_reservation(limit)
            self._table.settle(live, self._now())

    def _not_reserved(self, failure, live: LiveSession, limit: int) -> None:
        """Not durable: roll back to the confirmed reservation. A conflict retires
        the session; a store failure keeps the limit to write again."""
        if live.requested == limit:
            live.requested = 0
        if failure.check(SessionConflict):
            live.writes -= 1
            self.conflict(live, failure.value)
            return
        live.unreserved = limit
        self._failed(failure, live, "reservation" if live.started else "session start")

    def conflict(self, live: LiveSession, error) -> None:
        """Another process moved the session's record on (it resumed the session
        there, or started it): this one must use no number it did not confirm,
        so it ends here; the device's next datagram resumes from the stored
        record (possibly on the other process). Counted and logged once."""
        if not self._current(live):
            return
        self._counters["reservation_conflicts"] += 1
        self._table.retire(live.number, live, "reservation conflict")
        self.log.warn("session {session_id} of {name} retired: {error}",
                      session_id=live.session_id, name=live.name, error=error.message)

    def _failed(self, failure, live: LiveSession, what: str) -> None:
        live.writes -= 1
        self._counters["store_failures"] += 1
        self._outage.failed(failure, what, live.name)
