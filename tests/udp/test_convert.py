"""Tests for broker.udp.convert: device states to registry patches and back."""

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.device_state import DeviceState
from broker.udp.convert import (decode_state, desired_state, encode_state, new_events,
                                plain, reported_patch)


class ReportedPatchTests(SynchronousTestCase):
    """The registry patch makes reported equal the device's values."""

    def test_changed_added_removed(self):
        """Changed and new keys carry their value, removed keys null, unchanged nothing."""
        old = DeviceState({"a": 1, "b": 2.5, "gone": "x"})
        new = DeviceState({"a": 1, "b": 3.5, "c": [1, {"d": True}]})
        self.assertEqual(reported_patch(old, new), {"b": 3.5, "c": [1, {"d": True}],
                                                    "gone": None})

    def test_nested_maps_become_merge_patches(self):
        """A changed nested map is sent as an RFC 7386 patch, removed inner keys as null."""
        old = DeviceState({"cfg": {"x": 1, "y": 2, "z": {"k": 1}}})
        new = DeviceState({"cfg": {"x": 1, "z": {"k": 2}}})
        self.assertEqual(reported_patch(old, new), {"cfg": {"y": None, "z": {"k": 2}}})

    def test_same_number_of_other_type_is_a_change(self):
        """1 and 1.0 and True differ on the wire, so they are changes."""
        self.assertEqual(reported_patch(DeviceState({"v": 1}), DeviceState({"v": 1.0})),
                         {"v": 1.0})
        self.assertEqual(reported_patch(DeviceState({"v": 1}), DeviceState({"v": True})),
                         {"v": True})
        self.assertEqual(reported_patch(DeviceState({"v": 0.0}), DeviceState({"v": -0.0})),
                         {"v": -0.0})
        self.assertEqual(reported_patch(DeviceState({"v": 2}), DeviceState({"v": 2})), {})

    def test_events_since_old_end(self):
        """Only the events beyond the old state's end are new."""
        old = DeviceState(events=["a"])
        new = old.with_events({"b": (1, 2)}, "c")
        self.assertEqual(new_events(old, new), [{"b": [1, 2]}, "c"])

    def test_plain(self):
        """Frozen values become plain lists and dicts; inner nulls are left out."""
        state = DeviceState({"m": {"a": None, "b": [1]}})
        self.assertEqual(plain(state.values["m"]), {"b": [1]})


class RecordStateTests(SynchronousTestCase):
    """The device state kept in the session record survives the round trip exactly."""

    def test_round_trip_keeps_event_base(self):
        """Values, events and the first event index come back, also with no events left."""
        state = DeviceState({"t": 1.5, "m": {"x": [1]}}, events=["e1", "e2"])
        acknowledged = state.subtract(state)
        for original in (state, acknowledged, DeviceState.empty()):
            decoded = decode_state(encode_state(original))
            self.assertEqual(decoded, original)
            self.assertEqual(decoded.event_end, original.event_end)
        self.assertEqual(decode_state(encode_state(acknowledged)).event_base, 2)


class DesiredStateTests(SynchronousTestCase):
    """The registry's desired map as the session's outgoing state."""

    def test_unchanged_gives_the_same_object(self):
        """Nothing new: the very same state comes back (so nothing is sent)."""
        base = desired_state({"led": "on"})
        self.assertIs(desired_state({"led": "on"}, base), base)

    def test_changes_keep_queued_commands(self):
        """New desired values keep the commands still queued in the outgoing state."""
        base = desired_state({"led": "on", "old": 1}).with_events("reboot")
        new = desired_state({"led": "off"}, base)
        self.assertEqual(dict(new.values), {"led": "off"})
        self.assertEqual(new.events, ("reboot",))
