"""The UDP endpoint's side of the device registry.

Everything the endpoint asks of the registry goes through here: secrets and
session records to authenticate and resume, the reported state and events
of a device (acknowledged only once durable), the session record (session
id, last durable device state, sequence reservation), connection facts,
and the two notifications the endpoint acts on: a changed ``desired`` and a
removed device or rotated key.
"""

from __future__ import annotations


from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from broker.registry import SessionRecord, errors
from broker.udp.convert import (ContinuedStart, SessionStart, desired_state, encode_commands, encode_state,
                                first_report_base, new_events, reported_patch)
from broker.udp.store_outage_log import StoreOutageLog

#: Registry refusals of a device's (authentic) report: counted, logged and
#: acknowledged anyway, or the device would resend the refused state forever.
REFUSALS = (errors.InvalidKey, errors.InvalidValue, errors.StateTooLarge)


#: ``SessionRecord.local_num`` of a record whose receive mark was written as its
#: session left memory (evicted, or a clean stop): every datagram above the
#: mark was sent after it.  0 (every other record, written while the session
#: lives) says the mark may lag (a crash), and a session resumed from it
#: starts on probation (probation.py).  The endpoint used no other value.
MARK_FINAL = 1

#: ``_current_record``: the device's record belongs to another session.
_OTHER_SESSION = object()
#: what a new session's reported state is before its first report.
_STARTS = (SessionStart, ContinuedStart)

#: Commands one device may have waiting on its session (queued, not yet
#: acknowledged); more are refused with TooManyCommands. Every command held
#: is copied into each new outgoing state and written with each session
#: record, so a device that does not acknowledge must not grow them without
#: bound. (A setting for the lead to wire: [ssp] max_pending_commands.)
MAX_PENDING_COMMANDS = 256


class TooManyCommands(ValueError):
    """Commands refused because the device already has ``waiting`` of at most ``limit``.

    A ValueError, so that the endpoint's send_command lets the session
    park again as for any other command it cannot queue.
    """

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} commands are waiting for the device (at most {limit})")
        self.waiting = waiting
        self.limit = limit


_new = tuple.__new__


def _unless_failed(result, failed):
    """The records' Deferred: fails if the reports committed before them did not store."""
    if failed:
        return failed[0]
    return result


