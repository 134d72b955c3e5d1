"""Tests for the byte budget of a device's history (broker.registry.history).

A device posting big event batches must not make its own document (sent
whole in every read, feed page and update) larger than the documented
quarter of a megabyte: the oldest entries go first, and an entry over a
quarter of the budget is kept shortened, marked ``"truncated": true``.
Entries are counted by their JSON (and at least their stored bytes), so the
bound holds whatever JSON makes of the values: numbers, escapes, bytes.
"""

import os

import cbor2
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.config import ConfigError, parse_config
from broker.registry import RegistrySettings, open_registry
from broker.registry.database import decode_state, encode_state
from broker.registry.history import (ENTRY_OVERHEAD, EMPTY_HISTORY, HISTORY_BYTES,
                                     JSON_PER_BYTE, History, encode_entry, entry_weight,
                                     shortened_entry)
from broker.registry.model import Device, history_json
from broker.web.responses import json_bytes
from tests.scale.redis_support import require_redis, start_single
from tests.scale.support import open_registry_on, wait_until

from .helpers import make_registry

#: the reviewer's batch: seven events of 8180 characters (each within max_state_bytes)
BIG_EVENT = "e" * 8180
BIG_BATCH = (BIG_EVENT,) * 7
#: the documented bound of one device's JSON (docs/http-api.md)
QUARTER_MEGABYTE = 256 * 1024
#: values of each kind by a length, among them those JSON makes longest
#: (escapes, numbers, bytes in base64, booleans)
VALUES = {
    "text": lambda n: "y" * n,
    "control characters": lambda n: "\x01" * n,
    "quotes": lambda n: '"\\' * (n // 2),
    "emoji": lambda n: "\U0001F600" * (n // 4),
    "small negative numbers": lambda n: (-10,) * min(n, 64),
    "tiny floats": lambda n: (-2.2250738585072014e-308,) * min(n // 9, 64),
    "booleans": lambda n: (False,) * min(n, 64),
    "bytes": lambda n: b"\xff" * n,
    "empty bytes": lambda n: (b"",) * min(n, 64),
}


def cost(history):
    """What the budget counts of a history: the sum of its entries' weights."""
    return history.weight()


def json_size(history):
    """Bytes of the history's JSON as the API sends it (the list alone)."""
    return len(json_bytes([history_json(entry) for entry in history])) - 1   # (its newline)


def assert_within(case, history, budget=HISTORY_BYTES):
    """The history's weight, its JSON and its stored form all fit ``budget``."""
    case.assertLessEqual(cost(history), budget - 8)
    case.assertLessEqual(json_size(history), budget)
    case.assertLessEqual(len(history.cbor()), budget)


def grown(history, entries, size=32, budget=HISTORY_BYTES):
    """``history`` with ``entries`` (version, kind, data) appended one by one."""
    for version, kind, data in entries:
        history = history.appended(version, 100 + version, 1000.0 + version, kind, data,
                                   size, budget)
    return history


class HistoryBudgetTests(SynchronousTestCase):
    """History.appended keeps the newest entries that fit in the budget."""

    def test_oldest_entries_go_first(self):
        """Past the budget the oldest entries are dropped, the newest kept in order, and
        the count limit still applies below it."""
        history = grown(EMPTY_HISTORY, [(v, "reported", {"t": "x" * 900}) for v in range(1, 41)],
                        size=32, budget=8192)
        versions = [entry[0] for entry in history]
        self.assertEqual(versions, list(range(41 - len(versions), 41)))
        self.assertLess(len(versions), 32)
        assert_within(self, history, 8192)
        # one entry more of the same size drops exactly the oldest
        longer = history.appended(41, 141, 1041.0, "reported", {"t": "x" * 900}, 32, 8192)
        self.assertEqual([entry[0] for entry in longer], versions[1:] + [41])
        small = grown(EMPTY_HISTORY, [(v, "reported", {"t": v}) for v in range(1, 41)], size=5)
        self.assertEqual([entry[0] for entry in small], [36, 37, 38, 39, 40])

    def test_small_entries_are_unchanged(self):
        """Entries well within the budget are stored exactly as before (the very bytes of
        encoding the newest ``size`` at once)."""
        entries = [(v, "reported", {"t": 1.5 * v}) for v in range(1, 50)]
        history = grown(EMPTY_HISTORY, entries, size=32)
        expected = History.of((v, 100 + v, 1000.0 + v, kind, data)
                              for v, kind, data in entries[-32:])
        self.assertEqual(history.cbor(), expected.cbor())

    def test_big_event_batch_is_shortened_with_its_count(self):
        """An events entry over a quarter of the budget keeps the count and the first
        events that fit, marked truncated, within that quarter."""
        history = EMPTY_HISTORY.appended(1, 2, 3.0, "events", BIG_BATCH, 32)
        [(version, cursor, at, kind, data)] = history
        self.assertEqual((version, cursor, at, kind), (1, 2, 3.0, "events"))
        self.assertEqual(set(data), {"truncated", "count", "events"})
        self.assertIs(data["truncated"], True)
        self.assertEqual(data["count"], 7)
        self.assertEqual(data["events"], BIG_BATCH[:3])   # 3 x 8 kB fit in 32 kB, 4 do not
        self.assertLessEqual(entry_weight(history.encoded[0]), HISTORY_BYTES // 4)

    def test_big_report_keeps_the_shape_of_a_report_with_events(self):
        """A shortened reported entry keeps its patch (when it fits) under "patch" and its
        first events under "events", with the counts: the shape readers know."""
        data = {"patch": {"t": 21.5, "mode": "eco"}, "events": BIG_BATCH}
        [entry] = EMPTY_HISTORY.appended(4, 5, 6.0, "reported", data, 32, 16384)
        self.assertEqual(entry[3], "reported")
        self.assertEqual(dict(entry[4]), {"truncated": True, "keys": 2,
                                          "patch": {"t": 21.5, "mode": "eco"},
                                          "count": 7, "events": ()})
        plain = {f"k{i}": "v" * 200 for i in range(40)}
        [entry] = EMPTY_HISTORY.appended(4, 5, 6.0, "reported", plain, 32, 16384)
        short = entry[4]
        self.assertEqual((short["truncated"], short["keys"], short["count"], short["events"]),
                         (True, 40, 0, ()))
        self.assertEqual(list(short["patch"]), [f"k{i}" for i in range(len(short["patch"]))])
        self.assertGreater(len(short["patch"]), 5)

    def test_big_desired_patch_keeps_its_first_keys(self):
        """A shortened desired patch keeps its key count and its first keys that fit."""
        patch = {f"key{i:02d}": "x" * 100 for i in range(64)}
        [entry] = EMPTY_HISTORY.appended(1, 1, 1.0, "desired", patch, 32, 4096)
        short = entry[4]
        self.assertEqual(set(short), {"truncated", "keys", "patch"})
        self.assertEqual(short["keys"], 64)
        kept = list(short["patch"])
        self.assertEqual(kept, list(patch)[:len(kept)])
        self.assertTrue(0 < len(kept) < 64)
        self.assertTrue(all(short["patch"][key] == patch[key] for key in kept))

    def test_small_connection_entries_are_never_shortened(self):
        """Entries with nothing to shorten (connection, created) stay as they are."""
        history = grown(EMPTY_HISTORY, [(1, "created", None), (2, "connection", {"online": True})],
                        budget=4096)
        self.assertEqual([entry[4] for entry in history], [None, {"online": True}])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["events", "reported", "desired"]),
                              st.integers(0, 12), st.integers(0, 9000),
                              st.sampled_from(sorted(VALUES))), min_size=1, max_size=40),
           st.sampled_from([4096, 16384, HISTORY_BYTES]), st.integers(1, 40))
    def test_any_sequence_stays_within_the_budget(self, entries, budget, size):
        """Whatever is appended, of any value kind, the history (its weight, JSON and
        stored form) fits the budget and the count, keeps the newest entry and a run of
        the newest ones, and drops no entry it had room for."""
        history = EMPTY_HISTORY
        blobs = []
        for version, (kind, items, length, value) in enumerate(entries, 1):
            item = VALUES[value](length)
            data = ((item,) * items if kind == "events"
                    else {f"k{i}": item for i in range(items)})
            history = history.appended(version, version, float(version), kind, data, size, budget)
            blobs.append(history.encoded[-1])
            assert_within(self, history, budget)
            self.assertLessEqual(len(history), size)
            self.assertLessEqual(entry_weight(blobs[-1]), budget // 4)
            kept = [entry[0] for entry in history]
            self.assertEqual(kept, list(range(version - len(kept) + 1, version + 1)))
            if len(kept) < min(size, version):
                older = blobs[version - len(kept) - 1]
                self.assertGreater(cost(history) + entry_weight(older), budget - 8)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.text(max_size=300), max_size=64), st.integers(60, 20000))
    def test_shortened_entry_fits_its_limit(self, events, limit):
        """A shortened entry never weighs more than the limit given (when its counts and
        flag fit at all), and keeps a prefix of the events."""
        blob = shortened_entry(7, 8, 9.5, "events", tuple(events), limit)
        skeleton = encode_entry(7, 8, 9.5, "events",
                                {"truncated": True, "count": len(events), "events": []})
        self.assertLessEqual(entry_weight(blob), max(limit, entry_weight(skeleton)))
        data = cbor2.loads(blob)[4]
        self.assertEqual(data["count"], len(events))
        self.assertEqual(data["events"], events[:len(data["events"])])

    def test_bounded_trims_a_history_stored_before_the_budget(self):
        """A history stored under no budget (32 entries of 57 kB) loads whole, and
        ``bounded`` keeps its newest entries within the budget, shortened as ``appended``
        keeps them; a history within the limits is given back as it is."""
        old = History.of((v, v, float(v), "events", BIG_BATCH) for v in range(1, 33))
        self.assertEqual(len(old), 32)
        trimmed = old.bounded(32)
        assert_within(self, trimmed)
        self.assertEqual([entry[0] for entry in trimmed], [28, 29, 30, 31, 32])
        self.assertEqual([(entry[4]["truncated"], entry[4]["count"], entry[4]["events"])
                          for entry in trimmed], [(True, 7, BIG_BATCH[:3])] * 5)
        self.assertEqual([entry[0] for entry in old.bounded(1)], [32])
        small = History.of((v, v, float(v), "reported", {"t": v}) for v in range(1, 33))
        self.assertEqual([entry[0] for entry in small.bounded(3)], [30, 31, 32])
        within = grown(EMPTY_HISTORY, [(v, "events", BIG_BATCH) for v in range(1, 10)])
        self.assertIs(within.bounded(32), within)


