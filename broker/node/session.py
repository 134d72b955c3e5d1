"""A sensor node's side of SSP with the broker, without I/O.

``NodeSession`` wraps the core's ``SSPSession`` (as the mosh "client") with
what a device application needs: report values and events, hear about
desired values and commands, start a strictly newer session after a reboot
(``SessionIds``) or when the broker acknowledged nothing for ``rekey_after``
seconds (wire.md 3: silent, or answering without making our states
durable), and carry unacknowledged values and events into the new session.
Events wait in a ``Backlog`` (backlog.py) and join the SSP state only as far
as a diff the broker takes allows.  Roaming needs nothing here: the broker
follows the newest authentic datagram's source address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

import cbor2
from twisted.logger import Logger

from broker.node.backlog import MAX_BACKLOG, MAX_EVENT_BYTES, MAX_VALUES_BYTES, Backlog
from broker.registry.errors import InvalidKey, InvalidValue
from broker.registry.settings import RegistrySettings
from broker.registry.values import (NUMBER_SIZE, Validator, map_size, thaw as registry_thaw,
                                    value_size)
from broker.ssp import events as ssp_events
from broker.ssp.device_state import DeviceState, encode, freeze, same
from broker.ssp.framing import BrokerFraming
from broker.ssp.session import SSPSession

EMPTY = DeviceState.empty()
#: The registry's checks at its default limits (key names, kinds of value,
#: nesting, item counts).  It refuses a report whole, with every other value
#: and event the state carried, and the device never hears of it: so the
#: node refuses what the registry would, before it joins the state.  One
#: object for every session (its cache of key names is bounded).
REGISTRY_RULES = Validator(RegistrySettings())
#: The registry's default ``max_state_bytes``: its size estimate of the
#: reported map (and of one event), at most.
MAX_STATE_BYTES = RegistrySettings().max_state_bytes


def sendable(item) -> None:
    """ValueError if ``item`` (values or events, already checked by DeviceState)
    cannot be encoded: text with an unpaired surrogate would fail at every
    send, and the state holding it would never leave the node.  Text is the
    only frozen data that can fail to encode, so only text is tried (a walk
    costs a fraction of the CBOR encoding, at every report)."""
    kind = type(item)
    if kind is str:
        if not item.isascii():  # (a flag for most text: no scan, no copy)
            try:
                item.encode()
            except UnicodeEncodeError as problem:
                raise ValueError(f"text is not Unicode: {problem.reason}") from None
    elif kind is tuple or kind is list:
        for part in item:
            sendable(part)
    elif kind is MappingProxyType or kind is dict:  # frozen maps, or not yet
        for key, value in item.items():
            sendable(key)
            sendable(value)


#: Frozen values that are their own plain form and that ``sendable`` passes
#: (text is not: it may hold an unpaired surrogate).
_INERT = frozenset((int, float, bool, bytes, type(None)))
#: Values the registry counts at NUMBER_SIZE whatever they hold (entry_size).
_NUMBERS = frozenset((int, float))
#: Frozen values that are their own plain form.
_PLAIN_SCALARS = _INERT | {str}

#: The registry's size estimate of an empty map (``map_size``).
EMPTY_MAP_SIZE = map_size((), ())


def entry_size(key: str, value) -> int:
    """What one top-level entry adds to the registry's size estimate of the
    reported map (``map_size``), which it compares with ``max_state_bytes``."""
    kind = type(value)
    if kind is int or kind is float:   # (the usual reading: no registry form to make)
        return len(key) + 3 + NUMBER_SIZE
    return len(key) + 3 + value_size(_registry_form(value))


def _registry_form(value):
    """A frozen device-state value as the registry freezes it (its sizes count
    its own tuples and maps only)."""
    kind = type(value)
    if kind is tuple or kind is MappingProxyType or kind is dict:
        return registry_thaw(plain(value))
    return value


def registry_refusal(check, *args):
    """``check(*args)`` of the registry's rules; its refusal as a ValueError."""
    try:
        return check(*args)
    except (InvalidKey, InvalidValue) as problem:
        raise ValueError(f"{problem.message}: the registry refuses it, and the whole "
                         "report with it") from None


