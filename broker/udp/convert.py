"""Between SSP device states and the registry's maps.

A device state (``broker.ssp.device_state.DeviceState``) holds frozen CBOR
values (tuples, read-only mappings); the registry takes JSON-like patches
whose nested maps merge (RFC 7386).  So a changed nested map is sent as a
merge patch of its own (removed inner keys as null), which makes the
registry's ``reported`` equal the device's values after every update.  The
one thing a merge patch cannot say is "an inner key holds null": such inner
nulls are left out (documented in docs/protocol.md's value rules).
"""

from __future__ import annotations

from collections.abc import Mapping

import cbor2

from broker.registry.history_entry import number_map_cbor
from broker.ssp import speedups
from broker.ssp.device_state import (EVENTS_KEY, FIRST_EVENT_KEY, VALUES_KEY, DeviceState,
                                      same)

_MISSING = object()


def plain(value):
    """A frozen device-state value as the plain data the registry validates."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items() if item is not None}
    if type(value) is tuple:
        return [plain(item) for item in value]
    return value


def _merge_patch(old, new):
    """The RFC 7386 patch that turns value old into value new (maps recursively)."""
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        patch = {}
        for key, item in new.items():
            previous = old.get(key, _MISSING)
            if item is None:
                if previous is not _MISSING and previous is not None:
                    patch[key] = None
                continue
            if previous is _MISSING or not same(previous, item):
                patch[key] = _merge_patch(previous, item)
        for key in old:
            if key not in new:
                patch[key] = None
        return patch
    return plain(new)


_SCALARS = frozenset((int, float, str, bytes, bool))
#: reported_patch's and encode_state's compiled twins (None: Python only).
_compiled_patch = speedups.fast_values_patch
_compiled_record = speedups.fast_state_record


def _unchanged(previous, value) -> bool:
    """Whether a value is the same on the wire (scalars compared directly: fast)."""
    if previous is value:
        return True
    kind = type(value)
    if kind is type(previous) and kind in _SCALARS:
        return previous == value and (kind is not float or str(previous) == str(value))
    return same(previous, value)


def reported_patch(old: DeviceState, new: DeviceState) -> dict:
    """The registry patch from the values of old to those of new."""
    compiled = _compiled_patch
    if compiled is not None:
        patch = compiled(old, new)
        if patch is not None:
            return patch   # (scalar values: this code's own dict, made in C)
    old_values, new_values = old.values, new.values
    patch = {}
    get = old_values.get
    for key, value in new_values.items():
        previous = get(key, _MISSING)
        kind = type(value)
        if kind in _SCALARS:
            # A scalar (most readings): its own plain form, and its own patch
            # unless the same on the wire (_unchanged, inline).
            if previous is not value and (
                    kind is not type(previous) or previous != value
                    or (kind is float and str(previous) != str(value))):
                patch[key] = value
            continue
        if previous is _MISSING:
            patch[key] = plain(value)
        elif not _unchanged(previous, value):
            patch[key] = _merge_patch(previous, value)
    for key in old_values:
        if key not in new_values:
            patch[key] = None
    return patch


def new_events(old: DeviceState, new: DeviceState) -> list:
    """The events new holds beyond old's end, as plain data, in order."""
    return [plain(event) for event in new.events_since(old.event_end)]


class SessionStart(DeviceState):
    """What a new session's first report is compared with: nothing reported in
    this session yet, and the device's events that its earlier sessions
    handed to the registry end at ``event_end``.

    A device starting a new session carries its unacknowledged events with
    their indices (wire.md 5); those below this end are stored already (their
    acknowledgement was lost) and are not stored again. A device that numbers
    its events from 0 again in the first session of a boot rebooted: all of
    them are new (``first_report_base``).
    """

    __slots__ = ()


class ContinuedStart(SessionStart):
    """A SessionStart of a session whose id says the device did not reboot
    (``broker.ssp.framing.continues_boot``): carried events from index 0 are
    its earlier session's, never acknowledged, not a boot's numbered afresh."""

    __slots__ = ()