class HistoryJsonBudgetTests(SynchronousTestCase):
    """The budget bounds the history's JSON, whatever JSON makes of its values."""

    def test_numbers_keep_the_device_json_under_a_quarter_megabyte(self):
        """Batches of 64 events of small negative numbers (1 CBOR byte, 4 JSON bytes
        each; every event within max_state_bytes) leave the device's JSON under the
        documented quarter of a megabyte (it was 491 KiB)."""
        registry, _, clock = make_registry(history_size=32)
        self.successResultOf(registry.add_device("counter"))
        event = [[-10] * 60 for _ in range(14)]
        for _ in range(8):
            clock.advance(1)
            self.successResultOf(registry.update_reported("counter", {}, events=[event] * 64))
        view = registry.device("counter")
        self.assertLess(len(json_bytes(view.to_json())), QUARTER_MEGABYTE)
        assert_within(self, view.history)
        self.assertEqual(view.history[-1][4]["count"], 64)

    def test_every_value_kind_stays_within_the_budget(self):
        """Big batches of events of every kind of value (escaped text, numbers, floats,
        booleans, bytes) keep the history's JSON within the budget, and the device's
        under a quarter of a megabyte."""
        for name, make in sorted(VALUES.items()):
            registry, _, clock = make_registry(history_size=32)
            self.successResultOf(registry.add_device("d"))
            for _ in range(8):
                clock.advance(1)
                self.successResultOf(registry.update_reported("d", {}, events=[make(2000)] * 64))
            view = registry.device("d")
            self.assertLessEqual(json_size(view.history), HISTORY_BYTES, name)
            self.assertLess(len(json_bytes(view.to_json())), QUARTER_MEGABYTE, name)
            self.assertGreater(len(view.history), 2, name)

    @settings(max_examples=80, deadline=None)
    @given(st.recursive(
        st.none() | st.booleans() | st.integers(-(1 << 64), (1 << 64) - 1) | st.floats()
        | st.text(max_size=40) | st.binary(max_size=20),
        lambda inner: (st.lists(inner, max_size=6).map(tuple)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=6)),
        max_leaves=30))
    def test_entry_weight_bounds_its_json(self, data):
        """An entry weighs at least its JSON in a history list and its stored bytes,
        and at most JSON_PER_BYTE per byte of its CBOR (the bound that spares
        measuring histories far from the budget)."""
        for kind, value in (("events", data), ("reported", {"k": data}), ("desired", data)):
            blob = encode_entry(12345, 678901, 1717000000.125, kind, value)
            weight = entry_weight(blob)
            entry_json = len(json_bytes(history_json(History.of_encoded([blob])[0])))
            self.assertGreaterEqual(weight, entry_json)        # (its newline: the comma)
            self.assertGreaterEqual(weight, len(blob) + 3)
            self.assertLessEqual(weight, len(blob) * JSON_PER_BYTE + ENTRY_OVERHEAD)

    def test_weights_without_floats_are_exact(self):
        """Without floats but the time, an entry weighs its JSON and a comma, give or
        take the time's digits and a byte: the budget is not spent on guesses."""
        blob = encode_entry(7, 42, 1717000001.5, "desired",
                            {"led": "on", "level": -3, "tags": ("a", "\x01"), "raw": b"xyz"})
        entry_json = len(json_bytes(history_json(History.of_encoded([blob])[0])))
        self.assertLessEqual(entry_weight(blob) - entry_json, 25 - len("1717000001.5") + 1)

    def test_measured_weights_follow_the_entries(self):
        """A history near its budget keeps each entry's weight, and those are always
        the weights of the entries it holds."""
        history = grown(EMPTY_HISTORY, [(v, "reported", {"t": "x" * (v * 97 % 3000)})
                                        for v in range(1, 120)], size=32, budget=16384)
        self.assertIsNotNone(history.weights)
        self.assertEqual(list(history.weights), [entry_weight(b) for b in history.encoded])
        assert_within(self, history, 16384)
        far = grown(EMPTY_HISTORY, [(v, "reported", {"t": v}) for v in range(1, 60)])
        self.assertIsNone(far.weights)
        self.assertEqual(far.weight(), sum(entry_weight(b) for b in far.encoded))


