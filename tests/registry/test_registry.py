"""Tests for broker.registry.registry: the device-shadow semantics."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import errors
from broker.registry.model import DeviceView, SessionRecord
from .helpers import START, make_registry


class ModelTests(SynchronousTestCase):
    """Merge, delete, delta, versions, conflicts and token echo."""

    def setUp(self):
        self.registry, self.store, self.clock = make_registry()
        self.prov = self.successResultOf(self.registry.add_device("greenhouse-7"))

    def test_add_device_gives_number_and_secret(self):
        """Provisioning gives a non-zero u64 number, a 16-byte secret and its 22-char form."""
        self.assertTrue(0 < self.prov.device_number < 2 ** 64)
        self.assertEqual(len(self.prov.secret), 16)
        self.assertEqual(len(self.prov.key), 22)
        self.assertEqual(self.registry.secret_for(self.prov.device_number), self.prov.secret)
        self.assertEqual(self.registry.device_by_number(self.prov.device_number).name, "greenhouse-7")

    def test_partial_updates_merge(self):
        """A patch changes only the keys it names."""
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"t": 21.5, "h": 40}))
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"t": 22.0}))
        self.assertEqual(dict(self.registry.device("greenhouse-7").reported), {"t": 22.0, "h": 40})

    def test_null_deletes_key(self):
        """A null value removes the key (and its timestamp)."""
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"t": 1, "h": 2}))
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"t": None, "x": None}))
        view = self.registry.device("greenhouse-7")
        self.assertEqual(dict(view.reported), {"h": 2})
        self.assertEqual(set(view.updated_at["reported"]), {"h"})

    def test_nested_maps_merge(self):
        """Nested maps merge like RFC 7386: null deletes a nested key, arrays replace."""
        self.successResultOf(self.registry.update_desired("greenhouse-7", {"cfg": {"a": 1, "b": [1, 2]}}))
        self.successResultOf(self.registry.update_desired("greenhouse-7", {"cfg": {"a": None, "b": [3], "c": 4}}))
        self.assertEqual(self.registry.device("greenhouse-7").to_json()["desired"],
                         {"cfg": {"b": [3], "c": 4}})

    def test_delta(self):
        """Delta holds desired keys that differ from reported, never reported-only keys."""
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"fan": "off", "t": 20, "rssi": -70}))
        self.successResultOf(self.registry.update_desired("greenhouse-7", {"fan": "on", "t": 20, "mode": "eco"}))
        self.assertEqual(dict(self.registry.device("greenhouse-7").delta), {"fan": "on", "mode": "eco"})
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"fan": "on", "mode": "eco"}))
        self.assertEqual(dict(self.registry.device("greenhouse-7").delta), {})

    def test_integral_desired_is_met_by_an_equal_float_report(self):
        """A desired 22 (a browser sends 22.0 as 22) is met by a reported 22.0 and not by
        22.5: the delta clears once the device reaches the value."""
        name = "greenhouse-7"
        self.successResultOf(self.registry.update_desired(name, {"setpoint": 22, "cfg": {"t": [20]}}))
        self.successResultOf(self.registry.update_reported(name, {"setpoint": 22.5}))
        self.assertEqual(dict(self.registry.device(name).delta), {"setpoint": 22, "cfg": {"t": (20,)}})
        self.successResultOf(self.registry.update_reported(name, {"setpoint": 22.0,
                                                                  "cfg": {"t": [20.0]}}))
        self.assertEqual(dict(self.registry.device(name).delta), {})

    def test_report_of_an_equal_float_is_a_change(self):
        """A report of 1.0 after 1 is a change all the same: a new version, and the value
        kept as the float the device sent."""
        name = "greenhouse-7"
        first = self.successResultOf(self.registry.update_reported(name, {"n": 1}))
        second = self.successResultOf(self.registry.update_reported(name, {"n": 1.0}))
        self.assertGreater(second.version, first.version)
        self.assertIs(type(self.registry.device(name).reported["n"]), float)

    def test_delta_distinguishes_true_from_one(self):
        """A desired true is not satisfied by a reported 1."""
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"on": 1}))
        self.successResultOf(self.registry.update_desired("greenhouse-7", {"on": True}))
        self.assertEqual(dict(self.registry.device("greenhouse-7").delta), {"on": True})

    def test_delta_compares_nested_values_as_json(self):
        """Nested values differ as top-level ones do: true is not 1 at any depth, while
        1 and 1.0 are one JSON number; equal nested values give no delta."""
        name = "greenhouse-7"
        self.successResultOf(self.registry.update_reported(
            name, {"cfg": {"on": 1}, "list": [1, 2], "deep": {"a": [1.0]}, "same": {"x": [True]}}))
        self.successResultOf(self.registry.update_desired(
            name, {"cfg": {"on": True}, "list": [True, 2], "deep": {"a": [1]}, "same": {"x": [True]}}))
        self.assertEqual(sorted(self.registry.device(name).delta), ["cfg", "list"])

    def test_version_strictly_increases(self):
        """Every change gives a higher version and a higher global cursor."""
        seen = []
        for patch in ({"a": 1}, {"a": 1}, {"b": 2}):
            result = self.successResultOf(self.registry.update_reported("greenhouse-7", patch))
            seen.append((result.version, result.cursor))
        self.assertEqual(seen, sorted(set(seen)))
        self.assertEqual(self.registry.device("greenhouse-7").version, seen[-1][0])
        self.assertEqual(self.registry.cursor, seen[-1][1])

    def test_version_conflict(self):
        """A desired update expecting another version is refused with the current version."""
        version = self.registry.device("greenhouse-7").version
        self.successResultOf(self.registry.update_desired("greenhouse-7", {"a": 1}, expected_version=version))
        failure = self.failureResultOf(
            self.registry.update_desired("greenhouse-7", {"a": 2}, expected_version=version, token="t-9"),
            errors.VersionConflict)
        self.assertEqual(failure.value.current_version, version + 1)
        self.assertEqual(failure.value.token, "t-9")
        self.assertEqual(failure.value.to_json()["current_version"], version + 1)
        self.assertEqual(self.registry.device("greenhouse-7").desired["a"], 1)

    def test_token_echo(self):
        """The request token comes back to its writer only, in the result."""
        result = self.successResultOf(
            self.registry.update_desired("greenhouse-7", {"a": 1}, token="req-42"))
        self.assertEqual(result.token, "req-42")
        self.assertNotIn("req-42", str(self.registry.device("greenhouse-7").to_json()))

    def test_unknown_device(self):
        """Writes to an unknown device fail with UnknownDevice."""
        self.failureResultOf(self.registry.update_reported("nope", {"a": 1}), errors.UnknownDevice)
        self.failureResultOf(self.registry.update_desired("nope", {"a": 1}), errors.UnknownDevice)
        self.assertIsNone(self.registry.device("nope"))

    def test_empty_patch_is_not_a_change(self):
        """An empty patch leaves the version alone and reports the current one."""
        before = self.registry.device("greenhouse-7").version
        result = self.successResultOf(self.registry.update_reported("greenhouse-7", {}))
        self.assertEqual(result.version, before)
        self.assertEqual(self.registry.device("greenhouse-7").version, before)

    def test_timestamps_per_key(self):
        """Each key carries the time of its own last update."""
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"a": 1, "b": 2}))
        self.clock.advance(5)
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"b": 3}))
        stamps = self.registry.device("greenhouse-7").updated_at["reported"]
        self.assertEqual(dict(stamps), {"a": START, "b": START + 5})

    def test_events_reach_observers_and_history(self):
        """Events of a reported update reach observers with that change and enter the history."""
        seen = []
        self.registry.subscribe(["greenhouse-7"], seen.append)
        self.successResultOf(self.registry.update_reported("greenhouse-7", {}, events=[{"door": "open"}]))
        self.assertEqual(seen[-1].events, ({"door": "open"},))
        self.assertEqual(seen[-1].history[-1][3], "events")
        self.assertEqual(self.registry.device("greenhouse-7").events, ())

    def test_history_bounded(self):
        """History keeps the last history_size changes."""
        registry, _, _ = make_registry(history_size=3)
        self.successResultOf(registry.add_device("d"))
        for i in range(10):
            self.successResultOf(registry.update_reported("d", {"i": i}))
        history = registry.device("d").history
        self.assertEqual([h[4]["i"] for h in history], [7, 8, 9])

    def test_history_off(self):
        """history_size 0 keeps no history at all."""
        registry, _, _ = make_registry(history_size=0)
        self.successResultOf(registry.add_device("d"))
        self.successResultOf(registry.update_reported("d", {"i": 1}))
        self.assertEqual(registry.device("d").history, ())

    def test_views_are_immutable(self):
        """A view cannot be used to change the registry."""
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"m": {"a": 1}}))
        view = self.registry.device("greenhouse-7")
        with self.assertRaises(TypeError):
            view.reported["x"] = 1
        with self.assertRaises(TypeError):
            view.reported["m"]["a"] = 2
        self.assertEqual(self.registry.device("greenhouse-7").reported["m"], {"a": 1})

    def test_connection_flip_is_a_change(self):
        """Going online bumps the version; a heartbeat only refreshes facts."""
        v0 = self.registry.device("greenhouse-7").version
        self.successResultOf(self.registry.set_connection(
            self.prov.device_number, online=True, address=("127.0.0.1", 4000), rtt=0.05, session_id=7))
        self.clock.advance(3)
        self.successResultOf(self.registry.set_connection("greenhouse-7", online=True))
        view = self.registry.device("greenhouse-7")
        self.assertEqual(view.version, v0 + 1)
        self.assertTrue(view.online)
        self.assertEqual(view.last_heard, START + 3)
        self.assertEqual(view.to_json()["connection"]["address"], "127.0.0.1:4000")
        self.assertEqual(view.to_json()["connection"]["session_id"], "7")

    def test_going_offline_keeps_when_the_device_was_last_heard(self):
        """Marking a device offline without a time keeps its last_heard: the
        device was silent since, not heard at the moment it timed out."""
        self.successResultOf(self.registry.set_connection("greenhouse-7", online=True))
        self.clock.advance(75)
        self.successResultOf(self.registry.set_connection("greenhouse-7", online=False))
        view = self.registry.device("greenhouse-7")
        self.assertFalse(view.online)
        self.assertEqual(view.last_heard, START)
        self.successResultOf(self.registry.set_connection("greenhouse-7", online=False,
                                                          last_heard=START + 5))
        self.assertEqual(self.registry.device("greenhouse-7").last_heard, START + 5)

    def test_remove_and_readd(self):
        """A removed device is gone (name, number, secret); the name can be provisioned again."""
        self.successResultOf(self.registry.remove_device("greenhouse-7"))
        self.assertIsNone(self.registry.device("greenhouse-7"))
        self.assertIsNone(self.registry.secret_for(self.prov.device_number))
        self.failureResultOf(self.registry.remove_device("greenhouse-7"), errors.UnknownDevice)
        again = self.successResultOf(self.registry.add_device("greenhouse-7"))
        self.assertNotEqual(again.secret, self.prov.secret)

    def test_duplicate_and_invalid_names(self):
        """Adding an existing name or an invalid one fails precisely."""
        self.failureResultOf(self.registry.add_device("greenhouse-7"), errors.DeviceExists)
        for bad in ("", "has space", "-x", "a*", "x" * 65, "é"):
            self.failureResultOf(self.registry.add_device(bad), errors.InvalidName)

    def test_rotate_key(self):
        """Rotating gives a new secret and tells key watchers."""
        told = []
        self.registry.watch_keys(told.append)
        rotated = self.successResultOf(self.registry.rotate_key("greenhouse-7"))
        self.assertNotEqual(rotated.secret, self.prov.secret)
        self.assertEqual(self.registry.secret_for(self.prov.device_number), rotated.secret)
        self.assertEqual(told, [self.prov.device_number])

    def test_devices_listing(self):
        """devices() lists in name order, by prefix or glob, paged with after."""
        for name in ("b-1", "a-2", "a-1", "c"):
            self.successResultOf(self.registry.add_device(name))
        names = lambda views: [v.name for v in views]
        self.assertEqual(names(self.registry.devices()), ["a-1", "a-2", "b-1", "c", "greenhouse-7"])
        self.assertEqual(names(self.registry.devices("a-")), ["a-1", "a-2"])
        self.assertEqual(names(self.registry.devices("*-1")), ["a-1", "b-1"])
        self.assertEqual(names(self.registry.devices(after="a-2", limit=2)), ["b-1", "c"])
        self.assertEqual(names(self.registry.devices("a-", after="a-1")), ["a-2"])

    def test_session_records(self):
        """A saved session record is returned for its device."""
        record = SessionRecord(session_id=5, acked_remote_num=3, acked_remote_state=b"s",
                               local_num=2, local_state=b"l", seq_reservation=1000)
        self.successResultOf(self.registry.save_session(self.prov.device_number, record))
        self.assertEqual(self.registry.session_record(self.prov.device_number), record)
        self.failureResultOf(self.registry.save_session(12345, record), errors.UnknownDevice)

    def test_view_to_json_shape(self):
        """to_json gives the documented JSON-ready shape."""
        import json
        self.successResultOf(self.registry.update_reported("greenhouse-7", {"raw": b"\x01\x02"}))
        body = self.registry.device("greenhouse-7").to_json()
        json.dumps(body)
        self.assertEqual(body["reported"]["raw"], {"$bytes": "AQI="})
        self.assertEqual(body["device_number"], str(self.prov.device_number))
        self.assertIsInstance(self.registry.device("greenhouse-7"), DeviceView)


class DurabilityOrderTests(SynchronousTestCase):
    """Writes are acknowledged only once the store says they are durable."""

    def test_ack_waits_for_store(self):
        """The Deferred of a write fires only when the store makes it durable."""
        registry, store, _ = make_registry()
        self.successResultOf(registry.add_device("d"))
        store.hold()
        d = registry.update_reported("d", {"a": 1})
        noop = registry.update_reported("d", {})
        self.assertNoResult(d)
        self.assertNoResult(noop)
        self.assertEqual(registry.device("d").reported["a"], 1)
        store.release()
        self.assertEqual(self.successResultOf(d).version, 2)
        self.assertEqual(self.successResultOf(noop).version, 2)

    def test_concurrent_writers(self):
        """Interleaved writers before any commit all land, with distinct increasing versions."""
        registry, store, _ = make_registry()
        self.successResultOf(registry.add_device("d"))
        store.hold()
        pending = []
        for i in range(20):
            pending.append(registry.update_reported("d", {f"r{i % 4}": i}))
            pending.append(registry.update_desired("d", {f"d{i % 3}": i}))
        store.release()
        versions = [self.successResultOf(d).version for d in pending]
        self.assertEqual(versions, list(range(2, 42)))
        view = registry.device("d")
        self.assertEqual(dict(view.reported), {"r0": 16, "r1": 17, "r2": 18, "r3": 19})
        self.assertEqual(dict(view.desired), {"d0": 18, "d1": 19, "d2": 17})
        self.assertEqual(store.devices[view.device_number].version, 41)


class RestartTests(SynchronousTestCase):
    """A new registry over the same store restores everything."""

    def test_restart_restores_state_and_sequence(self):
        """Devices, state, versions, timestamps, tokens, sessions and the cursor survive."""
        registry, store, _ = make_registry()
        prov = self.successResultOf(registry.add_device("a"))
        self.successResultOf(registry.add_device("b"))
        self.successResultOf(registry.update_reported("a", {"t": 1.25, "m": {"x": [1, 2]}}))
        self.successResultOf(registry.update_desired("a", {"t": 2}))
        self.successResultOf(registry.remove_device("b"))
        token_id, text = self.successResultOf(registry.add_token("write"))
        self.successResultOf(registry.save_session(prov.device_number, SessionRecord(9)))
        self.successResultOf(registry.set_connection("a", online=True))
        before = registry.device("a")
        again, _, _ = make_registry(store)
        after = again.device("a")
        self.assertEqual(after.reported, before.reported)
        self.assertEqual(after.desired, before.desired)
        self.assertEqual(after.updated_at, before.updated_at)
        self.assertEqual(after.history[:-1], before.history)
        self.assertEqual(again.secret_for(prov.device_number), prov.secret)
        self.assertEqual(again.check_token(text), "write")
        self.assertEqual(again.session_record(prov.device_number), SessionRecord(9))
        self.assertIsNone(again.device("b"))
        # it was online; after a restart it is offline, as a new change
        self.assertFalse(after.online)
        self.assertEqual(after.version, before.version + 1)
        self.assertEqual(again.cursor, registry.cursor + 1)
        batch = again.changes_since(before.cursor)
        self.assertEqual([(v.name, v.online) for v in batch.devices], [("a", False)])


class OnlineCountTests(SynchronousTestCase):
    """``online_count`` follows every change of a device's online flag."""

    def setUp(self):
        self.registry, self.store, self.clock = make_registry()
        self.numbers = [self.successResultOf(self.registry.add_device(f"dev-{i}")).device_number
                        for i in range(3)]

    def assertCountMatches(self):
        online = sum(1 for view in self.registry.devices("dev-") if view.online)
        self.assertEqual(self.registry.online_count, online)

    def test_flips_by_name_and_number_counted_once(self):
        """Going online counts once however many heartbeats follow; going offline uncounts."""
        self.assertEqual(self.registry.online_count, 0)
        self.successResultOf(self.registry.set_connection(self.numbers[0], online=True))
        self.successResultOf(self.registry.set_connection("dev-0", online=True))
        self.successResultOf(self.registry.set_connection("dev-1", online=True))
        self.assertEqual(self.registry.online_count, 2)
        self.successResultOf(self.registry.set_connection("dev-0", online=False))
        self.successResultOf(self.registry.set_connection("dev-2", online=False))
        self.assertEqual(self.registry.online_count, 1)
        self.assertCountMatches()

    def test_removing_an_online_device_uncounts_it(self):
        """Removing an online device lowers the count; removing an offline one does not."""
        self.successResultOf(self.registry.set_connection("dev-0", online=True))
        self.successResultOf(self.registry.set_connection("dev-1", online=True))
        self.successResultOf(self.registry.remove_device("dev-0"))
        self.successResultOf(self.registry.remove_device("dev-2"))
        self.assertEqual(self.registry.online_count, 1)
        self.successResultOf(self.registry.add_device("dev-0"))
        self.assertEqual(self.registry.online_count, 1)
        self.assertCountMatches()

    def test_restart_starts_with_nobody_online(self):
        """Devices stored online are flipped offline when a registry loads: the count starts at 0."""
        self.successResultOf(self.registry.set_connection("dev-0", online=True))
        self.successResultOf(self.registry.set_connection("dev-1", online=True))
        again, _, _ = make_registry(self.store)
        self.assertEqual(again.online_count, 0)
        self.assertFalse(again.device("dev-0").online)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["online", "offline", "remove", "add"]),
                              st.integers(0, 3)), max_size=30))
    def test_count_equals_online_devices_after_any_sequence(self, steps):
        """After any sequence of flips, removals and additions the count equals the online devices."""
        registry, _, _ = make_registry()
        for i in range(4):
            registry.add_device(f"dev-{i}")
        for action, i in steps:
            name = f"dev-{i}"
            if action == "add":
                d = registry.add_device(name)
            elif action == "remove":
                d = registry.remove_device(name)
            else:
                d = registry.set_connection(name, online=action == "online")
            d.addErrback(lambda f: f.trap(errors.UnknownDevice, errors.DeviceExists))
        online = sum(1 for view in registry.devices("dev-") if view.online)
        self.assertEqual(registry.online_count, online)