def plain(value):
    """A frozen device-state value as plain JSON-like data (maps -> dict, arrays -> list)."""
    if type(value) in _PLAIN_SCALARS:   # (no Mapping check, an ABC's, for a number)
        return value
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if type(value) is tuple:
        return [plain(item) for item in value]
    return value


class NodeSession:
    """One device's SSP state: its current session and what the app sees.

    ``on_desired(values: dict)`` is called when the desired values change
    (a change of type, 1 to true, is a change); ``on_command(command)`` once
    per command, in order (what they raise is logged).  ``max_backlog``:
    events held beyond the SSP state at most (backlog.py).
    ``max_state_bytes``: the broker's ``[registry] max_state_bytes``, the
    registry's estimate of all values together and of one event, at most.
    Times are monotonic seconds passed in by the owner.
    """

    log = Logger()

    __slots__ = ("device_number", "broker_address", "rekey_after", "on_desired",
                 "on_command", "session", "session_id", "sessions_started",
                 "_secret", "_ids", "_profile", "_ciphers", "_random_bytes", "_pending",
                 "_desired", "_events_end", "_acked", "_acked_at", "_rekey_not_before",
                 "_backlog", "max_state_bytes", "_values_size")

    def __init__(self, device_number: int, secret: bytes, broker_address, *, session_ids,
                 profile, ciphers, rekey_after: float, random_bytes=os.urandom,
                 on_desired=None, on_command=None, max_backlog: int = MAX_BACKLOG,
                 max_state_bytes: int = MAX_STATE_BYTES) -> None:
        if len(secret) != 16:
            raise ValueError("a device secret is 16 bytes")
        self.device_number = device_number
        self.broker_address = broker_address
        self.rekey_after = rekey_after
        self.on_desired = on_desired
        self.on_command = on_command
        self.session = None
        self.session_id = None
        self.sessions_started = 0
        self._secret = secret
        self._ids = session_ids
        self._profile = profile
        self._ciphers = ciphers
        self._random_bytes = random_bytes
        self._pending = EMPTY
        self._desired = None
        self._events_end = 0
        self._acked = 0  # reports the broker acknowledged (states, not datagrams)
        self._acked_at = 0.0  # when the session started or the broker last acknowledged
        self._rekey_not_before = 0.0  # after a new session id could not be stored
        self._backlog = Backlog(max_backlog)
        self.max_state_bytes = max_state_bytes
        self._values_size = EMPTY_MAP_SIZE  # the registry's estimate of our values

    # -- what the application does ----------------------------------------------

    @property
    def state(self) -> DeviceState:
        """The values and unacknowledged events the node is sending (not the backlog)."""
        return self.session.local_state if self.session is not None else self._pending

    @property
    def desired(self) -> dict:
        """The latest desired values received (empty before any)."""
        return plain(self._desired) if self._desired is not None else {}

    @property
    def backlog(self) -> int:
        """Events emitted but not yet in the state: they wait for acknowledgements."""
        return len(self._backlog)

    @property
    def acknowledged(self) -> int:
        """How many of our states the broker acknowledged (durable at the broker)."""
        return self._acked

    def report(self, values: Mapping, now: float) -> None:
        """Merge values into the reported state (None deletes a key); TypeError or
        ValueError (nothing changed) for values a device state cannot carry,
        a key or value the registry refuses (naming it), all values together
        over MAX_VALUES_BYTES encoded or over max_state_bytes as the registry
        counts them."""
        self.update(values, (), now)

    def emit(self, *events, now: float) -> None:
        """Append events (telemetry) to send, each delivered once, in order (TypeError
        or ValueError, nothing appended, for one a device state cannot carry or
        over MAX_EVENT_BYTES encoded; BacklogFull, a ValueError, past max_backlog)."""
        self.update(None, events, now)

    def update(self, values: Mapping | None, events, now: float) -> None:
        """report(values) and emit(*events) together: both or neither (the errors
        of each)."""
        state = before = self.state
        values_size = self._values_size   # the registry's count of the values
        if (values and not events and values_size <= MAX_VALUES_BYTES
                and values_size <= self.max_state_bytes):
            # The usual reading (numbers for keys that hold numbers): the keys,
            # the registry's count and so every check below stay as they were
            # when the state took them.
            quick = before.with_numbers(values)
            if quick is not None:
                self._set(quick, now)
                return
        if values:
            state = state.with_values(values)
            if state is not before:
                current = state.values
                patch = {}
                # The usual reading (a known key, a number) needs no patch
                # check of the registry's: passes() knows that it takes it.
                checked = len(values) <= REGISTRY_RULES.max_keys
                passes = REGISTRY_RULES.passes
                for key in values:   # each key, then its value, as frozen
                    value = current.get(key)
                    if not key.isascii():   # (keys are text: with_values checked)
                        sendable(key)
                    if type(value) not in _INERT:
                        sendable(value)
                        value = plain(value)
                    if checked and not passes(key, value):
                        checked = False
                    patch[key] = value
                if not checked:
                    registry_refusal(REGISTRY_RULES.patch, patch)
                old = before.values
                for key in values:   # (the estimate kept up to date: no walk of the map)
                    # (get() is None for no value: a state holds no null value.)
                    was, now_is = old.get(key), current.get(key)
                    if type(was) in _NUMBERS and type(now_is) in _NUMBERS:
                        continue   # a number for a number: the same estimate
                    if was is not None:
                        values_size -= entry_size(key, was)
                    if now_is is not None:
                        values_size += entry_size(key, now_is)
                # The registry's estimate bounds any CBOR encoding of the values
                # below 64 KiB (its headers are the longest such, its numbers 9
                # bytes, its keys ASCII): within MAX_VALUES_BYTES, no encoding.
                # cbor2's plain encoding is never shorter than the canonical one
                # (only its floats may be longer), and four times faster.
                if (values_size > MAX_VALUES_BYTES
                        and len(cbor2.dumps(dict(current))) > MAX_VALUES_BYTES):
                    encoded = len(encode(current))
                    if encoded > MAX_VALUES_BYTES:
                        raise ValueError(f"values of {encoded} bytes encoded, all together; "
                                         f"a node sends at most {MAX_VALUES_BYTES}")
                if (values_size > self.max_state_bytes
                        or state.value_count > REGISTRY_RULES.max_keys):
                    self._check_registry_size(state.value_count, values_size)
        if events:
            frozen = [freeze(event) for event in events]
            sendable(frozen)
            # (Plain sizes: a bound of the canonical ones, as for the values.)
            sizes = [len(cbor2.dumps(event)) for event in frozen]
            for encoded, event in zip(sizes, frozen):
                if encoded > MAX_EVENT_BYTES and len(encode(event)) > MAX_EVENT_BYTES:
                    raise ValueError(f"an event of {len(encode(event))} bytes encoded; "
                                     f"a node sends at most {MAX_EVENT_BYTES}")
            for event in frozen:
                counted = value_size(registry_refusal(REGISTRY_RULES.value, plain(event), 1,
                                                      "events"))
                if counted > self.max_state_bytes:
                    raise ValueError(f"an event of {counted} bytes as the registry counts "
                                     f"it; it takes at most {self.max_state_bytes} "
                                     "(max_state_bytes)")
            self._backlog.add(frozen, sizes)
            state = self._fill(state)
        self._set(state, now)
        self._values_size = values_size

    def _check_registry_size(self, count: int, size: int) -> None:
        """ValueError for a reported map the registry refuses as a whole: more
        keys than it takes, or over max_state_bytes as it counts them."""
        most = REGISTRY_RULES.max_keys
        if count > most:
            raise ValueError(f"{count} values; the registry takes at most {most} keys")
        if size > self.max_state_bytes:
            raise ValueError(f"values of {size} bytes all together, as the registry counts "
                             f"them; it takes at most {self.max_state_bytes} "
                             "(max_state_bytes)")

    def _fill(self, state: DeviceState) -> DeviceState:
        """State with the backlog's events the budget has room for."""
        moved = self._backlog.take(state)
        return state.with_events(*moved) if moved else state

    def _set(self, state: DeviceState, now: float) -> None:
        if self.session is None:
            self._pending = state
        else:
            self.session.set_local_state(state, now)

    def idle(self) -> bool:
        """Everything we sent is acknowledged, and no event waits."""
        return self.session is not None and self.session.idle and not self._backlog

    # -- driven by the owner ------------------------------------------------------

    def start(self, now: float) -> None:
        """Start a new session (boot, or no ack for rekey_after), keeping what is unsent.

        OSError (the new id cannot be stored) or ValueError (no new id can be
        made) leave the node as it was.
        """
        carry = self.state
        # Its first session since the process started (the device booted)
        # numbers its events from 0 afresh; a later one carries on (wire 5).
        session_id = self._ids.next(self.device_number, continues=self.sessions_started > 0)
        session = SSPSession(
            key=self._secret, cipher_provider=self._ciphers, is_server=False,
            local_state=EMPTY, remote_state=EMPTY, random_bytes=self._random_bytes,
            now=now, profile=self._profile,
            framing=BrokerFraming(self.device_number, session_id),
            remote_address=self.broker_address)
        session.count_peer_heard(now)   # resend actively even if no answer comes
        self.session_id, self.session = session_id, session
        carry = self._fill(carry)
        if carry is not EMPTY:
            session.set_local_state(carry, now)
        self._pending = EMPTY
        self._events_end = 0
        self._acked_at = now
        self.sessions_started += 1

    def receive(self, data: bytes, address, now: float):
        """A datagram from the broker (any header: the session checks it is ours).

        Returns why it was dropped (a DropReason), None if it was not.
        """
        if self.session is None:
            return "unknown_device"  # (not started: nothing to receive with)
        self.session.receive_datagram(data, address, now)
        return self._handle(self.session.pop_events(), now)

    def _handle(self, found, now: float):
        """Act on the session's events; the reason of a datagram it dropped, if any."""
        dropped = None
        acked = False
        for event in found:
            kind = type(event)
            if kind is ssp_events.StateReceived:
                self._deliver(event.state)
            elif kind is ssp_events.StateAcknowledged:
                self._acked += 1
                self._acked_at = now
                acked = True
            elif kind is ssp_events.DatagramRejected:
                dropped = event.reason
        if acked and self._backlog:
            state = self._fill(self.state)
            if state is not self.state:
                self.session.set_local_state(state, now)
        return dropped

    def _deliver(self, state: DeviceState) -> None:
        values = state.values
        if self._desired is None or not same(values, self._desired):
            self._desired = values
            if self.on_desired is not None:
                self._call(self.on_desired, plain(values))
        end = self._events_end
        if state.event_end < end or state.event_base > end:
            # The broker started its outgoing state anew (a restart): its
            # commands are numbered from this state on.
            end = state.event_base
        commands = state.events_since(end)
        self._events_end = state.event_end
        if self.on_command is not None:
            for command in commands:
                self._call(self.on_command, plain(command))

    def _call(self, callback, value) -> None:
        """An application callback; what it raises is logged, not ours to stop on:
        the commands after it, and this datagram's acknowledgement, still count."""
        try:
            callback(value)
        except Exception:
            self.log.failure("device {number}: {callback!r} failed",
                             number=self.device_number, callback=callback)

    def datagrams(self, now: float) -> list:
        """The datagrams due now, as (bytes, address); starts a new session if the
        broker acknowledged nothing for rekey_after (our heartbeats want an ack
        every heartbeat, so a live broker acknowledges at least that often)."""
        session = self.session
        if session is None:
            self.start(now)
            session = self.session
        if now >= self._acked_at + self.rekey_after and now >= self._rekey_not_before:
            try:
                self.start(now)
            except (OSError, ValueError) as problem:
                # The new id is not stored (or none can be made), so it must
                # not be used: keep the old session (the broker may come back
                # to it), retry later.
                self._rekey_not_before = now + self.rekey_after
                self.log.error("device {number}: no new session, no new id can be made "
                               "and stored: {problem}", number=self.device_number,
                               problem=problem)
            session = self.session
        out = session.datagrams_to_send(now)
        found = session.pop_events()
        if found:   # (usually none: nothing to handle)
            self._handle(found, now)
        return out

    def next_wakeup(self) -> float | None:
        """When datagrams() next has work."""
        session = self.session
        if session is None:
            return None
        wakeup = session.next_wakeup()
        rekey = self._acked_at + self.rekey_after
        if rekey < self._rekey_not_before:
            rekey = self._rekey_not_before
        if wakeup is None or rekey < wakeup:
            return rekey
        return wakeup