class BoundedOldHistoryTests(SynchronousTestCase):
    """``bounded`` (loading a history stored before the budget, or under a larger one)
    keeps entries as ``appended`` would: shortened, never dropped silently."""

    def test_newest_oversized_entry_is_shortened_not_dropped(self):
        """An old history whose newest entry is over the whole budget keeps that entry,
        shortened and marked as ``appended`` keeps it, and the older ones that fit."""
        big = ("e" * 8000,) * 64
        old = History.of([(1, 1, 1.0, "reported", {"t": 1}), (2, 2, 2.0, "events", big)])
        loaded = old.bounded(32)
        appended = EMPTY_HISTORY.appended(2, 2, 2.0, "events", big, 32)
        self.assertEqual([entry[0] for entry in loaded], [1, 2])
        self.assertEqual(loaded[0], (1, 1, 1.0, "reported", {"t": 1}))
        self.assertEqual(loaded.encoded[-1], appended.encoded[-1])
        self.assertEqual((loaded[-1][4]["truncated"], loaded[-1][4]["count"]), (True, 64))
        assert_within(self, loaded)

    def test_a_shortened_entry_shortened_again_keeps_its_counts(self):
        """An entry shortened under a larger budget and loaded under a smaller one is
        shortened again with the counts it had, not as a patch of its own keys."""
        data = {"patch": {f"k{i}": "v" * 300 for i in range(50)}, "events": ("e" * 900,) * 40}
        wide = EMPTY_HISTORY.appended(5, 6, 7.0, "reported", data, 32, 65536)
        self.assertEqual(wide[-1][4]["keys"], 50)
        narrow = wide.bounded(32, 4096)
        [(version, _, _, kind, short)] = narrow
        self.assertEqual((version, kind), (5, "reported"))
        self.assertEqual(set(short), {"truncated", "keys", "patch", "count", "events"})
        self.assertEqual((short["truncated"], short["keys"], short["count"]), (True, 50, 40))
        self.assertLess(len(short["patch"]), len(wide[-1][4]["patch"]))
        assert_within(self, narrow, 4096)