class RegistryBridge:
    """Reads and writes of the UDP endpoint against one DeviceRegistry."""

    log = Logger()

    def __init__(self, registry, max_pending_commands: int = MAX_PENDING_COMMANDS) -> None:
        self.registry = registry
        #: commands a session may hold unacknowledged (see MAX_PENDING_COMMANDS).
        self.max_pending_commands = max_pending_commands
        self._watches = []
        #: refused reports by error code (exported as broker_ssp_reports_refused_total).
        self.refused: dict[str, int] = {}
        #: device number -> outgoing state with commands whose record write
        #: is on its way (not on the session yet); empty when none are.
        self._unsent: dict = {}
        #: where store write failures are logged, once per outage (the
        #: endpoint's SessionWrites gives it one on the endpoint's time source).
        self.outage_log = StoreOutageLog()

    # -- reads -----------------------------------------------------------------

    def secret(self, device_number: int) -> bytes | None:
        """The device's secret, None for a device the registry does not know."""
        return self.registry.secret_for(device_number)

    def record(self, device_number: int) -> SessionRecord | None:
        """The device's persisted session record (latest written), or None.

        StoreError for a record that cannot be read: never start a session
        over it (a new one with its id would use its sequence numbers again).
        """
        return self.registry.session_record(device_number)

    def name(self, device_number: int) -> str | None:
        """The device's name (once per session start)."""
        view = self.registry.device_by_number(device_number)
        return None if view is None else view.name

    def outgoing(self, device_number: int, base=None):
        """The device's desired map as its outgoing state, built on base."""
        desired = self.registry.desired_of(device_number)
        if desired is None:
            return base
        return desired_state(desired, base)

    # -- writes ----------------------------------------------------------------

    def _outgoing(self, live):
        """The broker's outgoing state as records must keep it: with the
        commands whose own record write is still on its way (this session's
        only: a device's next session starts without them)."""
        unsent = self._unsent.get(live.number)
        if unsent is None or unsent[0] is not live:
            return live.session.local_state
        return unsent[1]

    def _record(self, live, num: int, state: bytes) -> SessionRecord:
        """The session record: id, the device's newest durable state, the
        commands not yet acknowledged, reservation, and the device's sequence
        mark (replays stay out)."""
        reserved, requested = live.reserved, live.requested
        # (tuple.__new__: a record per report, without the named tuple's
        # __new__ frame; max inline)
        return _new(SessionRecord, (live.session_id, num, state, 0,
                                    encode_commands(self._outgoing(live)),
                                    requested if requested > reserved else reserved,
                                    live.session.expected_seq))

    def _save(self, live, num: int, state: bytes) -> defer.Deferred:
        """Write the session record (see _record)."""
        return self.registry.save_session(live.number, self._record(live, num, state))

    def queue_commands(self, live, commands) -> defer.Deferred:
        """Make ``commands`` durable in the session record, appended to the
        outgoing state (raises TypeError/ValueError for one an SSP state cannot
        carry).  The Deferred fires with the outgoing state the record now
        holds: its events past the session's are the ones to put on it.  Only
        then may they travel: a command the device saw must survive a crash,
        or the restarted broker would give its index to another command.
        TooManyCommands (nothing queued) when the session would then hold
        more than ``max_pending_commands`` unacknowledged commands.
        """
        number = live.number
        if self._current_record(live) is _OTHER_SESSION:
            # The record is another session's (the device moved on, maybe to
            # another process): writing ours would overwrite it.
            return defer.succeed(None)
        unsent = self._unsent.get(number)
        base = live.session.local_state if unsent is None or unsent[0] is not live else unsent[1]
        waiting = len(base.events)     # acknowledged ones are no longer held
        if waiting + len(commands) > self.max_pending_commands:
            raise TooManyCommands(waiting, self.max_pending_commands)
        state = base.with_events(*commands)
        self._unsent[number] = (live, state)
        try:
            written = self._save_current(live)
        except (TypeError, ValueError):
            # Not encodable (text that is not Unicode): forgotten, or every
            # later record of the session would fail on it.
            if unsent is None:
                del self._unsent[number]
            else:
                self._unsent[number] = unsent
            raise
        return written.addBoth(self._commands_written, number, state)

    def _commands_written(self, result, number: int, state):
        unsent = self._unsent.get(number)
        if unsent is not None and unsent[1] is state:
            del self._unsent[number]   # later writes take the session's state again
        return state if not isinstance(result, Failure) else result


    def mark(self, device_number: int, session_id: int, expected_seq: int,
             outgoing=None, final: bool = False) -> bool:
        """Persist a session's device sequence mark: a datagram captured before
        cannot resume it later.  ``final``: the session leaves memory (evicted,
        or the endpoint stops) and its mark covers every datagram it took, so
        one above it is the device's, sent since (MARK_FINAL); a mark written
        while it stays (a park: table.py) is not.  ``outgoing`` is the
        session's own outgoing state (not the record's, which may hold
        commands whose write failed); None keeps the record's commands (a
        live session's may be on their way to it).  Batched with the store's
        next commit; best effort: the older mark holds if this fails.
        Whether a write was queued."""
        try:
            current = self.registry.session_record(device_number)
        except errors.StoreError:
            return False
        if current is None or current.session_id != session_id or not current.resumable:
            return False
        commands = current.local_state if outgoing is None else encode_commands(outgoing)
        flag = MARK_FINAL if final else 0
        if (current.remote_seq >= expected_seq and current.local_state == commands
                and current.local_num == flag):
            return False
        record = current._replace(remote_seq=max(expected_seq, current.remote_seq),
                                  local_state=commands, local_num=flag)
        self.registry.save_session(device_number, record).addCallbacks(
            self._mark_written, self._mark_failed, errbackArgs=(device_number,))
        return True

    @staticmethod
    def mark_is_final(record) -> bool:
        """Whether ``record``'s mark was written as its session left memory (mark)."""
        return record.local_num == MARK_FINAL

    def address(self, device_number: int):
        """The device's last known address (the registry's connection facts), or None."""
        view = self.registry.device_by_number(device_number)
        return None if view is None else view.address

    def _mark_written(self, _) -> None:
        self.outage_log.succeeded()

    def _mark_failed(self, failure, device_number: int) -> None:
        self.outage_log.failed(failure, "sequence mark", f"device {device_number}")

    def reserve(self, live, limit: int, expected) -> defer.Deferred:
        """Persist a higher sequence reservation ``limit`` of the live session as a
        compare-and-set (``reserve_session``): only over the stored record of
        this session with reservation ``expected``, the one this process
        confirmed or resumed from; ``expected`` None is a new session's start,
        whose record starts from nothing (the device's last state of an older
        session is not the reference of any diff in this one), but for where
        the device's stored events end while the session has no durable
        report: a session rebuilt from the record before its first one (woken
        from parking, resumed after a restart) then still stores none of its
        carried events a second time (sessions.record_states). Fails with
        SessionConflict when another process moved the record on."""
        if expected is None:
            start = live.reported
            mark = encode_state(start) if (type(start) in _STARTS
                                           and start.event_base) else b""
            record = SessionRecord(session_id=live.session_id, acked_remote_state=mark,
                                   seq_reservation=limit,
                                   remote_seq=live.session.expected_seq)
        else:
            current = self._current_record(live)
            if current is None or current is _OTHER_SESSION:
                num, state = 0, b""
            else:
                num, state = current.acked_remote_num, current.acked_remote_state
            record = self._record(live, num, state)._replace(seq_reservation=limit)
        return self.registry.reserve_session(live.number, record, expected)

    def _current_record(self, live):
        """The device's record if it is this session's; None if there is none
        (or it cannot be read); _OTHER_SESSION if it is another session's."""
        try:
            current = self.registry.session_record(live.number)
        except errors.StoreError:
            return None
        if current is None:
            return None
        return current if current.session_id == live.session_id else _OTHER_SESSION

    def _save_current(self, live) -> defer.Deferred:
        """Write the record again, with the device state it holds (or none,
        if it is another session's)."""
        current = self._current_record(live)
        if current is None or current is _OTHER_SESSION:
            return self._save(live, 0, b"")
        return self._save(live, current.acked_remote_num, current.acked_remote_state)

    def _reported_now(self, device_number: int):
        """The device's reported values in the registry now (empty if removed)."""
        view = self.registry.device_by_number(device_number)
        return {} if view is None else view.reported

    def report_many(self, reports) -> defer.Deferred:
        """Hand several devices' new states to the registry, each with its session record.

        ``reports``: ``(live, state, num)`` of distinct sessions.  Every
        patch and event goes to the registry as ONE ``update_reported_many``
        (one transaction), followed by the session records as ONE
        ``save_sessions``: they are queued back to back in one reactor
        turn, so the store commits them together (a crash between a report
        and its record would double its events after a restart, or lose
        it).  Returns one Deferred firing once the records are durable,
        with a list in the order of ``reports``: each report's record, or
        the error that kept it from being durable (UnknownDevice for a
        device removed meanwhile; see ``save_sessions``).  A registry
        refusal (invalid key or value, too large) is counted and does not
        hold a report up; a store failure of the reports or of the one
        write of the records fails the Deferred (the states then stay
        unacknowledged).
        """
        registry = self.registry
        limit = max(1, registry.settings.max_events)
        updates = []
        lives = []
        for live, state, _ in reports:
            previous = live.reported
            if type(previous) in _STARTS:
                previous = first_report_base(previous, state, self._reported_now(live.number))
            live.reported = state
            patch = reported_patch(previous, state)
            if state.event_end == previous.event_end:
                if patch:                       # the usual report: values only
                    updates.append((live.number, patch, ()))
                    lives.append(live)
                continue
            events = new_events(previous, state)
            if patch or events:
                number = live.number
                if patch and events:
                    # Apart: values the registry refuses (acknowledged all
                    # the same) must not take the device's events with them.
                    updates.append((number, patch, ()))
                    lives.append(live)
                    patch = {}
                updates.append((number, patch, events[:limit]))
                lives.append(live)
                rest = events[limit:]
                while rest:
                    updates.append((number, {}, rest[:limit]))
                    lives.append(live)
                    rest = rest[limit:]
        failed = []
        if updates:
            registry.update_reported_many(updates).addCallbacks(
                self._answered, self._not_stored, callbackArgs=(lives,),
                errbackArgs=(failed,))
        record = self._record
        d = registry.save_sessions([(live.number, record(live, num, encode_state(state)))
                                    for live, state, num in reports])
        if updates:
            d.addCallback(_unless_failed, failed)
        return d

    def _answered(self, results, lives) -> None:
        for live, result in zip(lives, results):
            if isinstance(result, errors.RegistryError):
                if isinstance(result, REFUSALS + (errors.UnknownDevice,)):
                    self.refused[result.code] = self.refused.get(result.code, 0) + 1
                    self.log.warn("registry refused a report of {name}: {message}",
                                  name=live.name, message=result.message)
                else:
                    self.log.error("registry refused a report of {name}: {error!r}",
                                   name=live.name, error=result)

    def _not_stored(self, failure, failed) -> None:
        # A store failure: the records queued after the reports are not
        # confirmed either, so nothing of them is acknowledged (their records
        # fail with it: SessionWrites counts them, and logs each device's).
        failed.append(failure)

    def connection(self, live, *, online: bool, address=None, rtt=None) -> None:
        """Refresh the registry's connection facts (only a flip of online is a write)."""
        self.connection_of(live.number, live.session_id, online=online, address=address,
                           rtt=rtt)

    def connection_of(self, number: int, session_id: int, *, online: bool, address=None,
                      rtt=None) -> None:
        """connection() by device number and session id."""
        d = self.registry.set_connection(number, online=online, address=address, rtt=rtt,
                                         session_id=session_id)
        # Its success ends no outage: most are not store writes (only a flip is).
        d.addErrback(self._connection_failed, number)

    def _connection_failed(self, failure, number) -> None:
        # A store failure is not retried here (no timer per device): the
        # registry keeps the write and sends it again until it lands or a
        # newer one supersedes it (shared_retry.py; one process's registry
        # shows the device as written at once, and reloads it offline).
        if failure.check(errors.UnknownDevice):
            return None
        self.outage_log.failed(failure, "connection facts", f"device {number}")
        return None

    # -- notifications ---------------------------------------------------------

    def watch(self, on_desired, on_key_change) -> None:
        """Call ``on_desired(device_number, desired)`` and ``on_key_change(device_number)``."""
        registry = self.registry
        self._watches.append(registry.watch_desired(on_desired))
        self._watches.append(registry.watch_keys(on_key_change))

    def stop(self) -> None:
        """Stop every notification."""
        watches, self._watches = self._watches, []
        for watch in watches:
            watch.cancel()
