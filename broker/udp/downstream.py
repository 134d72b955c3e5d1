"""What the broker sends devices: desired values and commands.

A mixin of ``SSPEndpoint`` (it uses the endpoint's session table, bridge
and clock). The registry calls ``desired_changed`` and ``key_changed``;
the web layer calls ``send_command``. A command is written to the session
record before it may travel (``RegistryBridge.queue_commands``): a broker
restart then delivers the ones the device had not acknowledged, and never
gives an index the device saw to another command.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from broker.udp.convert import desired_state
from broker.udp.park import Parked
from broker.udp.sessions import LiveSession

__all__ = ["Downstream"]


class Downstream:
    """Desired changes and commands, from the registry and the web to sessions."""

    # -- called by the registry -----------------------------------------------------

    def desired_changed(self, device_number: int, desired) -> None:
        """The device's desired map changed: it becomes the session's outgoing state."""
        entry = self._table.get(device_number)
        if entry is None:
            return
        if type(entry) is Parked:
            # Cheap test first: a notification that changes nothing for the
            # device leaves it parked.
            base = entry.local
            if desired_state(desired, base) is base:
                return
        now = self._now()
        live = self._table.live(device_number, now)  # unparking applies desired already
        if live is None:
            return
        session = live.session
        base = session.local_state
        state = desired_state(desired, base)
        if state is not base:
            session.set_local_state(state, now)
        self._table.settle(live, now)

    def key_changed(self, device_number: int) -> None:
        """The device was removed or its key rotated: its session ends now."""
        entry = self._table.get(device_number)
        if entry is not None:
            self._table.retire(device_number, entry, "key changed")

    # -- commands -------------------------------------------------------------------

    def send_command(self, device_number: int, *commands):
        """Queue commands (events of the outgoing state) for a connected device.

        None if the device has no session here.  Else a Deferred: the
        commands are written to the session record first, then go out with
        the next send; it fires True once they are on their way (False if
        the session ended meanwhile) and fails if the store did not take
        them.  They reach the device once, in order, across broker restarts
        too (until the device starts a new session).  TypeError/ValueError
        for a command an SSP state cannot carry.
        """
        now = self._now()
        live = self._table.live(device_number, now) if commands else None
        if live is None:
            return None
        try:
            d = self._bridge.queue_commands(live, commands)
        except (TypeError, ValueError):
            self._table.settle(live, now)   # unparked for nothing: may park again
            raise
        live.writes += 1   # keeps the session live (not parked) until then
        return d.addBoth(self._commands_durable, live)

    def _commands_durable(self, result, live: LiveSession):
        live.writes -= 1
        if isinstance(result, Failure):
            self.counters["store_failures"] += 1
            return result
        if result is None or self._table.get(live.number) is not live:
            return False   # the session ended, or its record is another's
        now = self._now()
        session = live.session
        current = session.local_state
        added = result.events_since(current.event_end)
        if added:
            session.set_local_state(current.with_events(*added), now)
        self._table.settle(live, now)
        return True