class RegistryHistoryBudgetTests(SynchronousTestCase):
    """The reviewer's scenario on a registry: many big event batches from one device."""

    def test_device_document_stays_under_a_quarter_megabyte(self):
        """32 batches of seven 8 kB events leave the device's JSON under 256 KiB (it was
        1.8 MB), with the newest batch kept shortened and counted."""
        registry, _, clock = make_registry(history_size=32)
        self.successResultOf(registry.add_device("noisy"))
        for _ in range(32):
            clock.advance(1)
            self.successResultOf(registry.update_reported("noisy", {}, events=list(BIG_BATCH)))
        view = registry.device("noisy")
        self.assertLess(len(json_bytes(view.to_json())), QUARTER_MEGABYTE)
        assert_within(self, view.history)
        newest = view.history[-1]
        self.assertEqual((newest[0], newest[3]), (view.version, "events"))
        self.assertEqual((newest[4]["truncated"], newest[4]["count"]), (True, 7))
        self.assertGreater(len(view.history), 1)

    def test_small_reports_still_fill_the_history(self):
        """Ordinary reports are unaffected: the history holds history_size of them."""
        registry, _, clock = make_registry(history_size=32)
        self.successResultOf(registry.add_device("quiet"))
        for i in range(40):
            clock.advance(1)
            self.successResultOf(registry.update_reported("quiet", {"t": 20.0 + i}))
        history = registry.device("quiet").history
        self.assertEqual(len(history), 32)
        self.assertEqual(history[-1][4], {"t": 59.0})

    def test_state_with_an_old_oversized_history_loads(self):
        """A device state stored with an oversized history (before the budget) decodes
        entry for entry, and its next change brings it within the budget."""
        dev = Device("d", 7, b"k" * 16)
        dev.history = tuple((v, v, float(v), "events", BIG_BATCH) for v in range(1, 33))
        state = decode_state(encode_state(dev.state()))
        loaded = state[-1]
        self.assertEqual(len(loaded), 32)
        self.assertEqual(loaded, History.of(dev.history))
        after = loaded.appended(33, 33, 33.0, "reported", {"t": 1}, 32)
        assert_within(self, after)
        self.assertEqual(after[-1][4], {"t": 1})