def session_start(event_end: int, continues: bool = False) -> DeviceState:
    """The bridge's starting point of a new session (one shared object if 0);
    ``continues``: its id says the device did not reboot."""
    if continues:
        return ContinuedStart(event_base=event_end) if event_end else _CONTINUED_START
    return SessionStart(event_base=event_end) if event_end else _BLANK_START


_BLANK_START = SessionStart()
_CONTINUED_START = ContinuedStart()


def first_report_base(previous: DeviceState, state: DeviceState,
                      reported: Mapping | None = None) -> DeviceState:
    """Where a report is compared from: ``previous``, unless it is a session's
    start. Then the values are ``reported``, what the registry holds for the
    device now: a new session's first state is the device's whole map, so
    the keys it no longer holds (deleted, or inner keys of a map it
    replaced, while the old session went unacknowledged) go too. And if
    ``state`` numbers its events afresh, from 0 in a boot's first session
    (a rebooted device) or ending below the stored end (which a device that
    did not reboot has passed), the events start at 0, so that every event
    of it counts. A session that continues the device's boot (ContinuedStart)
    and carries events from 0 carries its earlier session's: those below the
    stored end are stored already."""
    kind = type(previous)
    if kind is not SessionStart and kind is not ContinuedStart:
        return previous
    event_base = previous.event_base
    if state.event_end < event_base or (not state.event_base and kind is SessionStart):
        event_base = 0
    if reported:
        try:
            return DeviceState(reported, event_base=event_base)
        except (TypeError, ValueError):
            pass    # a value no device state holds: compare with none
    return DeviceState(event_base=event_base) if event_base else DeviceState.empty()


def desired_state(desired: Mapping, base: DeviceState | None = None) -> DeviceState:
    """The outgoing device state for the registry's ``desired`` map.

    Built on base (the session's current outgoing state) so that its queued
    events (commands) stay, and base itself comes back when nothing changed.
    """
    if base is None:
        return DeviceState(dict(desired))
    patch = dict(desired)
    for key in base.values:
        if key not in patch:
            patch[key] = None
    return base.with_values(patch)


_dumps = cbor2.dumps
#: encode_state's bytes up to the values of a state holding no events from
#: ``event_base`` 0..23: a 3-item map, keys 1 (that index), 2 (no events), 0.
_STATE_HEADS = tuple(bytes((0xa3, FIRST_EVENT_KEY, base, EVENTS_KEY, 0x80, VALUES_KEY))
                     for base in range(24))


def encode_state(state: DeviceState) -> bytes:
    """A device state as bytes for the session record.

    The diff layout of docs/protocol.md from state 0, always with the first
    event index (keys 1 and 2, the list maybe empty): after a restart the
    resumed state must end its events where the device thinks it does, even
    when every event it held was acknowledged and forgotten.  Written once
    per durable report and read only by ``decode_state``, so it is plain
    CBOR: the canonical form (sorted keys) costs twice as much and nothing
    compares these bytes.
    """
    compiled = _compiled_record
    if compiled is not None:
        record = compiled(state)
        if record is not None:
            return record   # (no events, scalar values: these bytes, written in C)
    base, events, values = state.event_base, state.events, state.values
    if not events and 0 <= base < 24 and values:
        # The usual report (readings, no events held): the bytes cbor2 would
        # give the body below, without its setup (number_map_cbor).
        readings = number_map_cbor(values)
        if readings is not None:
            return _STATE_HEADS[base] + readings
    body = {FIRST_EVENT_KEY: base, EVENTS_KEY: events}  # a tuple: an array
    if values:
        body[VALUES_KEY] = values.copy()   # the plain dict behind the read-only view
    return _dumps(body)


def encode_commands(state: DeviceState) -> bytes:
    """The broker's outgoing state as the session record keeps it: its
    commands not yet acknowledged and the index of the first (the desired
    values live in the registry).  Empty when there is nothing to keep."""
    if not state.events and not state.event_base:
        return b""
    return _dumps({FIRST_EVENT_KEY: state.event_base, EVENTS_KEY: state.events})


def decode_state(data: bytes) -> DeviceState:
    """Inverse of encode_state and encode_commands (raises
    DatagramDropped(BAD_DIFF) on bad bytes)."""
    return DeviceState.empty().apply(data)