class StoredHistoryBudgetTests(TestCase):
    """Shortened entries are ordinary entries to the SQLite store."""

    @defer.inlineCallbacks
    def test_sqlite_round_trip(self):
        """After a clean stop the SQLite store gives back the bounded history, its
        shortened entries included, exactly."""
        data_dir = os.path.abspath(self.mktemp())
        options = RegistrySettings(reload_interval=0, history_size=32)
        registry = open_registry(data_dir, settings=options, reactor=reactor)
        yield registry.add_device("noisy")
        for i in range(12):
            yield registry.update_reported("noisy", {"n": i}, events=list(BIG_BATCH))
        yield registry.update_reported("noisy", {"n": 99})
        before = registry.device("noisy")
        yield registry.stop()
        registry = open_registry(data_dir, settings=options, reactor=reactor)
        try:
            after = registry.device("noisy")
            self.assertEqual(after.history.cbor(), before.history.cbor())
            self.assertEqual(after.to_json()["history"], before.to_json()["history"])
            self.assertEqual(after.history[-2][4]["truncated"], True)
            self.assertEqual(after.history[-2][4]["patch"], {"n": 11})
            assert_within(self, after.history)
        finally:
            yield registry.stop()


class RedisHistoryBudgetTests(TestCase):
    """Shortened entries are ordinary entries to the Redis store (a real redis-server)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_redis_round_trip(self):
        """A registry loading from Redis, and one following the writer's changes, see the
        writer's bounded history, its shortened entries included."""
        require_redis()
        self.cluster = False
        url = start_single(self)
        writer = open_registry_on(self, url, history_size=32)
        follower = open_registry_on(self, url, history_size=32)
        yield writer.add_device("noisy")
        for i in range(12):
            result = yield writer.update_reported("noisy", {}, events=list(BIG_BATCH))
        yield wait_until(self, lambda: follower.cursor >= result.cursor, what="the follower")
        loader = open_registry_on(self, url, history_size=32)
        written = writer.device("noisy").history
        assert_within(self, written)
        self.assertEqual(written[-1][4]["count"], 7)
        self.assertEqual(follower.device("noisy").history, written)
        self.assertEqual(loader.device("noisy").history, written)


class HistoryBytesSettingTests(SynchronousTestCase):
    """[registry] history_bytes in the configuration and the registry settings."""

    def test_default_is_the_history_budget(self):
        """The configuration's default is the registry's and the history's."""
        self.assertEqual(parse_config({}).registry.history_bytes, HISTORY_BYTES)
        self.assertEqual(RegistrySettings().history_bytes, HISTORY_BYTES)
        self.assertEqual(parse_config({"registry": {"history_bytes": 65536}})
                         .registry.history_bytes, 65536)

    def test_out_of_range_is_refused_with_its_key(self):
        """A budget below 4096 bytes, above 64 MiB or not an integer is refused, naming
        registry.history_bytes."""
        for value, words in ((100, "at least 4096"), (1 << 30, "at most 67108864"),
                             ("big", "an integer"), (True, "not a boolean")):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"registry": {"history_bytes": value}})
            self.assertIn("registry.history_bytes", str(caught.exception))
            self.assertIn(words, str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            RegistrySettings(history_bytes=1000)
        self.assertIn("history_bytes", str(caught.exception))
